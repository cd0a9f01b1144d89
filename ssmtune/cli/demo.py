"""`make demo` / `ssmtune demo`: State-offset Tuning on the built-in base model and task, offline, on a CPU.

1. Load the built-in base model (``builtin:mamba2-tiny``, pretrained here on WordNet glosses; docs/base-models.md).
2. Score the untuned base model on the built-in classification task (``wn-pos``: a held-out gloss -> the part of
   speech of its word, answered with a digit; accuracy, a non-digit answer counts as wrong).
3. Fine-tune it with State-offset Tuning (h) and with a LoRA baseline, each through ``ssmtune train``, and score both.
4. Print a table (score, trainable parameters and their share of the base, time) and write it with a plot
   (score against trainable parameters) under ``--out_dir``.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ssmtune.utils.io import atomic_write_text

# (label, registered method, method options, learning rate). The LRs come from the pilot study (docs/results.md);
# the demo is one epoch, so it is a smoke test of the methods, not a tuned comparison.
DEMO_METHODS: list[tuple[str, str, dict, float]] = [
    ("State-offset (h)", "state_offset_h", {}, 4e-3),
    ("LoRA in_proj+out_proj (r=8)", "lora", {"r": 8, "target_modules": ["in_proj", "out_proj"]}, 4e-3),
]


@dataclass(kw_only=True)
class DemoArgs:
    """ssmtune demo: fine-tune the built-in base model with State-offset Tuning (h) against the untuned base and LoRA."""

    model: str = "builtin:mamba2-tiny"
    """Base model (a folder or `builtin:<name>`)."""
    task: str = "wn-pos"
    """Task: `wn-pos`, `wn-pos-long`, `wn-category` or any registered classification task with local data."""
    train_examples: int | None = None
    """Training examples used (the first N of the train split). Default: `None`, all 1205."""
    eval_examples: int = 300
    """Test examples scored."""
    epochs: int = 1
    """Passes over the training examples."""
    batch_size: int = 16
    """Examples per optimizer step."""
    methods: list[str] = field(default_factory=lambda: [m[1] for m in DEMO_METHODS])
    """Methods to run, among those of DEMO_METHODS."""
    out_dir: str = "runs/demo"
    """Where the runs, the table and the plot go."""
    seed: int = 0
    """Seed of every run."""


def _fmt_row(cells: list[str], widths: list[int]) -> str:
    return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"


def _plot(rows: list[tuple], path: Path, *, task: str) -> Path | None:
    """Accuracy per method on a 0-1 axis (small differences stay small), labelled with the trainable parameters."""
    from ssmtune.train.plots import pyplot, save_figure

    if (plt := pyplot()) is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [r[0] for r in rows]
    scores = [r[1] for r in rows]
    bars = ax.barh(names, scores, color=["#999999"] + ["#3b75af"] * (len(rows) - 1))
    for bar, (_, score, n, _, _) in zip(bars, rows):
        ax.text(score + 0.01, bar.get_y() + bar.get_height() / 2, f"{score:.3f}  ({n:,d} trainable)", va="center")
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_xlabel(f"test accuracy on {task}")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    from ssmtune.cli.args import TrainArgs, build, parse
    from ssmtune.cli.commands import load_base_model, load_tokenizer_for, train
    from ssmtune.data import TaskConfig
    from ssmtune.eval.evaluate import EvalConfig, evaluate

    args = parse(DemoArgs, list(sys.argv[1:] if argv is None else argv), prog="ssmtune demo")
    torch.manual_seed(args.seed)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = {"data.task": args.task, "data.max_examples": args.train_examples}
    eval_cfg = EvalConfig(split="test", max_examples=args.eval_examples, batch_size=32)

    print(f"[demo] base model {args.model}, task {args.task}: scoring the untuned model on {args.eval_examples} "
          "test examples", flush=True)  # fmt: skip
    t0 = time.perf_counter()
    base = load_base_model(args.model)
    tok = load_tokenizer_for(None, args.model)
    n_base = sum(p.numel() for p in base.parameters())
    base_res = evaluate(base, tok, TaskConfig(task=args.task), eval_cfg)
    rows = [("base model, untuned", base_res["score"], 0, time.perf_counter() - t0, base_res.get("out_of_class"))]

    chosen = [m for m in DEMO_METHODS if m[1] in args.methods]
    if len(chosen) != len(args.methods):
        known = [m[1] for m in DEMO_METHODS]
        raise ValueError(f"--methods must be among {known}, got {args.methods}")
    for label, method, opts, lr in chosen:
        print(
            f"[demo] fine-tuning with {label} (lr {lr}) on {args.train_examples or 'all'} training examples", flush=True
        )
        values = {
            "model": args.model, "method": method, "method_args": opts, **data,
            "train.lr": lr, "train.epochs": args.epochs, "train.batch_size": args.batch_size, "train.seed": args.seed,
            "train.save_steps": 0, "train.eval_every_epoch": False, "eval.mode": "none", "train.progress": False,
            "out_dir": str(out), "name": method, "train.resume": False,
        }  # fmt: skip
        t0 = time.perf_counter()
        summary = train(build(TrainArgs, values))
        from ssmtune.core.io import load_adapter

        tuned = load_adapter(load_base_model(args.model), out / method / "final")
        res = evaluate(tuned, tok, TaskConfig(task=args.task), eval_cfg)
        rows.append((label, res["score"], summary["trainable_params"], time.perf_counter() - t0, None))

    header = ["method", "test accuracy", "trainable params", "share of base", "time (s)"]
    cells = [
        [name, f"{score:.3f}", f"{n:,d}", f"{100 * n / n_base:.3f}%", f"{secs:.0f}"] for name, score, n, secs, _ in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    table = "\n".join(
        [_fmt_row(header, widths), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        + [_fmt_row(c, widths) for c in cells]
    )
    note = (f"\nbase model: {args.model} ({n_base:,d} parameters); task: {args.task}, {args.train_examples or 'all'} training "
            f"examples, {args.eval_examples} test examples; the untuned model answered {rows[0][4]} of them with no "
            "class digit (counted as wrong).")  # fmt: skip
    print("\n" + table + note)
    atomic_write_text(out / "results.md", table + "\n" + note + "\n")
    atomic_write_text(
        out / "results.json",
        json.dumps([dict(zip(["method", "score", "trainable", "seconds"], r[:4])) for r in rows], indent=1),
    )
    plot = _plot(rows, out / "demo.png", task=args.task)
    print(f"\nwrote {out / 'results.md'}" + (f" and {plot}" if plot else ""))
    return 0
