"""The method study on the built-in base models and tasks (issue #7): every method, every task, seeds, LRs.

    PYTHONPATH=. python3 scripts/study.py --out runs/study --tasks wn-pos,wn-pos-long --seeds 0 --max-seconds 280

Each run goes through `ssmtune train` (validation accuracy every epoch, best epoch kept), then its final adapter is
scored on the test split. Results: <out>/study.jsonl (one line per run) and a Markdown table printed last.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

# method label -> (registered method, options, learning rate)
METHODS: dict[str, tuple[str, dict, float]] = {
    "state_offset_h": ("state_offset_h", {}, 2e-3),
    "state_offset_y": ("state_offset_y", {}, 4e-3),
    "initial_state": ("initial_state", {}, 4e-3),
    "prefix": ("prefix", {"num_virtual_tokens": 16}, 1e-2),
    "prompt": ("prompt", {"num_virtual_tokens": 16}, 1e-2),
    "lora_s6": ("lora", {"r": 8, "target_modules": ["x_proj", "dt_proj"]}, 4e-3),
    "lora_in_out": ("lora", {"r": 8, "target_modules": ["in_proj", "out_proj"]}, 4e-3),
    "bitfit": ("bitfit", {}, 4e-3),
    "additional_scan": ("additional_scan", {"n_states": 8}, 4e-3),
    "sdlora": ("sdlora", {"warmup_steps": 40}, 2e-3),
    "full": ("full", {}, 5e-4),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/study")
    ap.add_argument("--model", default="builtin:mamba-tiny")
    ap.add_argument("--tasks", default="wn-pos,wn-pos-long")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--lr-scales", default="1", help="each method's LR times these factors (a small sweep)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-examples", type=int, default=None, help="training examples per task (smoke tests)")
    ap.add_argument("--eval-examples", type=int, default=None)
    ap.add_argument("--max-seconds", type=float, default=1e9, help="start no new run after this")
    opts = ap.parse_args()

    from ssmtune.cli.args import TrainArgs, build
    from ssmtune.cli.commands import load_base_model, load_tokenizer_for, train
    from ssmtune.core.io import load_adapter
    from ssmtune.data import TaskConfig
    from ssmtune.eval.evaluate import EvalConfig, evaluate

    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer_for(None, opts.model)
    start = time.perf_counter()
    rows = []
    for task in opts.tasks.split(","):
        for label in opts.methods.split(","):
            method, margs, lr0 = METHODS[label]
            for scale in [float(s) for s in opts.lr_scales.split(",")]:
                for seed in [int(s) for s in opts.seeds.split(",")]:
                    if time.perf_counter() - start > opts.max_seconds:
                        print(f"budget spent: skipping {task}/{label}/x{scale}/seed{seed}", flush=True)
                        continue
                    name = f"{task}-{label}-x{scale:g}-s{seed}"
                    values = {
                        "model": opts.model, "method": method, "method_args": margs, "data.task": task, "data.max_examples": opts.max_examples,
                        "eval.max_examples": opts.eval_examples,
                        "train.lr": lr0 * scale, "train.epochs": opts.epochs, "train.batch_size": opts.batch_size,
                        "train.seed": seed, "train.save_steps": 0, "train.progress": False, "train.resume": False,
                        "train.best_metric": "accuracy", "eval.split": "validation", "eval.batch_size": 32,
                        "out_dir": str(out), "name": name,
                    }  # fmt: skip
                    t0 = time.perf_counter()
                    try:
                        summary = train(build(TrainArgs, values))
                        best = out / name / "best"
                        if method == "full":
                            from ssmtune.models import load_model

                            tuned = load_model(best if best.exists() else out / name / "final")
                        else:
                            tuned = load_adapter(
                                load_base_model(opts.model), best if best.exists() else out / name / "final"
                            )
                        dev = "cuda" if __import__("torch").cuda.is_available() else "cpu"
                        test = evaluate(
                            tuned.to(dev),
                            tok,
                            TaskConfig(task=task),
                            EvalConfig(split="test", batch_size=32, max_examples=opts.eval_examples),
                        )
                        row = {"task": task, "method": label, "lr": lr0 * scale, "seed": seed,
                               "trainable": summary["trainable_params"], "total": summary["total_params"],
                               "val": summary["best_value"], "test": test["score"], "seconds": time.perf_counter() - t0}  # fmt: skip
                    except Exception as e:  # noqa: BLE001 - one failed run must not lose the others
                        row = {"task": task, "method": label, "lr": lr0 * scale, "seed": seed, "error": repr(e)[:300]}
                    rows.append(row)
                    with open(out / "study.jsonl", "a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(json.dumps(row), flush=True)
    print("\n| task | method | lr | seed | trainable | val acc | test acc | s |\n|---|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['task']} | {r['method']} | {r['lr']:g} | {r['seed']} | error: {r['error'][:80]} | | | |")
        else:
            print(
                f"| {r['task']} | {r['method']} | {r['lr']:g} | {r['seed']} | {r['trainable']:,d} | {r['val']:.3f} | "
                f"{r['test']:.3f} | {r['seconds']:.0f} |"
            )


if __name__ == "__main__":
    main()
