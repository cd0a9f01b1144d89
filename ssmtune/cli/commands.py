"""The CLI commands: each is a typed function of one argument dataclass (see ``ssmtune.cli.args``)."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from torch import nn

from ssmtune.cli.args import (
    CompareArgs,
    EvalCommandArgs,
    GenerateArgs,
    PretrainArgs,
    TrainArgs,
    dump_yaml,
    flatten,
    load_recipe,
)
from ssmtune.utils.io import atomic_write_text

if TYPE_CHECKING:
    from ssmtune.train.distributed import DistContext

FULL = "full"
# Convenience names (used by the recipes' file names) for a registered method with fixed options.
METHOD_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "state_offset_h": ("state_offset", {"variant": "h"}),
    "state_offset_y": ("state_offset", {"variant": "y"}),
}
BYTE_TOKENIZER_MARKER = {"tokenizer_class": "ByteTokenizer"}


def method_names() -> list[str]:
    from ssmtune.core.registry import known_methods

    return sorted({*known_methods(), *METHOD_ALIASES, FULL})


def make_adapter_configs(method: str, method_args: dict[str, Any]) -> list | None:
    """The adapter config list of a CLI method name (None for full fine-tuning)."""
    if method == FULL:
        if method_args:
            raise ValueError(f"method 'full' takes no method_args, got {sorted(method_args)}")
        return None
    from ssmtune.core.registry import known_methods

    name, preset = METHOD_ALIASES.get(method, (method, {}))
    if name not in known_methods():
        raise ValueError(f"unknown method {method!r}; known methods: {', '.join(method_names())}")
    from ssmtune.core.registry import get_method

    cls = get_method(name).config_cls
    method_args = cls.rename_deprecated(method_args)  # recipes written before the peft names still load
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(method_args) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {method!r}; valid options: {valid}")
    required = [f.name for f in dataclasses.fields(cls)
                if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]  # fmt: skip
    missing = [n for n in required if n not in {**preset, **method_args}]
    if missing:
        raise ValueError(f"method {method!r} needs option(s) {missing} in --method_args, e.g. '{{{missing[0]}: 16}}'")
    return [cls(**{**preset, **method_args})]


def validate_train_args(args: TrainArgs) -> None:
    """Checks that need no model or data: the method and its options, the task name."""
    from ssmtune.data import get_task
    from ssmtune.eval.metrics import require_metric_packages

    make_adapter_configs(args.method, args.method_args)
    if args.data.packing and args.max_length is None:
        raise ValueError("--data.packing true needs --max_length (the length of a packed row)")
    if args.data.packing and args.data.packing_layout == "cu_seqlens" and args.train.cuda_graph:
        raise ValueError("--data.packing_layout cu_seqlens does not run with --train.cuda_graph true (its shapes "
                         "change with every batch); --data.packing_layout rows does")  # fmt: skip
    task = get_task(args.data.task)
    require_metric_packages(task.metrics, args.data.task)


def load_base_model(spec: str, *, backend: str = "auto") -> nn.Module:
    """A model folder or ``builtin:<name>`` through ``ssmtune.models.load_model``."""
    from ssmtune.models import load_model

    model = load_model(resolve_model_path(spec))
    if backend != "auto" and hasattr(model, "backend"):
        model.backend = backend
    elif backend != "auto":  # a transformers hybrid: its ssmtune mixers
        from ssmtune.models.hybrid import set_backend

        set_backend(model, backend)
    return model


def resolve_model_path(spec: str) -> str:
    """``builtin:<name>`` -> the packaged folder ``ssmtune/builtin/models/<name>``; other specs pass through."""
    from ssmtune.models.loading import BUILTIN_PREFIX, resolve_builtin

    return str(resolve_builtin(spec)) if spec.startswith(BUILTIN_PREFIX) else spec


def load_tokenizer_for(tokenizer: str | None, model: str):
    """The tokenizer given by ``--tokenizer``, else the model folder's (a byte-tokenizer marker counts)."""
    from ssmtune.tokenizer import ByteTokenizer, load_tokenizer

    folder = tokenizer or resolve_model_path(model)
    if tokenizer is None and not Path(folder).exists():
        # the tokenizer is read from the model folder: say that the model is missing, not its tokenizer
        raise FileNotFoundError(f"model {model!r} does not exist (no such folder; a hub id needs --tokenizer)")
    if folder == "byte":
        return ByteTokenizer()
    marker = Path(folder) / "tokenizer_config.json"
    if marker.is_file():
        cfg = json.loads(marker.read_text())
        if cfg.get("tokenizer_class") == BYTE_TOKENIZER_MARKER["tokenizer_class"]:
            return ByteTokenizer(add_sep_token=bool(cfg.get("add_sep_token", False)))
    return load_tokenizer(folder)


