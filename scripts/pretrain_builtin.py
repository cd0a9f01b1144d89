"""Pretrain the built-in base models (how the shipped ones were made) on a GPU within a time budget.

    python scripts/pretrain_builtin.py --corpus out/wordnet-corpus.txt --out runs/models --budget-s 200

For each recipe in recipes/builtin/: time a few optimizer steps on the backends in --backends order (the first one
that runs wins), set max_steps so that training fits the budget, run `ssmtune pretrain`, then cast the weights to
bf16 (A_log and D stay fp32) to keep the shipped files small.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch

from ssmtune.cli.args import PretrainArgs, build, load_recipe
from ssmtune.cli.commands import pretrain
from ssmtune.models import causal_lm_for, load_model
from ssmtune.models.config import Mamba2Config, MambaConfig


def probe(args: PretrainArgs, backend: str, steps: int = 6) -> float:
    """Seconds per optimizer step of the recipe's model on this device."""
    s = args.shape
    common = {"d_model": s.d_model, "n_layer": s.n_layer, "d_state": s.d_state, "vocab_size": 264}
    config = MambaConfig(**common) if s.arch == "mamba" else Mamba2Config(**common, headdim=s.headdim)
    model = causal_lm_for(config).cuda()
    model.backend = backend
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 256, (args.train.batch_size, args.seq_len), device="cuda")
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times[2:])[len(times[2:]) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=200.0, help="training seconds per model")
    ap.add_argument("--backends", default="triton,torch")
    ap.add_argument("--recipes", default="recipes/builtin/mamba-tiny.yaml,recipes/builtin/mamba2-tiny.yaml")
    opts = ap.parse_args()
    summary = {}
    for recipe in opts.recipes.split(","):
        name = Path(recipe).stem
        values = load_recipe(recipe, PretrainArgs)
        values.update({"corpus": opts.corpus, "out": str(Path(opts.out) / name)})
        args = build(PretrainArgs, values)
        for backend in opts.backends.split(","):
            try:
                step_s = probe(args, backend)
                break
            except Exception:  # noqa: BLE001 - try the next backend, but show why
                traceback.print_exc()
        else:
            raise RuntimeError(f"{name}: no backend ran")
        args.backend = backend
        args.train.max_steps = max(50, int(opts.budget_s / step_s))
        print(f"{name}: backend={backend} step={step_s * 1e3:.1f} ms -> max_steps={args.train.max_steps}", flush=True)
        t0 = time.perf_counter()
        pretrain(args)
        wall = time.perf_counter() - t0
        model = load_model(args.out)
        for pname, p in model.named_parameters():
            if not pname.endswith(("A_log", ".D")):
                p.data = p.data.to(torch.bfloat16)
        model.save_pretrained(args.out)
        summary[name] = {"backend": backend, "step_ms": step_s * 1e3, "max_steps": args.train.max_steps,
                         "wall_s": wall, "tokens": args.train.max_steps * args.train.batch_size * args.seq_len,
                         "device": torch.cuda.get_device_name(), "torch": torch.__version__}  # fmt: skip
        print(json.dumps(summary[name]), flush=True)
    (Path(opts.out) / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
