"""Summarise study.jsonl files (scripts/study.py) into a Markdown table (mean ± std over seeds) and a plot of test
score against trainable parameters.

    python scripts/summarize_study.py docs/img/study-cpu-mamba2.jsonl --plot docs/img/study-cpu-mamba2.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--plot", help="write a PNG of test score vs trainable parameters")
    opts = ap.parse_args()
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for path in opts.files:
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                if "error" not in r:
                    groups[(r["task"], r["method"])].append(r)
    print("| task | method | trainable | seeds | val acc | test acc (mean ± std) |\n|---|---|---:|---:|---:|---:|")
    points = []
    for (task, method), rows in groups.items():
        test = [r["test"] for r in rows]
        val = [r["val"] for r in rows]
        sd = statistics.stdev(test) if len(test) > 1 else 0.0
        print(f"| {task} | {method} | {rows[0]['trainable']:,d} | {len(rows)} | {statistics.mean(val):.3f} | "
              f"{statistics.mean(test):.3f} ± {sd:.3f} |")  # fmt: skip
        points.append((task, method, rows[0]["trainable"], statistics.mean(test), sd))
    if opts.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for task in sorted({p[0] for p in points}):
            pts = [p for p in points if p[0] == task]
            ax.errorbar([p[2] for p in pts], [p[3] for p in pts], yerr=[p[4] for p in pts], fmt="o", label=task,
                        capsize=3)  # fmt: skip
            for p in pts:
                ax.annotate(p[1], (p[2], p[3]), textcoords="offset points", xytext=(4, 3), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(opts.plot, dpi=100)


if __name__ == "__main__":
    main()