def _cast(model: nn.Module, precision: str, device: str) -> nn.Module:
    from ssmtune.train.loop import DTYPES, resolve_device

    model.to(resolve_device(device))
    if precision != "fp32":
        model.to(DTYPES[precision])
    return model


def _run_name(args: TrainArgs) -> str:
    model = args.model.split(":", 1)[-1].rstrip("/")
    raw = args.name or f"{Path(model).name}-{args.data.task}-{args.method}"
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", raw)


def _trainable(model: nn.Module) -> tuple[int, int]:
    return sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters())


def train(args: TrainArgs) -> dict[str, Any]:
    """Fine-tune; writes runs/<name>/{config.yaml, metrics.jsonl, checkpoints/, best/, final/, results.json, *.png}."""
    from ssmtune.train.distributed import init_distributed, shutdown

    # Under torchrun / accelerate launch every rank runs this; only rank 0 writes files.
    ctx = init_distributed(args.train.device)
    try:
        return _train(args, ctx)
    finally:
        shutdown(ctx)


def _train(args: TrainArgs, ctx: DistContext) -> dict[str, Any]:
    from ssmtune.data import get_task, load_examples, tokenize_examples

    validate_train_args(args)
    run_dir = Path(args.out_dir) / _run_name(args)
    check_output_folder(run_dir, "--out_dir/--name")
    task = get_task(args.data.task)
    tokenizer = load_tokenizer_for(args.tokenizer, args.model)
    examples = load_examples(args.data, "train")
    train_ds = tokenize_examples(
        examples, tokenizer, add_eos=task.add_eos, max_length=args.max_length, length_filter=args.data.length_filter
    )
    check_enough_examples(len(train_ds), args)

    created = not run_dir.exists()
    try:
        return _train_in(run_dir, args, ctx, task, tokenizer, train_ds)
    except (ValueError, OSError, ImportError):
        # a run refused before its first checkpoint leaves no folder behind
        if ctx.is_main and created and not (run_dir / "checkpoints").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def check_enough_examples(n: int, args) -> None:
    """A batch needs batch_size examples, except packed rows: there batch_size counts rows, and a few long examples
    fill a step (its empty rows are padding)."""
    if args.data.packing and args.data.packing_layout == "rows":
        if n == 0:
            raise ValueError("the training set has no examples")
        return
    if n < args.train.batch_size:
        raise ValueError(f"the training set has {n} examples, fewer than batch_size={args.train.batch_size}")


def _check_same_run(run_dir: Path, args: TrainArgs) -> None:
    """Refuse to resume checkpoints written for another base model or method (config.yaml holds what they were)."""
    from ssmtune.train.checkpoint import latest_checkpoint

    saved_file = run_dir / "config.yaml"
    if not args.train.resume or latest_checkpoint(run_dir / "checkpoints") is None or not saved_file.is_file():
        return
    try:
        saved = yaml.safe_load(saved_file.read_text()) or {}
    except yaml.YAMLError:
        return  # an unreadable config.yaml is rewritten; the checkpoint's own checks still apply

    def same(key: str, old: Any, new: Any) -> bool:
        if key == "model" and isinstance(old, str) and Path(old).exists() and Path(new).exists():
            return Path(old).resolve() == Path(new).resolve()  # `./base` and `base` are one model
        return old == new

    diffs = [f"--{k}: {saved.get(k)!r} -> {getattr(args, k)!r}" for k in ("model", "method", "method_args")
             if k in saved and not same(k, saved[k], getattr(args, k))]  # fmt: skip
    if diffs:
        raise ValueError(
            f"cannot resume {str(run_dir)!r}: its checkpoints were written with other settings ({'; '.join(diffs)}); "
            "rerun with the same ones, pick another --name, or start over with --train.resume false"
        )


def check_output_folder(path: Path, flag: str) -> None:
    """An output folder must be a folder (or not exist yet) and be writable, checked before any work is done."""
    parent = next((p for p in (path, *path.parents) if p.exists()), None)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag}: {str(path)!r} is a file, not a folder")
    if parent is not None and (not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK)):
        raise ValueError(f"{flag}: cannot write into {str(path)!r} ({str(parent)!r} is not a writable folder)")


def check_output_file(path: Path, flag: str) -> None:
    """An output file must not be a folder, and its folder must be writable (checked before the work is done)."""
    if path.is_dir():
        raise ValueError(f"{flag}: {str(path)!r} is a folder; give a file path")
    check_output_folder(path.parent, flag)


