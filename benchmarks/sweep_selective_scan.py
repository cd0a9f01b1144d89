"""Tile-configuration sweep of the Triton Mamba-1 scan (`fused.CONFIG_OVERRIDE`), used to pick `fused._config`.

    PYTHONPATH=. python3 benchmarks/sweep_selective_scan.py --out $OUT/sweep_selective_scan.json

Each configuration is first checked against the fp32 reference (outputs, final state, every gradient; a multi-tile
length), then timed (forward, forward + backward; B 8, L 2048, N 16, bf16, D 1536; "peer" = D, z, delta_bias,
softplus; "all" = peer + h0, h', y'). The winner goes into `_config`; the main benchmark is bench_selective_scan.py.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import triton
from triton.testing import do_bench

from ssmtune.ops.selective_scan import fused
from ssmtune.ops.selective_scan.naive import selective_scan_ref

PEER = ("D", "z", "delta_bias")
ALL = PEER + ("initial_state", "state_offset", "y_offset")
# ALGO 0: tile kernels (the earlier default); ALGO 1: n-loop kernels
CONFIGS = [
    {"ALGO": 0},
    {"ALGO": 1},
    {"ALGO": 1, "BLOCK_L": 128, "WARPS_FWD": 1, "WARPS_BWD": 1},
    {"ALGO": 1, "BLOCK_L": 128, "WARPS_FWD": 2, "WARPS_BWD": 2},
    {"ALGO": 1, "BLOCK_L": 256, "WARPS_FWD": 2, "WARPS_BWD": 4},
    {"ALGO": 1, "BLOCK_L": 512, "WARPS_FWD": 4, "WARPS_BWD": 4},
    {"ALGO": 1, "BLOCK_L": 512, "WARPS_FWD": 2, "WARPS_BWD": 2},
]


def make_inputs(b, d, seqlen, n, dtype, flags, dev="cuda"):
    ins = {
        "u": torch.randn(b, d, seqlen, device=dev, dtype=dtype),
        "delta": (0.5 * torch.randn(b, d, seqlen, device=dev) - 2.0).to(dtype),
        "A": -torch.rand(d, n, device=dev) * 4 - 0.1,
        "B": torch.randn(b, n, seqlen, device=dev, dtype=dtype),
        "C": torch.randn(b, n, seqlen, device=dev, dtype=dtype),
        "D": torch.randn(d, device=dev),
        "z": torch.randn(b, d, seqlen, device=dev, dtype=dtype),
        "delta_bias": 0.1 * torch.randn(d, device=dev),
        "initial_state": torch.randn(d, n, device=dev),
        "state_offset": torch.randn(d, n, device=dev),
        "y_offset": torch.randn(d, device=dev),
    }
    return {k: v for k, v in ins.items() if k in ("u", "delta", "A", "B", "C") or k in flags}


def check() -> float:
    """Worst RMS-relative error (fp32, all flags, L spanning several tiles) against the reference."""
    torch.manual_seed(0)
    ins = make_inputs(2, 70, 2100, 16, torch.float32, ALL)
    res = []
    for f in (selective_scan_ref, fused.selective_scan_triton):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in ins.items()}
        y, h = f(**leaves, delta_softplus=True, return_final_state=True)
        (y * torch.cos(y.detach())).sum().add(h.sum()).backward()
        res.append([y, h] + [v.grad for v in leaves.values()])
    errs = [((o.float() - r.float()).norm() / r.float().norm().clamp_min(1e-30)).item() for r, o in zip(*res)]
    return float("nan") if any(math.isnan(e) for e in errs) else max(errs)


def time_case(ins) -> tuple[float, float]:
    fn = fused.selective_scan_triton
    with torch.no_grad():
        fwd = do_bench(lambda: fn(**ins, delta_softplus=True), return_mode="median")
    leaves = {k: v.detach().requires_grad_() for k, v in ins.items()}
    dy = torch.randn_like(ins["u"])
    fb = do_bench(lambda: fn(**leaves, delta_softplus=True).backward(dy), grad_to_none=list(leaves.values()),
                  return_mode="median")  # fmt: skip
    return fwd, fb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="sweep_selective_scan.json")
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--max-seconds", type=float, default=200)
    args = ap.parse_args()
    t0 = time.time()
    rows = []
    peer = make_inputs(8, args.dim, 2048, 16, torch.bfloat16, PEER)
    full = make_inputs(8, args.dim, 2048, 16, torch.bfloat16, ALL)
    for cfg in CONFIGS:
        if time.time() - t0 > args.max_seconds:
            rows.append({"config": cfg, "skipped": "time"})
            continue
        fused.CONFIG_OVERRIDE = dict(cfg)
        row = {"config": cfg, "resolved": fused._config(args.dim, 16, 2048)}
        try:
            row["err"] = check()
            if row["err"] < 1e-4:
                row["peer_fwd_ms"], row["peer_fb_ms"] = time_case(peer)
                row["all_fwd_ms"], row["all_fb_ms"] = time_case(full)
        except Exception as e:  # noqa: BLE001  (a configuration that fails to compile is reported, not fatal)
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    fused.CONFIG_OVERRIDE = {}
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "shape": {"B": 8, "L": 2048, "N": 16, "D": args.dim, "dtype": "bf16"}, "rows": rows}  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\n{'config':<80} {'err':>8} {'peer f':>7} {'peer fb':>8} {'all f':>7} {'all fb':>8}")
    for r in rows:
        if "peer_fwd_ms" in r:
            print(f"{json.dumps(r['config']):<80} {r['err']:8.1e} {r['peer_fwd_ms']:7.3f} {r['peer_fb_ms']:8.3f}"
                  f" {r['all_fwd_ms']:7.3f} {r['all_fb_ms']:8.3f}")  # fmt: skip
        else:
            print(f"{json.dumps(r['config']):<80} {r.get('err', r.get('error', r.get('skipped')))}")


if __name__ == "__main__":
    main()
