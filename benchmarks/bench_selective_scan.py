"""Benchmark the Triton Mamba-1 selective scan against the reference, the torch backend and mamba_ssm's figures.

Run on the GPU machine:  PYTHONPATH=. python3 benchmarks/bench_selective_scan.py --out results.json
Times are triton.testing.do_bench medians (ms). Bandwidth fractions use the minimum bytes an op must move (inputs read
once, outputs written once) against the device-to-device copy bandwidth measured in the same run.
Every tile configuration is checked against the fp32 reference before it is timed.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import triton
from triton.testing import do_bench

from ssmtune.ops.selective_scan import fused
from ssmtune.ops.selective_scan.naive import selective_scan_ref
from ssmtune.ops.testing import rel_err

try:
    from ssmtune.ops.selective_scan.parallel import selective_scan_torch
except ImportError:
    selective_scan_torch = None

# mamba_ssm 2.3.2.post1 CUDA selective_scan_fn on an H100, bf16, B=8, L=2048, N=16, with D, z, delta_bias, softplus
# (ECOSYSTEM.md §9): D -> (fwd ms, fwd+bwd ms)
MAMBA_SSM = {1536: (0.481, 3.11), 4096: (1.257, 7.96), 5120: (1.563, 9.85)}
DEVICE = "cuda"
# variant -> optional inputs; "peer" is mamba_ssm's benchmark configuration, "all" adds every state-PEFT input
VARIANTS = {
    "bare": (),
    "peer": ("D", "z", "delta_bias"),
    "all": ("D", "z", "delta_bias", "initial_state", "state_offset", "y_offset"),
}
# tile configurations tried at the first D (CONFIG_OVERRIDE of fused.py); the first is the default. The main table
# uses the one with the fastest forward + backward.
CONFIGS = [
    {},
    {"BLOCK_D_FWD": 4, "BLOCK_D_BWD": 4, "WARPS_FWD": 2, "WARPS_BWD": 2},
    {"BLOCK_D_FWD": 8, "BLOCK_D_BWD": 4, "WARPS_FWD": 2, "WARPS_BWD": 2},
    {"BLOCK_L": 8, "BLOCK_D_FWD": 16, "BLOCK_D_BWD": 8},
    {"BLOCK_D_FWD": 4, "BLOCK_D_BWD": 2, "WARPS_FWD": 4, "WARPS_BWD": 2},
    {"BLOCK_L": 32, "BLOCK_D_FWD": 4, "BLOCK_D_BWD": 2, "WARPS_FWD": 4, "WARPS_BWD": 4},
]


def make_inputs(b: int, d: int, seqlen: int, n: int, dtype: torch.dtype, flags, grad: bool) -> dict:
    """Activations in ``dtype``; A, D, bias, h0, h', y' in fp32 (shared over the batch, as in the model)."""
    dev = DEVICE
    ins = {
        "u": torch.randn(b, d, seqlen, device=dev, dtype=dtype),
        "delta": (0.5 * torch.randn(b, d, seqlen, device=dev) - 2.0).to(dtype),
        "A": -torch.arange(1, n + 1, device=dev, dtype=torch.float32).repeat(d, 1),
        "B": torch.randn(b, n, seqlen, device=dev, dtype=dtype),
        "C": torch.randn(b, n, seqlen, device=dev, dtype=dtype),
        "D": torch.randn(d, device=dev),
        "z": torch.randn(b, d, seqlen, device=dev, dtype=dtype),
        "delta_bias": 0.1 * torch.randn(d, device=dev),
        "initial_state": torch.randn(d, n, device=dev),
        "state_offset": torch.randn(d, n, device=dev),
        "y_offset": torch.randn(d, device=dev),
    }
    ins = {k: v for k, v in ins.items() if k in ("u", "delta", "A", "B", "C") or k in flags}
    return {k: v.requires_grad_(grad) for k, v in ins.items()}


def min_bytes(b: int, d: int, seqlen: int, n: int, itemsize: int, flags, backward: bool) -> int:
    """Bytes an ideal kernel moves: [B, D, L] activations and [B, N, L] B/C read once, outputs written once."""
    act, bc = b * d * seqlen * itemsize, b * n * seqlen * itemsize
    n_act = 2 + ("z" in flags)  # u, delta (, z)
    fwd = (n_act + 1) * act + 2 * bc  # + y
    if not backward:
        return fwd
    return fwd + (n_act + 1) * act + 2 * bc + n_act * act + 2 * bc  # read inputs + dy, write their gradients


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write) on a 1 GiB buffer."""
    x = torch.empty(2**28, device=DEVICE, dtype=torch.float32)
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), return_mode="median")
    return 2 * x.numel() * 4 / (ms * 1e-3)


