"""Summarise study.jsonl files (scripts/study.py) into a Markdown table, a plot and the papers' claims.

    python scripts/summarize_study.py runs/study/study.jsonl --plot runs/study.png --claims > runs/summary.md

Per (model, task, method): the best learning rate (highest mean validation score over the seeds that every LR of
the cell was run with: seed 0 of the sweep in scripts/study.py), the validation score of each LR tried, and the test
score at the best LR, mean ± std over its seeds. Cells of the study's plan (the file's first line) with no result are
listed as not run. --plot: test score against trainable parameters (log x), one panel per model and task.
--claims: the two papers' qualitative claims, each checked per model and task: "supports" when the difference of the
means exceeds the combined std sqrt(sd_a² + sd_b²), "contradicts" when the opposite difference does, else "cannot
tell" (also with fewer than 2 seeds on a side). Older files (no plan, no model field) work too. A file written by
`study.py --resume` (its plan covers the earlier cells) works alone or together with the files it resumed.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

NAMES = {
    "state_offset_h": "SO-h", "state_offset_y": "SO-y", "initial_state": "Initial State", "prefix": "Prefix",
    "prompt": "Prompt", "lora_s6": "LoRA S6", "lora_in_out": "LoRA in/out", "bitfit": "BitFit",
    "additional_scan": "Add.-scan", "sdlora": "SDLoRA", "full": "Full",
}  # fmt: skip


def load(paths: list) -> tuple[dict | None, list[dict]]:
    """(the plan, merged over the files' plan lines, or None; the run rows, each once: a study resumed with
    `study.py --resume` copies the earlier file's rows, so passing both files must not count them twice)."""
    plan, rows, seen = None, [], set()
    for path in paths:
        with open(path) as f:
            for line in f:
                if not line.strip():
                    continue
                r = json.loads(line)
                if r.get("type") == "plan":
                    cells = [tuple(c) for c in r["cells"]]
                    if plan is None:
                        plan = {**r, "cells": cells}
                    else:
                        plan["cells"] += [c for c in cells if c not in plan["cells"]]
                else:
                    # a run is identified by what it trained, not by its timing: two studies resumed from one file
                    # that both ran the same missing run must not count it twice (the first successful row wins)
                    key = (r.get("model"), r.get("task"), r.get("method"), r.get("lr"), r.get("seed"))
                    if key in seen and "error" not in r:
                        continue
                    if "error" not in r:
                        seen.add(key)
                    rows.append(r)
    return plan, rows


def _ok(r: dict) -> bool:
    return "error" not in r and isinstance(r.get("val"), (int, float)) and math.isfinite(r["val"])


def best_lr(rows: list[dict]) -> dict | None:
    """The LR with the highest mean validation score over the seeds common to every LR tried; ties go to the scale
    nearest 1, then the lower LR. Returns {lr, scale, val, sweep: {lr: that score}} or None when no run succeeded."""
    by_lr: dict[float, list[dict]] = defaultdict(list)
    for r in filter(_ok, rows):
        by_lr[r["lr"]].append(r)
    if not by_lr:
        return None
    common = set.intersection(*({r["seed"] for r in rs} for rs in by_lr.values()))
    scored, sweep = [], {}
    for lr, rs in sorted(by_lr.items()):
        sweep[lr] = statistics.mean([r["val"] for r in rs if r["seed"] in common] or [r["val"] for r in rs])
        scale = rs[0].get("scale", 1.0)
        scored.append((-sweep[lr], abs(math.log(scale)) if scale > 0 else 0.0, lr, scale))
    _, _, lr, scale = min(scored)
    return {"lr": lr, "scale": scale, "val": sweep[lr], "sweep": sweep}


def summarize(rows: list[dict]) -> dict[tuple, dict]:
    """(model, task, method) -> best LR, its val score, test mean / std / n over seeds, the sweep, errors."""
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        cells[(r.get("model", ""), r["task"], r["method"])].append(r)
    out = {}
    for cell, rs in cells.items():
        errors = [r for r in rs if not _ok(r)]
        best = best_lr(rs)
        entry = {"errors": len(errors), "error": errors[-1].get("error") if errors else None, "best": best}
        if best is not None:
            at = [r for r in rs if _ok(r) and r["lr"] == best["lr"]]
            test = [r["test"] for r in at]
            entry |= {"test": statistics.mean(test), "sd": statistics.stdev(test) if len(test) > 1 else None,
                      "n": len(test), "seeds": sorted(r["seed"] for r in at), "trainable": at[0]["trainable"],
                      "sweep": best["sweep"]}  # fmt: skip
        out[cell] = entry
    return out


def short(model: str) -> str:
    return model.split(":")[-1].split("/")[-1] or "-"


def _pm(e: dict | None) -> str:
    if not e or e.get("best") is None:
        return "-"
    return f"{e['test']:.3f} ± {e['sd']:.3f}" if e["sd"] is not None else f"{e['test']:.3f} (1 seed)"


def table(summary: dict[tuple, dict], plan: dict | None) -> str:
    """Markdown: one row per cell, in plan order; planned cells without results say so."""
    order = list(plan["cells"]) if plan else []
    order += [c for c in summary if c not in order]
    n_lrs = len(plan["lr_scales"]) if plan else None
    n_seeds = len(plan["seeds"]) if plan else None
    head = "| model | task | method | trainable | best LR | val score per LR tried | val | test (mean ± std) | seeds | note |"
    lines = [head, "|---|---|---|---:|---:|---|---:|---:|---:|---|"]
    missing = []
    for cell in order:
        model, task, method = cell
        e = summary.get(cell)
        head = f"| {short(model)} | {task} | {method} |"
        if e is None or e["best"] is None:
            note = "not run" if e is None else f"{e['errors']} failed: {(e['error'] or '')[:80]}"
            missing.append(cell)
            lines.append(f"{head} | | | | | | {note} |")
            continue
        lrs = list(e["sweep"])
        sweep = ", ".join(f"{'**' if lr == e['best']['lr'] else ''}{lr:.2g}: {v:.3f}{'**' if lr == e['best']['lr'] else ''}"
                          for lr, v in e["sweep"].items())  # fmt: skip
        notes = []
        if n_lrs and len(lrs) < n_lrs:
            notes.append(f"{len(lrs)}/{n_lrs} LRs")
        if len(lrs) > 2 and e["best"]["lr"] in (lrs[0], lrs[-1]):
            notes.append("best LR at the sweep's edge")
        if n_seeds and e["n"] < n_seeds:
            notes.append(f"{e['n']}/{n_seeds} seeds")
        if e["errors"]:
            notes.append(f"{e['errors']} failed")
        lines.append(f"{head} {e['trainable']:,d} | {e['best']['lr']:.2g} | {sweep} | {e['best']['val']:.3f} | "
                     f"{_pm(e)} | {e['n']} | {'; '.join(notes)} |")  # fmt: skip
    if missing:
        lines.append(f"\nNo result for {len(missing)} of {len(order)} cells: "
                     + ", ".join(f"{short(m)}/{t}/{k}" for m, t, k in missing))  # fmt: skip
    return "\n".join(lines)


def plot(summary: dict[tuple, dict], path: str) -> None:
    """Test score (mean ± std over seeds) against trainable parameters, one panel per (model, task)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = {c: e for c, e in summary.items() if e["best"] is not None}
    models = list(dict.fromkeys(c[0] for c in done)) or [""]
    tasks = list(dict.fromkeys(c[1] for c in done)) or [""]
    fig, axes = plt.subplots(len(models), len(tasks), figsize=(4.2 * len(tasks), 3.4 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        for j, task in enumerate(tasks):
            ax = axes[i][j]
            pts = [(c[2], e) for c, e in done.items() if c[0] == model and c[1] == task]
            ax.set_title(f"{short(model)} / {task}", fontsize=9)
            if not pts:
                ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)
                continue
            for method, e in pts:
                hollow = "white" if e["n"] < 2 else None  # one seed: no spread to show
                color = plt.cm.tab20(list(NAMES).index(method) if method in NAMES else 19)  # one colour per method
                ax.errorbar([e["trainable"]], [e["test"]], yerr=[e["sd"] or 0.0], fmt="o", capsize=3, color=color,
                            mfc=hollow or color)  # fmt: skip
                ax.annotate(NAMES.get(method, method), (e["trainable"], e["test"]), textcoords="offset points",
                            xytext=(4, 3), fontsize=7)  # fmt: skip
            ax.set_xscale("log")
            ax.grid(alpha=0.3)
            ax.set_xlabel("trainable parameters", fontsize=8)
            ax.set_ylabel("test ROUGE-L" if task == "wn-define" else "test accuracy", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -------------------------------------------------------------------------------------------------------------- claims


def _q(summary: dict, model: str, task: str, methods: tuple[str, ...]) -> dict | None:
    """The best (highest test mean) of these methods in one cell, as {label, mean, sd, n}; None if none was run."""
    found = [(m, summary.get((model, task, m))) for m in methods]
    found = [(m, e) for m, e in found if e and e["best"] is not None]
    if not found:
        return None
    m, e = max(found, key=lambda me: me[1]["test"])
    return {"label": NAMES.get(m, m), "mean": e["test"], "sd": e["sd"] or 0.0, "n": e["n"]}


def _drop(summary: dict, model: str, method: str, short_task: str, long_task: str) -> dict | None:
    a, b = _q(summary, model, short_task, (method,)), _q(summary, model, long_task, (method,))
    if a is None or b is None:
        return None
    return {"label": f"{a['label']} drop", "mean": a["mean"] - b["mean"], "sd": math.hypot(a["sd"], b["sd"]),
            "n": min(a["n"], b["n"])}  # fmt: skip


def verdict(a: dict, b: dict) -> str:
    """Whether "a > b" is supported: the difference must exceed the combined std, and both sides need 2+ seeds."""
    if min(a["n"], b["n"]) < 2:
        return "cannot tell (1 seed)"
    diff, comb = a["mean"] - b["mean"], math.hypot(a["sd"], b["sd"])
    return "supports" if diff > comb else "contradicts" if -diff > comb else "cannot tell"


STATE = ("state_offset_h", "state_offset_y")
PROMPT = ("prefix", "prompt")
LORA = ("lora_in_out", "lora_s6")
OTHER_PEFT = ("state_offset_h", "state_offset_y", "initial_state", "prefix", "prompt", "bitfit", "additional_scan")


def claim_rows(summary: dict[tuple, dict]) -> list[dict]:
    """One row per claim and cell where both sides were run: {claim, where, a, b, verdict}."""
    pairs = sorted({(c[0], c[1]) for c, e in summary.items() if e["best"] is not None})
    models = list(dict.fromkeys(m for m, _ in pairs))
    specs = [  # (claim, side a, side b): the claim is "a > b"
        ("state-based (best of SO-h, SO-y) beats prompt-based (best of prefix, prompt)", STATE, PROMPT),
        ("SO-h beats Initial State", ("state_offset_h",), ("initial_state",)),
        ("SO-h beats SO-y", ("state_offset_h",), ("state_offset_y",)),
        ("LoRA on linear projections (in/out) beats LoRA on the S6 projections", ("lora_in_out",), ("lora_s6",)),
        ("SDLoRA beats LoRA (in/out)", ("sdlora",), ("lora_in_out",)),
        ("LoRA (best variant) beats the other PEFT methods (best of them)", LORA, OTHER_PEFT),
    ]
    rows = []
    for claim, sa, sb in specs:
        for model, task in pairs:
            a, b = _q(summary, model, task, sa), _q(summary, model, task, sb)
            if a and b:
                rows.append({"claim": claim, "where": f"{short(model)} / {task}", "a": a, "b": b,
                             "verdict": verdict(a, b)})  # fmt: skip
    for method in ("initial_state", "prefix"):  # decay: a prompt-like start loses more over a long input than SO-h
        claim = f"{NAMES[method]} loses more than SO-h from wn-pos to wn-pos-long"
        for model in models:
            a = _drop(summary, model, method, "wn-pos", "wn-pos-long")
            b = _drop(summary, model, "state_offset_h", "wn-pos", "wn-pos-long")
            if a and b:
                rows.append({"claim": claim, "where": short(model), "a": a, "b": b, "verdict": verdict(a, b)})
    return rows


def claims(summary: dict[tuple, dict]) -> str:
    rows = claim_rows(summary)

    def fmt(q: dict) -> str:
        return f"{q['label']} {q['mean']:.3f} ± {q['sd']:.3f} (n={q['n']})"

    lines = ["| claim | model / task | a | b | a − b | combined std | verdict |", "|---|---|---|---|---:|---:|---|"]
    for r in rows:
        a, b = r["a"], r["b"]
        lines.append(f"| {r['claim']} | {r['where']} | {fmt(a)} | {fmt(b)} | {a['mean'] - b['mean']:+.3f} | "
                     f"{math.hypot(a['sd'], b['sd']):.3f} | {r['verdict']} |")  # fmt: skip
    lines += ["", "| claim | supports | contradicts | cannot tell |", "|---|---:|---:|---:|"]
    for claim in dict.fromkeys(r["claim"] for r in rows):
        vs = [r["verdict"] for r in rows if r["claim"] == claim]
        lines.append(f"| {claim} | {vs.count('supports')} | {vs.count('contradicts')} | "
                     f"{sum(v.startswith('cannot') for v in vs)} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--plot", help="write a PNG of test score vs trainable parameters")
    ap.add_argument("--claims", action="store_true", help="also print the claims table")
    opts = ap.parse_args()
    plan, rows = load([Path(p) for p in opts.files])
    summary = summarize([r for r in rows if "task" in r])
    print(table(summary, plan))
    if opts.claims:
        print("\nClaims (test score at each method's best LR; a verdict needs |a − b| > combined std, 2+ seeds):\n")
        print(claims(summary))
    if opts.plot:
        plot(summary, opts.plot)


if __name__ == "__main__":
    main()