def _packing_collator(model: nn.Module, pad_token_id: int, args: TrainArgs):
    """``--data.packing``'s collator: packed rows of ``batch_size`` rows with a lead of the model's d_conv - 1 pads,
    or one ``cu_seqlens`` row per micro-batch."""
    from ssmtune.data import PackedRowsCollator, PackingCollator
    from ssmtune.models.lm import SSMPreTrainedModel

    if args.data.packing_layout == "cu_seqlens":
        return PackingCollator(pad_token_id, args.max_length)
    base = getattr(model, "base_model", model)
    if not isinstance(base, SSMPreTrainedModel):  # a CLI setting that does not apply: the one error type of the CLI
        what = type(base).__name__
        msg = f"--data.packing_layout rows runs on ssmtune's Mamba / Mamba-2 models, not {what}; use cu_seqlens"
        raise ValueError(msg)  # noqa: TRY004
    return PackedRowsCollator(pad_token_id, args.max_length, rows=args.train.batch_size, lead=base.rows_lead())


def _train_in(run_dir: Path, args: TrainArgs, ctx: DistContext, task, tokenizer, train_ds) -> dict[str, Any]:
    from ssmtune.core.peft_model import get_peft_model
    from ssmtune.data import Collator
    from ssmtune.eval.evaluate import evaluate, load_eval_dataset
    from ssmtune.train import fit
    from ssmtune.train.loop import batches_of, check_resume
    from ssmtune.train.plots import plot_run
    from ssmtune.utils.io import finite_json

    torch.manual_seed(args.train.seed)
    model = load_base_model(args.model, backend=args.backend)
    collate = Collator(tokenizer.pad_token_id)
    if args.data.packing:
        collate = _packing_collator(model, tokenizer.pad_token_id, args)
    if ctx.is_main:
        # a refused resume must not leave config.yaml describing settings its checkpoints were not written with; the
        # batches (packed rows' lead) follow from the model, so this waits for it
        _check_same_run(run_dir, args)
        check_resume(run_dir, args.train, len(train_ds), batches_of(collate))
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_yaml(args, run_dir / "config.yaml")
    configs = make_adapter_configs(args.method, args.method_args)
    if configs is None:
        model.requires_grad_(True)
    else:
        model = get_peft_model(model, configs)
        _sdt_warmup(model, configs, train_ds, tokenizer, args)
    n_train, n_total = _trainable(model)

    eval_fn = None
    if args.eval.mode != "none":
        eval_ds = load_eval_dataset(args.data, tokenizer, args.eval)

        def eval_fn(m: nn.Module) -> dict[str, float]:
            return evaluate(m, tokenizer, args.data, args.eval, dataset=eval_ds)

    start = time.perf_counter()
    result = fit(model, train_ds, collate, config=args.train, out_dir=run_dir, eval_fn=eval_fn, dist=ctx)
    if not ctx.is_main:
        return {"run": run_dir.name, "steps": result.step, "world_size": ctx.world_size}
    from ssmtune.train.plots import read_metrics

    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["type"] == "eval"]
    best_eval = next((r for r in evals if r["step"] == result.best_step), evals[-1] if evals else {})
    summary = {
        "run": run_dir.name,
        "model": args.model,
        "task": task.name,
        "method": args.method,
        "method_args": args.method_args,
        "trainable_params": n_train,
        "total_params": n_total,
        "steps": result.step,
        "epochs": result.epoch,
        "best_metric": result.best_metric,
        "best_value": result.best_value,
        "best_step": result.best_step,
        "best_eval": {k: v for k, v in best_eval.items() if k not in ("type",)},
        "last_eval": result.last_eval,
        "resumed_from": result.resumed_from,
        "train_time_s": time.perf_counter() - start,
        "world_size": ctx.world_size,
    }
    atomic_write_text(run_dir / "results.json", finite_json(summary, indent=2) + "\n")
    plot_run(run_dir)
    print(finite_json({k: summary[k] for k in ("run", "trainable_params", "steps", "best_metric", "best_value")}))
    return summary