def time_fwd(fn, ins: dict, final_state: bool) -> float:
    with torch.no_grad():
        return do_bench(lambda: fn(**ins, delta_softplus=True, return_final_state=final_state), return_mode="median")


def time_fwd_bwd(fn, ins: dict, final_state: bool) -> tuple[float, float]:
    """Median ms of forward + backward and the peak memory (GiB) above the inputs."""
    leaves = list(ins.values())
    y = fn(**ins, delta_softplus=True)
    dy = torch.randn_like(y)

    def step():
        out = fn(**ins, delta_softplus=True, return_final_state=final_state)
        (out[0] if final_state else out).backward(dy)

    ms = do_bench(step, grad_to_none=leaves, return_mode="median")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return ms, (torch.cuda.max_memory_allocated() - base) / 2**30


def check(fn) -> float:
    """Worst RMS-relative error over outputs and gradients against the reference on a small all-flags case."""
    torch.manual_seed(0)
    ins = make_inputs(2, 200, 333, 16, torch.float32, VARIANTS["all"], grad=True)
    res = []
    for f in (selective_scan_ref, fn):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in ins.items()}
        y, h = f(**leaves, delta_softplus=True, return_final_state=True)
        (y * torch.cos(y.detach())).sum().add(h.sum()).backward()
        res.append([y, h] + [v.grad for v in leaves.values()])
    return max(rel_err(r, o) for r, o in zip(*res))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_selective_scan.json")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--dstate", type=int, default=16)
    parser.add_argument("--dims", type=int, nargs="+", default=[1536, 4096, 5120])
    parser.add_argument("--no-sweep", action="store_true", help="skip the tile-configuration sweep")
    args = parser.parse_args()
    b, seqlen, n, dtype = args.batch, args.seqlen, args.dstate, torch.bfloat16
    t_start = time.time()
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "shape": {"B": b, "L": seqlen, "N": n, "dtype": "bf16"},
    }
    # warm-up compiles (cold Triton cache on a fresh machine)
    for flags in VARIANTS.values():
        ins = make_inputs(1, 64, 100, n, dtype, flags, grad=True)
        fused.selective_scan_triton(**ins, delta_softplus=True, return_final_state=True)[0].sum().backward()
    bw = copy_bandwidth()
    report["copy_bandwidth_TBps"] = bw / 1e12

    # 1. tile configuration sweep at the smallest D (peer variant); each configuration is verified first
    sweep = []
    if not args.no_sweep:
        d = args.dims[0]
        for cfg in CONFIGS:
            fused.CONFIG_OVERRIDE = dict(cfg)
            err = check(fused.selective_scan_triton)
            row = {"config": cfg, "max_rel_err": err}
            if err < 1e-4:
                ins = make_inputs(b, d, seqlen, n, dtype, VARIANTS["peer"], grad=True)
                row["fwd_ms"] = time_fwd(fused.selective_scan_triton, ins, False)
                row["fwd_bwd_ms"] = time_fwd_bwd(fused.selective_scan_triton, ins, False)[0]
            sweep.append(row)
        timed = [r for r in sweep if "fwd_ms" in r]
        report["sweep"] = sweep
        report["best_fwd_config"] = min(timed, key=lambda r: r["fwd_ms"])["config"]
        report["best_bwd_config"] = min(timed, key=lambda r: r["fwd_bwd_ms"] - r["fwd_ms"])["config"]
        fused.CONFIG_OVERRIDE = dict(min(timed, key=lambda r: r["fwd_bwd_ms"])["config"])
    report["config"] = fused._config(args.dims[0], n)
    report["config_err"] = check(fused.selective_scan_triton)

    # 2. main table (the fastest configuration of the sweep)
    rows = []
    for d in args.dims:
        for name, flags in VARIANTS.items():
            final_state = name == "all"
            ins = make_inputs(b, d, seqlen, n, dtype, flags, grad=True)
            fwd = time_fwd(fused.selective_scan_triton, ins, final_state)
            fwd_bwd, peak = time_fwd_bwd(fused.selective_scan_triton, ins, final_state)
            row = {"D": d, "variant": name, "fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd, "peak_GiB": peak}
            row["fwd_bw_frac"] = min_bytes(b, d, seqlen, n, 2, flags, False) / (fwd * 1e-3) / bw
            row["fwd_bwd_bw_frac"] = min_bytes(b, d, seqlen, n, 2, flags, True) / (fwd_bwd * 1e-3) / bw
            if name == "peer":
                row["vs_mamba_ssm_fwd"] = fwd / MAMBA_SSM[d][0]
                row["vs_mamba_ssm_fwd_bwd"] = fwd_bwd / MAMBA_SSM[d][1]
                if selective_scan_torch is not None:
                    row["torch_fwd_ms"] = time_fwd(selective_scan_torch, ins, False)
                    row["torch_fwd_bwd_ms"] = time_fwd_bwd(selective_scan_torch, ins, False)[0]
            rows.append(row)
            del ins
            torch.cuda.empty_cache()
    by = {(r["D"], r["variant"]): r for r in rows}
    for d in args.dims:
        by[(d, "all")]["all_over_peer_fwd"] = by[(d, "all")]["fwd_ms"] / by[(d, "peer")]["fwd_ms"]
        by[(d, "all")]["all_over_peer_fwd_bwd"] = by[(d, "all")]["fwd_bwd_ms"] / by[(d, "peer")]["fwd_bwd_ms"]
    report["rows"] = rows

    # 3. the sequential reference, timed at L/8 and scaled linearly in L
    short = max(1, seqlen // 8)
    ins = make_inputs(b, args.dims[0], short, n, dtype, VARIANTS["peer"], grad=True)
    ref_fwd = time_fwd(selective_scan_ref, ins, False) * seqlen / short
    ref_fwd_bwd = time_fwd_bwd(selective_scan_ref, ins, False)[0] * seqlen / short
    report["ref"] = {"D": args.dims[0], "timed_L": short, "fwd_ms_scaled": ref_fwd, "fwd_bwd_ms_scaled": ref_fwd_bwd}
    report["wall_s"] = time.time() - t_start
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)

    print(f"{report['device']}  torch {report['torch']}  triton {report['triton']}  copy {bw / 1e12:.2f} TB/s")
    print(f"main table config: {report['config']} (err {report['config_err']:.1e})")
    for r in sweep:
        t = f"fwd {r['fwd_ms']:.3f}  fwd+bwd {r['fwd_bwd_ms']:.3f}" if "fwd_ms" in r else "skipped"
        print(f"sweep {r['config']}: err {r['max_rel_err']:.1e}  {t}")
    peer = by[(args.dims[0], "peer")]
    print(f"ref (sequential, D={args.dims[0]}, scaled from L={short}): fwd {ref_fwd:.1f} ms, fwd+bwd {ref_fwd_bwd:.1f} ms;"
          f" triton speed-up {ref_fwd / peer['fwd_ms']:.0f}x / {ref_fwd_bwd / peer['fwd_bwd_ms']:.0f}x")  # fmt: skip
    print(f"{'D':>5} {'variant':>7} {'fwd ms':>8} {'fwd+bwd':>8} {'bwd/fwd':>7} {'fwd %bw':>7} {'f+b %bw':>7}"
          f" {'vs mamba_ssm':>13} {'torch f/fb ms':>15} {'peak GiB':>8}")  # fmt: skip
    for r in rows:
        vs = f"{r['vs_mamba_ssm_fwd']:.2f}/{r['vs_mamba_ssm_fwd_bwd']:.2f}" if "vs_mamba_ssm_fwd" in r else ""
        tt = f"{r['torch_fwd_ms']:.2f}/{r['torch_fwd_bwd_ms']:.2f}" if "torch_fwd_ms" in r else ""
        print(f"{r['D']:>5} {r['variant']:>7} {r['fwd_ms']:>8.3f} {r['fwd_bwd_ms']:>8.3f}"
              f" {r['fwd_bwd_ms'] / r['fwd_ms']:>7.2f} {100 * r['fwd_bw_frac']:>6.1f}% {100 * r['fwd_bwd_bw_frac']:>6.1f}%"
              f" {vs:>13} {tt:>15} {r['peak_GiB']:>8.2f}")  # fmt: skip
    for d in args.dims:
        r = by[(d, "all")]
        print(f"D={d}: all/peer {r['all_over_peer_fwd']:.3f}x fwd, {r['all_over_peer_fwd_bwd']:.3f}x fwd+bwd")


if __name__ == "__main__":
    main()
