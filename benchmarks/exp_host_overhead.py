"""Where the host time of an eager training step goes (issue #4: the eager 4 x 512 Mamba-1 step is host-bound).

Builds bench_train_step.py's ssmtune variant (and mamba_ssm's bare model when it imports), warms it up, times the step
with a sync after each (wall) and without one (the host's enqueue time, while the GPU queue has room), then runs
cProfile over a few steps and prints the functions with the most own time. CUDA only; run on the GPU machine:

    PYTHONPATH=. python3 benchmarks/exp_host_overhead.py --out $OUT/host_overhead.json
    PYTHONPATH=/tmp/mamba_site:. python3 benchmarks/exp_host_overhead.py --stacks ssmtune mamba_ssm

Results go to docs/benchmarks.md; this script measures, it does not pass or fail.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_train_step as bts


def measure(stack: str, model: str, method: str, batch: int, seqlen: int, steps: int, top: int) -> dict:
    device = torch.device("cuda")
    backend = "auto" if stack == "ssmtune" else "unfused"
    v = bts.Variant(stack, model, method if stack == "ssmtune" else "none", backend, batch, seqlen)
    build = bts.build_ssmtune if stack == "ssmtune" else bts.build_mamba_ssm
    net, _ = build(v, "130m", device)
    ids = bts.make_batch(batch, seqlen, bts.ssmtune_config(model, "130m").vocab_size, device)
    step, _ = bts.make_step(v, net, ids)
    for _ in range(3):  # compiles, autotuning, allocator warm-up
        step()
    torch.cuda.synchronize()

    t0 = time.perf_counter()
    for _ in range(steps):
        step()
        torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) / steps * 1e3

    # enqueue time: no sync inside the loop (the queue of a 4 x 512 step does not fill up in a few steps)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    host_ms = (time.perf_counter() - t0) / steps * 1e3
    torch.cuda.synchronize()

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    res = {"stack": stack, "model": model, "method": v.method, "batch": batch, "seqlen": seqlen,
           "wall_ms": wall_ms, "host_enqueue_ms": host_ms, "profile": buf.getvalue()}  # fmt: skip
    del net, step
    torch.cuda.empty_cache()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stacks", nargs="+", default=["ssmtune"], choices=["ssmtune", "mamba_ssm"])
    ap.add_argument("--model", default="mamba", choices=["mamba", "mamba2"])
    ap.add_argument("--method", default="state_offset_h")
    ap.add_argument("--size", default="4x512", help="BxL")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--top", type=int, default=25, help="functions printed per profile")
    ap.add_argument("--out", type=Path, default=Path("host_overhead.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("exp_host_overhead.py needs CUDA")
    batch, seqlen = (int(x) for x in args.size.lower().split("x"))
    rows = []
    for stack in args.stacks:
        if stack == "mamba_ssm" and bts.mamba_ssm_missing():
            print(f"mamba_ssm: {bts.mamba_ssm_missing()}")
            continue
        r = measure(stack, args.model, args.method, batch, seqlen, args.steps, args.top)
        rows.append(r)
        args.out.write_text(json.dumps(rows, indent=1))
        print(r["profile"])
    for r in rows:
        print(f"{r['stack']:9} {r['model']} {r['method']:15} {r['batch']}x{r['seqlen']}: wall {r['wall_ms']:.1f} ms, "
              f"host enqueue {r['host_enqueue_ms']:.1f} ms per step")  # fmt: skip


if __name__ == "__main__":
    main()