def _sdt_warmup(model: nn.Module, configs: list, train_ds, tokenizer, args: TrainArgs) -> None:
    """SDLoRA phase 1 (docs/methods.md §5.5): the warm-up that selects channels and states, before the main run."""
    from ssmtune.data import Collator
    from ssmtune.methods.sdlora import SDLoraConfig, sdt_select
    from ssmtune.train.loop import resolve_device

    sdl = [c for c in configs if isinstance(c, SDLoraConfig)]
    if not sdl:
        return
    from ssmtune.train.checkpoint import latest_checkpoint

    if args.train.resume and latest_checkpoint(Path(args.out_dir) / _run_name(args) / "checkpoints") is not None:
        return  # the checkpoint holds the selection (its index buffers); fit() restores it
    device = resolve_device(args.train.device)
    model.to(device)
    collate = Collator(tokenizer.pad_token_id)
    gen = torch.Generator().manual_seed(args.train.seed)
    bs = args.train.batch_size

    def batches():
        while True:
            order = torch.randperm(len(train_ds), generator=gen).tolist()
            for i in range(0, len(order) - bs + 1, bs):
                batch = collate([train_ds[j] for j in order[i : i + bs]])
                yield {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}

    # the main run's optimiser: its batch size and its linear decay planned over the whole run (docs/methods.md §5.5)
    total = args.train.epochs * (len(train_ds) // args.train.batch_size)
    if args.train.max_steps:
        total = min(total, args.train.max_steps) if args.train.epochs >= 1 else args.train.max_steps
    sdt_select(model, batches(), lr=args.train.lr, steps=sdl[0].warmup_steps, total_steps=max(total, 1),
               max_grad_norm=args.train.max_grad_norm)  # fmt: skip


def eval(args: EvalCommandArgs) -> dict[str, Any]:
    """Evaluate a model (+ adapter) and print the result JSON."""
    from ssmtune.core.io import load_adapter
    from ssmtune.data import get_task
    from ssmtune.eval.evaluate import evaluate
    from ssmtune.eval.metrics import require_metric_packages
    from ssmtune.utils.io import finite_json

    require_metric_packages(get_task(args.data.task).metrics, args.data.task)
    if args.output:
        check_output_file(Path(args.output), "--output")
    tokenizer = load_tokenizer_for(args.tokenizer, args.model)
    model = load_base_model(args.model, backend=args.backend)
    if args.adapter is not None:
        model = load_adapter(model, args.adapter)
    _cast(model, args.precision, args.device)
    result = evaluate(model, tokenizer, args.data, args.eval)
    result.update({"model": args.model, "adapter": args.adapter})
    text = finite_json(result, indent=2)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.output, text + "\n")
    print(text)
    return result


def generate(args: GenerateArgs) -> str:
    """Print the completion of a prompt."""
    from ssmtune.core.io import load_adapter
    from ssmtune.eval.generation import generate_text

    tokenizer = load_tokenizer_for(args.tokenizer, args.model)
    model = load_base_model(args.model, backend=args.backend)
    if args.adapter is not None:
        model = load_adapter(model, args.adapter)
    _cast(model, args.precision, args.device).eval()
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed)
    text = generate_text(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                         do_sample=args.do_sample, temperature=args.temperature, top_p=args.top_p,
                         generator=gen)  # fmt: skip
    print(text)
    return text


def compare(args: CompareArgs) -> list[dict[str, Any]]:
    """Train (or read) several runs and write compare.md, compare.csv and compare.png."""
    from ssmtune.cli.args import (
        _coerce,  # noqa: F401  (values are checked when the recipe is built)
        build,
    )
    from ssmtune.train.plots import plot_comparison

    if not args.recipes and not args.runs:
        raise ValueError("compare needs --recipes and/or --runs")
    overrides = flatten(_nest(args.overrides), TrainArgs, where="--overrides")
    check_output_folder(Path(args.out), "--out")
    rows = []
    for recipe in args.recipes:
        targs = build(TrainArgs, {**load_recipe(recipe, TrainArgs), **overrides})
        run_dir = Path(targs.out_dir) / _run_name(targs)
        results = run_dir / "results.json"
        if not results.is_file():
            train(targs)
        rows.append(json.loads(results.read_text()))
    for run in args.runs:
        results = Path(run) / "results.json"
        if not results.is_file():
            raise FileNotFoundError(f"run folder {run!r} has no results.json (did its training finish?)")
        rows.append(json.loads(results.read_text()))
    metric = args.metric or "score"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = []
    for r in rows:
        ev = r.get("best_eval") or {}
        table.append({"run": r["run"], "task": r["task"], "method": r["method"],
                      "trainable_params": r["trainable_params"], "steps": r["steps"],
                      metric: ev.get(metric), "loss": ev.get("loss")})  # fmt: skip
    cols = list(table[0])
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=cols)
    writer.writeheader()
    writer.writerows(table)
    atomic_write_text(out / "compare.csv", buf.getvalue())
    fmt = lambda v: (
        f"{v:.4g}" if isinstance(v, float) else ("" if v is None else f"{v:,}" if isinstance(v, int) else str(v))
    )
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(row[c]) for c in cols) + " |" for row in table]
    atomic_write_text(out / "compare.md", "\n".join(lines) + "\n")
    scored = [row for row in table if isinstance(row[metric], (int, float))]
    if scored:
        plot_comparison([r["run"] for r in scored], [r["trainable_params"] for r in scored],
                        [r[metric] for r in scored], metric=metric, path=out / "compare.png")  # fmt: skip
    print("\n".join(lines))
    return table


