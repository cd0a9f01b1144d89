"""Write recipes/<model>/<task>/<method>.yaml from the tables of docs/methods.md §9 (run: python recipes/generate.py).

Learning rates: the [SOT] config table for the state-based methods, LoRA (S6) and Additional-scan; the [SDT] benchmark
table for full fine-tuning, BitFit and SDLoRA. Values that neither paper publishes (prefix/prompt learning rates and
sizes, LoRA rank) are marked "# not published: ssmtune choice". Edit this script, not the YAML files.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).parent
NOT_PUBLISHED = "  # not published: ssmtune choice"
GLUE = ("rte", "mrpc", "cola", "sst2", "qnli", "qqp", "mnli")
MODELS = {"mamba-130m": (*GLUE, "dart"), "mamba-1.4b": ("samsum", "spider")}
# Hybrid transformers checkpoints (Mamba-2 mixers next to attention / MoE), loaded with ssmtune's mixers swapped in:
# folder name -> (a hub id of the checkpoint, its tasks). No paper tunes these: the [SOT] learning rates of the task
# are the starting point, marked as an ssmtune choice.
HYBRID_MODELS = {
    "falcon-h1-0.5b": ("tiiuae/Falcon-H1-0.5B-Base", ("rte",)),
    "nemotron-h-4b": ("nvidia/Nemotron-H-4B-Base-8K", ("rte",)),
    "granite-4.0-h-1b": ("ibm-granite/granite-4.0-h-1b", ("rte",)),
    "bamba-9.8b": ("ibm-ai-platform/Bamba-9B", ("rte",)),
    "zamba2-1.2b": ("Zyphra/Zamba2-1.2B", ("rte",)),
}
HYBRID_METHODS = ("state_offset_h", "initial_state", "lora")
# Gated DeltaNet / KDA hybrids: folder name -> (a hub id of the checkpoint, its tasks, its methods). The state methods
# scale the learned state by GDN_SCALE at inference (the published initial-state study's alpha for Gated DeltaNet).
GDN_MODELS = {
    "qwen3.5-0.8b": ("Qwen/Qwen3.5-0.8B", ("rte", "code", "math"), HYBRID_METHODS),
    "qwen3.5-2b": ("Qwen/Qwen3.5-2B", ("rte", "code", "math"), HYBRID_METHODS),
    "qwen3.5-4b": ("Qwen/Qwen3.5-4B", ("rte", "code", "math"), HYBRID_METHODS),
    "kimi-linear-48b-a3b": ("moonshotai/Kimi-Linear-48B-A3B-Base", ("rte",), ("state_offset_h", "initial_state")),
}
GDN_SCALE = 0.07
# Users' own data as the `jsonl` task (one {"input": prompt, "target": answer} object a line in train.jsonl and
# validation.jsonl): recipe folder -> (longest new tokens of `ssmtune eval --eval.mode generation`, what to put there).
# Their learning rates are the [SOT] DART ones (a generation task), an ssmtune choice.
USER_TASKS = {
    "code": (512, "coding problems -> solutions (e.g. an MBPP- or HumanEval-style training set)"),
    "math": (384, "word problems -> worked solutions ending in the answer (e.g. a GSM8K-style training set)"),
}
# [SOT] table: state-offset (h), state-offset (y), init state, LoRA (S6), Additional-scan.
SOT = {
    "dart": (4e-4, 4e-3, 2e-3, 4e-3, 4e-3),
    "rte": (1e-3, 1e-3, 4e-4, 2e-3, 4e-3),
    "mrpc": (2e-4, 2e-3, 1e-3, 2e-3, 2e-3),
    "cola": (2e-4, 1e-3, 2e-3, 4e-5, 2e-3),
    "sst2": (1e-4, 1e-3, 2e-3, 2e-3, 1e-1),
    "qnli": (1e-4, 2e-3, 2e-3, 1e-3, 2e-3),
    "qqp": (4e-5, 1e-3, 2e-3, 1e-3, 4e-2),
    "mnli": (4e-4, 1e-3, 2e-3, 2e-3, 4e-3),
    "spider": (2e-4, 2e-3, 1e-3, 4e-3, 4e-3),
    "samsum": (1e-4, 1e-3, 2e-4, 2e-3, 4e-3),
}
SOT_METHODS = ("state_offset_h", "state_offset_y", "initial_state", "lora", "additional_scan")
# [SDT] benchmark table: full, BitFit (None = "–", not run), and the SDLoRA learning rates of its text.
SDT_FULL = {"dart": 4e-4, "samsum": 4e-5, "spider": 4e-5, **dict.fromkeys(GLUE, 1e-4)}
SDT_BITFIT = {"cola": 2e-3, "mnli": 2e-3, "mrpc": 4e-3, "qnli": 2e-3, "qqp": 2e-3, "rte": 2e-3, "sst2": 4e-3,
              "samsum": 2e-3, "spider": 4e-3, "dart": None}  # fmt: skip
SDT_SDLORA = {"dart": 4e-3, "samsum": 4e-4, "spider": 2e-3, **dict.fromkeys(GLUE, 1e-3)}
# Not published: prompt-based methods' learning rates (the [SDT] grid spans 1e-5 .. 4e-1).
PROMPT_LR, PREFIX_LR, VIRTUAL_TOKENS = 1e-2, 2e-3, 16

METHODS = {
    "state_offset_h": ("state_offset", {"variant": "h"}, "State-offset Tuning (h), docs/methods.md §4.1"),
    "state_offset_y": ("state_offset", {"variant": "y"}, "State-offset Tuning (y), docs/methods.md §4.2"),
    "initial_state": ("initial_state", {}, "Initial State Tuning, docs/methods.md §4.3"),
    "lora": ("lora", {"r": 8, "lora_alpha": 8, "target_modules": ["x_proj", "dt_proj"]},
             "LoRA on the S6 projections x_proj + dt_proj (the [SOT] 'LoRA (S6)' column), docs/methods.md §5.2"),
    "lora_ssd": ("lora", {"r": 8, "lora_alpha": 8, "target_modules": ["in_proj", "out_proj"]},
                 "LoRA on the Mamba-2 mixers' in_proj + out_proj, docs/methods.md §5.2"),
    "lora_gdn": ("lora", {"r": 8, "lora_alpha": 8, "target_modules": ["in_proj_qkv", "in_proj_z", "out_proj"]},
                 "LoRA on the Gated DeltaNet mixers' in_proj_qkv + in_proj_z + out_proj, docs/methods.md §5.2"),
    "additional_scan": ("additional_scan", {}, "Additional-scan, docs/methods.md §5.4"),
    "prefix": ("prefix", {"num_virtual_tokens": VIRTUAL_TOKENS}, "Prefix-Tuning, docs/methods.md §4.4"),
    "prompt": ("prompt", {"num_virtual_tokens": VIRTUAL_TOKENS}, "Prompt Tuning, docs/methods.md §5.1"),
    "bitfit": ("bitfit", {}, "BitFit (conv1d.bias, dt_proj.bias), docs/methods.md §5.3"),
    "sdlora": ("sdlora", {}, "SDT on the SSM + LoRA on the projections (SDLoRA), docs/methods.md §5.5"),
    "full": ("full", {}, "Full fine-tuning (no adapter; saved with save_pretrained), docs/methods.md §5.6"),
}  # fmt: skip


def _fmt(v: float) -> str:
    # YAML 1.1 (PyYAML) reads a float in exponent form only with a dot and a signed exponent: 2.0e-3.
    return f"{v:.1e}".replace("e-0", "e-").replace("e+0", "e+")


def hyper(model: str, task: str, method: str) -> tuple[float, int, int, dict[str, str]]:
    """(lr, epochs, batch size, {key: comment}) of one recipe."""
    notes: dict[str, str] = {}
    short = task in ("qqp", "mnli")
    epochs, batch = (3 if short else 10), 4
    if task in USER_TASKS:
        lr, source, epochs = SOT["dart"][SOT_METHODS.index(method)], "", 3
        notes["lr"] = NOT_PUBLISHED + " (the [SOT] DART value for Mamba)"
    elif model in HYBRID_MODELS or model in GDN_MODELS:
        lr, source, epochs = SOT[task][SOT_METHODS.index(method)], "", 3
        notes["lr"] = NOT_PUBLISHED + " (the [SOT] value for Mamba)"
    elif method in SOT_METHODS:
        lr, source = SOT[task][SOT_METHODS.index(method)], "[SOT] table"
        if method == "initial_state" and model == "mamba-1.4b":
            batch = 2
    elif method == "full":
        lr, source, epochs = SDT_FULL[task], "[SDT] table", 10
    elif method == "bitfit":
        lr, source = SDT_BITFIT[task], "[SDT] table"
        if lr is None:
            lr, notes["lr"] = 2e-3, NOT_PUBLISHED + " ([SDT] did not run BitFit on DART)"
    elif method == "sdlora":
        lr, source = SDT_SDLORA[task], "[SDT] text"
    else:
        lr, source = (PROMPT_LR if method == "prompt" else PREFIX_LR), ""
        notes["lr"] = NOT_PUBLISHED
    if source:
        notes.setdefault("lr", f"  # {source}, docs/methods.md §9")
    return lr, epochs, batch, notes


def render(model: str, task: str, method: str) -> str:
    gdn = model in GDN_MODELS
    hybrid = model in HYBRID_MODELS or gdn
    lora = "lora_gdn" if gdn else "lora_ssd"
    name, options, title = METHODS[lora if hybrid and method == "lora" else method]
    if gdn and name in ("state_offset", "initial_state"):
        options = {**options, "scale": GDN_SCALE}
    lr, epochs, batch, notes = hyper(model, task, method)
    generation = task in ("dart", "samsum")
    hub = (GDN_MODELS[model] if gdn else HYBRID_MODELS.get(model, ("",)))[0]
    where = (
        f"a local copy of {hub} (transformers layout, tokenizer.json)"
        if hybrid
        else "a local checkpoint folder (HF or mamba_ssm layout) with its tokenizer.json"
    )
    lines = [
        "# Generated by recipes/generate.py from docs/methods.md §9; edit the script, not this file.",
        f"# {title}; {model} on {task}.",
        f"model: checkpoints/{model}  # {where}",
        f"method: {name}",
    ]
    if options:
        lines.append("method_args:")
        for k, v in options.items():
            value = "[" + ", ".join(v) + "]" if isinstance(v, list) else v
            note = NOT_PUBLISHED if k in ("r", "lora_alpha", "num_virtual_tokens") else ""
            if k == "scale":
                note = "  # alpha at inference only, the study's value for Gated DeltaNet"
            lines.append(f"  {k}: {value}{note}")
    if task in USER_TASKS:
        lines += ["data:", "  task: jsonl", f"  data_dir: data/{task}  # your train.jsonl / validation.jsonl: "
                  f"{USER_TASKS[task][1]}"]  # fmt: skip
    else:
        lines += ["data:", f"  task: {task}", f"  data_dir: data/{task}  # local files: train/validation[/test]"]
    if task in USER_TASKS:
        lines += ["max_length: 2048  # prompt + target cut from the left to this many tokens"]
    if task == "spider":
        lines += ["  length_filter: 1536  # the reference drops longer examples from train and dev (docs/methods.md §10.3)"]
    lines += [
        "train:",
        f"  epochs: {epochs}",
        f"  batch_size: {batch}",
        f"  lr: {_fmt(lr)}{notes.get('lr', '')}",
        "  weight_decay: 0.0",
        "  warmup_steps: 0",
        "  max_grad_norm: 1.0",
        "  seed: 42",
        "  precision: bf16  # the papers' bf16 weights; ssmtune keeps the trainable tensors in fp32 (docs/methods.md §10.6)",
        f"  best_metric: {'loss' if task == 'spider' or task in USER_TASKS else 'score'}",
    ]
    if generation:
        max_new = 256 if task == "samsum" else 128
        lines += [
            "eval:",
            "  mode: generation",
            "  num_beams: 5",
            "  min_new_tokens: 5",
            f"  max_new_tokens: {max_new}",
        ]
    elif task == "spider":
        lines += ["eval:", "  mode: loss  # as in the papers: execution accuracy comes from a separate generation pass"]
    elif task in USER_TASKS:
        lines += [
            "eval:",
            "  mode: loss  # code and maths are scored by running tests / matching answers, not ROUGE: generate with",
            f"  # `ssmtune eval --eval.mode generation --eval.num_beams 1 --eval.max_new_tokens {USER_TASKS[task][0]}`",
            "  # or `ssmtune generate` on the final adapter and score the outputs with your task's checker",
        ]
    else:
        lines += ["eval:", "  mode: classification"]
    lines += ["out_dir: runs", f"name: {model}-{task}-{method}"]
    return "\n".join(lines) + "\n"


def layout() -> list[tuple[str, str, str]]:
    """(model, task, method) of every recipe."""
    native = [(m, t, meth) for m, tasks in MODELS.items() for t in tasks for meth in METHODS if meth not in ("lora_ssd", "lora_gdn")]
    hybrid = [(m, t, meth) for m, (_, tasks) in HYBRID_MODELS.items() for t in tasks for meth in HYBRID_METHODS]
    gdn = [(m, t, meth) for m, (_, tasks, methods) in GDN_MODELS.items() for t in tasks for meth in methods]
    return native + hybrid + gdn


def main() -> list[Path]:
    written = []
    for model, task, method in layout():
        path = ROOT / model / task / f"{method}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(model, task, method))
        written.append(path)
    return written


if __name__ == "__main__":
    print(f"wrote {len(main())} recipes")
