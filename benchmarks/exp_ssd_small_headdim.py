"""Experiment: the SSD backward's illegal address at head dim 16 (docs/kernels-mamba2.md, session 8).

Each case runs in its own process (a fault poisons the CUDA context) with ``CUDA_LAUNCH_BLOCKING=1``: the Triton SSD
forward + backward, fp32, D, z, dt_bias, softplus, h0 and h', at (P, N, G, L) with the dx / dC kernels on BWD_WARPS
warps, against the torch chunked path in fp32. A case reports ok, mismatch (max relative error) or fault.

    PYTHONPATH=. python3 benchmarks/exp_ssd_small_headdim.py --out /tmp/ssd_small_headdim.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time

# (P, N, G, L): the three that faulted in session 8, a short and a chunk-multiple length, and two controls
CASES = [(16, 16, 2, 300), (16, 16, 1, 300), (16, 32, 2, 300), (16, 16, 2, 64), (16, 16, 2, 256), (32, 64, 2, 300),
         (64, 128, 1, 300)]  # fmt: skip
WARPS = (8, 4)


def child(p: int, n: int, g: int, seqlen: int, warps: int) -> dict:
    import torch

    from ssmtune.ops.ssd import chunk, fused

    fused.SSD_MIN_HEADDIM_CUDA = 1  # the refusal is what this experiment questions
    fused.BWD_WARPS = warps
    torch.manual_seed(0)
    dev = "cuda"
    b, h = 2, 4
    ins = {
        "x": torch.randn(b, seqlen, h, p, device=dev),
        "dt": torch.randn(b, seqlen, h, device=dev) * 0.5,
        "A": -torch.rand(h, device=dev) - 0.5,
        "B": torch.randn(b, seqlen, g, n, device=dev),
        "C": torch.randn(b, seqlen, g, n, device=dev),
        "D": torch.randn(h, device=dev),
        "z": torch.randn(b, seqlen, h, p, device=dev),
        "dt_bias": torch.randn(h, device=dev) * 0.1,
        "initial_state": torch.randn(b, h, p, n, device=dev),
        "state_offset": torch.randn(h, p, n, device=dev),
    }
    gy = torch.randn(b, seqlen, h, p, device=dev)
    out = {}
    for name, fn in (("torch", chunk.ssd_scan_torch), ("triton", fused.ssd_scan_triton)):
        leaves = {k: v.clone().requires_grad_() for k, v in ins.items()}
        args = [leaves[k] for k in ("x", "dt", "A", "B", "C")]
        kw = {k: leaves[k] for k in ("D", "z", "dt_bias", "initial_state", "state_offset")}
        y = fn(*args, chunk_size=64, dt_softplus=True, **kw)
        (y * gy).sum().backward()
        torch.cuda.synchronize()
        out[name] = {"y": y.detach()} | {f"d{k}": v.grad for k, v in leaves.items()}
    err = {k: ((out["triton"][k] - out["torch"][k]).norm() / out["torch"][k].norm().clamp_min(1e-30)).item()
           for k in out["torch"]}  # fmt: skip
    return {"max_rel_err": max(err.values()), "worst": max(err, key=err.get)}


def run_case(case: tuple[int, int, int, int], warps: int, timeout_s: float) -> dict:
    p, n, g, seqlen = case
    row = {"P": p, "N": n, "G": g, "L": seqlen, "warps": warps}
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    cmd = [sys.executable, __file__, "--child", f"{p},{n},{g},{seqlen},{warps}"]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return row | {"status": "timeout", "s": timeout_s}
    row["s"] = round(time.perf_counter() - t0, 1)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or [""]
        return row | {"status": "fault" if "illegal" in r.stderr.lower() else f"rc={r.returncode}", "error": tail[0]}
    res = json.loads(r.stdout.strip().splitlines()[-1])
    return row | res | {"status": "ok" if res["max_rel_err"] < 1e-2 else "mismatch"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="ssd_small_headdim.json")
    ap.add_argument("--jobs", type=int, default=4, help="cases run at once (separate processes)")
    ap.add_argument("--timeout-s", type=float, default=120.0)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*map(int, args.child.split(",")))))
        return
    jobs = [(c, w) for c in CASES for w in WARPS]
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as ex:
        rows = list(ex.map(lambda cw: run_case(cw[0], cw[1], args.timeout_s), jobs))
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"{'P':>3} {'N':>4} {'G':>2} {'L':>4} {'warps':>5}  status    max rel err")
    for r in rows:
        err = f"{r['max_rel_err']:.1e} ({r['worst']})" if "max_rel_err" in r else r.get("error", "")[:60]
        print(f"{r['P']:>3} {r['N']:>4} {r['G']:>2} {r['L']:>4} {r['warps']:>5}  {r['status']:<8}  {err}")


if __name__ == "__main__":
    main()