def _nest(d: dict[str, Any]) -> dict[str, Any]:
    """{"train.lr": 1} -> {"train": {"lr": 1}} (dotted keys in --overrides)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _read_corpus(path: Path) -> list[str]:
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise FileNotFoundError(f"corpus folder {str(path)!r} holds no *.txt files")
        return [f.read_text(encoding="utf-8", errors="replace") for f in files]
    if not path.is_file():
        raise FileNotFoundError(f"corpus {str(path)!r} does not exist")
    return [path.read_text(encoding="utf-8", errors="replace")]


def pretrain(args: PretrainArgs) -> Path:
    """Train a model from scratch on packed byte-level sequences and save it with save_pretrained."""
    from ssmtune.data import TokenizedDataset
    from ssmtune.data.tokenize import Collator, TokenizeStats
    from ssmtune.models import Mamba2Config, MambaConfig, causal_lm_for
    from ssmtune.tokenizer import ByteTokenizer
    from ssmtune.train import fit
    from ssmtune.train.plots import plot_run

    tok = ByteTokenizer()
    ids: list[int] = []
    for doc in _read_corpus(Path(args.corpus)):
        ids += tok.encode(doc) + [tok.eos_token_id]
    n_seq = len(ids) // args.seq_len
    if n_seq < 2:
        raise ValueError(
            f"corpus {args.corpus!r} has {len(ids)} tokens, too few for 2 sequences of seq_len={args.seq_len}"
        )
    seqs = [ids[i * args.seq_len : (i + 1) * args.seq_len] for i in range(n_seq)]
    n_val = max(1, round(n_seq * args.val_fraction))
    items = [{"input_ids": s, "labels": s, "prompt_length": 1, "example_index": i} for i, s in enumerate(seqs)]
    train_ds = TokenizedDataset(items[n_val:], [], pad_token_id=tok.pad_token_id, stats=TokenizeStats())
    val_items = items[:n_val]

    shape = args.shape
    common = {"d_model": shape.d_model, "n_layer": shape.n_layer, "d_state": shape.d_state,
              "vocab_size": tok.vocab_size}  # fmt: skip
    config = MambaConfig(**common) if shape.arch == "mamba" else Mamba2Config(**common, headdim=shape.headdim)
    torch.manual_seed(args.train.seed)
    model = causal_lm_for(config)
    if args.backend != "auto":
        model.backend = args.backend
    collate = Collator(tok.pad_token_id)

    def eval_fn(m: nn.Module) -> dict[str, float]:
        from ssmtune.models.lm import token_loss

        dev = next(m.parameters()).device
        total, count = 0.0, 0
        for j in range(0, len(val_items), 8):
            b = collate(val_items[j : j + 8])
            s, n = token_loss(m(b["input_ids"].to(dev)).logits, b["labels"].to(dev))
            total, count = total + float(s), count + n
        return {"loss": total / max(count, 1)}

    out = Path(args.out)
    check_output_folder(out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    dump_yaml(args, out / "pretrain_config.yaml")
    fit(model, train_ds, collate, config=args.train, out_dir=out / "training", eval_fn=eval_fn,
        save_fn=lambda m, d: None)  # fmt: skip
    model.save_pretrained(out)
    atomic_write_text(out / "tokenizer_config.json", json.dumps(BYTE_TOKENIZER_MARKER) + "\n")
    plot_run(out / "training")
    print(f"saved {sum(p.numel() for p in model.parameters()):,d}-parameter model to {out}")
    return out


def bench(argv: list[str]) -> int:
    """Benchmarks against the peers (ssmtune bench --list)."""
    from ssmtune.bench.run import main as bench_main

    return bench_main(argv)


def demo(argv: list[str]) -> Any:
    """The guided demo (ssmtune.cli.demo)."""
    import inspect

    from ssmtune.cli.demo import main as demo_main

    return demo_main(argv) if inspect.signature(demo_main).parameters else demo_main()
