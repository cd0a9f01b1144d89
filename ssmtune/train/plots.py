"""PNG plots of a run's metrics.jsonl (loss and evaluation curves) and of a method comparison.

matplotlib is optional: without it the plots are skipped with one warning.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

from ssmtune.utils.io import atomic_write


def save_figure(fig, path: str | Path) -> None:
    """``fig.savefig`` through a temporary file (the format follows ``path``'s suffix, default png)."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format=fmt))


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: skipping plots (pip install matplotlib)", stacklevel=3)
        return None
    return plt


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write ``loss.png`` (training loss, and evaluation loss when present) and ``eval.png`` (other eval metrics)."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    if not train or (plt := pyplot()) is None:
        return []
    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1)
    if any("loss" in r for r in evals):
        ev = [r for r in evals if "loss" in r]
        ax.plot([r["step"] for r in ev], [r["loss"] for r in ev], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, run_dir / "loss.png")
    plt.close(fig)
    written.append(run_dir / "loss.png")
    keys = sorted({k for r in evals for k, v in r.items() if isinstance(v, (int, float))} - {"step", "epoch", "loss"})
    if keys:
        fig, ax = plt.subplots(figsize=(6, 4))
        for k in keys:
            pts = [r for r in evals if k in r]
            ax.plot([r["step"] for r in pts], [r[k] for r in pts], "o-", label=k)
        ax.set_xlabel("step")
        ax.set_ylabel("eval metric")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        save_figure(fig, run_dir / "eval.png")
        plt.close(fig)
        written.append(run_dir / "eval.png")
    return written


def plot_comparison(
    names: Sequence[str], params: Sequence[float], scores: Sequence[float], *, metric: str, path: str | Path
) -> Path | None:
    """Score vs trainable parameters (log x), one labelled point per run."""
    if (plt := pyplot()) is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, x, y in zip(names, params, scores, strict=True):
        ax.scatter([max(x, 1)], [y])
        ax.annotate(name, (max(x, 1), y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return Path(path)
