"""Benchmark the Triton Mamba-1 selective scan against the reference, the torch backend and mamba_ssm's CUDA scan.

Run on the GPU machine:  PYTHONPATH=. python3 benchmarks/bench_selective_scan.py --out results.json
Times are triton.testing.do_bench medians (ms). Bandwidth fractions use the minimum bytes an op must move (inputs read
once, outputs written once) against the device-to-device copy bandwidth measured in the same run.
Every launch configuration is checked against the fp32 reference before it is timed.

mamba_ssm's CUDA ``selective_scan_fn`` is timed live at the same shapes when it imports (its compiled extension on
PYTHONPATH, e.g. ``PYTHONPATH=/tmp/mamba_site:.`` after ``benchmarks/build_mamba_ssm.sh``); otherwise the "peer" rows
compare against constants measured in another run (ECOSYSTEM.md §9) and say so. ``--only mamba_ssm`` (or
``--peer-only``) times just the peer variant, ours and theirs, for a run after the extension's build has finished.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssmtune.ops.selective_scan import fused
from ssmtune.ops.selective_scan.naive import selective_scan_ref
from ssmtune.ops.testing import rel_err

try:
    from ssmtune.ops.selective_scan.parallel import selective_scan_torch
except ImportError:
    selective_scan_torch = None

# mamba_ssm 2.3.2.post1 CUDA selective_scan_fn on an H100, bf16, B=8, L=2048, N=16, with D, z, delta_bias, softplus
# (ECOSYSTEM.md §9): D -> (fwd ms, fwd+bwd ms). Only a fallback when the extension does not import in this run.
MAMBA_SSM = {1536: (0.481, 3.11), 4096: (1.257, 7.96), 5120: (1.563, 9.85)}
MAMBA_SSM_CONST_SOURCE = "constants (ECOSYSTEM.md §9: H100, B 8, L 2048, N 16, another run)"
DEVICE = "cuda"
# variant -> optional inputs; "peer" is mamba_ssm's benchmark configuration, "all" adds every state-PEFT input
VARIANTS = {
    "bare": (),
    "peer": ("D", "z", "delta_bias"),
    "all": ("D", "z", "delta_bias", "initial_state", "state_offset", "y_offset"),
}
# launch configurations tried at the first D (CONFIG_OVERRIDE of fused.py); the first is the default (BLOCK_L 128,
# BLOCK_D 1 forward / 2 backward, one warp each). The main table uses the one with the fastest forward + backward.
# ``--configs`` replaces this list; a configuration naming a key that fused.py does not accept is reported and skipped.
# Forward and backward are launched separately, so one entry varies a knob of each (the JSON's best_fwd_config /
# best_bwd_config pick per direction), and a kernel already compiled by an earlier entry is reused: each entry costs
# about two new compiles per direction it changes.
CONFIGS = [
    {},
    {"BLOCK_L": 64},
    {"BLOCK_D_FWD": 2, "BLOCK_D_BWD": 1},
    {"BLOCK_D_FWD": 2, "BLOCK_D_BWD": 4},
    {"WARPS_FWD": 2, "WARPS_BWD": 2},
    {"BLOCK_D_FWD": 2, "BLOCK_D_BWD": 4, "WARPS_FWD": 2, "WARPS_BWD": 2},
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


def check(fn, flags=VARIANTS["all"], state_grad: bool = True) -> float:
    """Worst RMS-relative error over outputs and gradients against the reference on a small fp32 case.
    ``state_grad=False`` leaves h_L out of the loss (mamba_ssm ignores its gradient) but still compares it."""
    errs = []
    # L 333 and 336: the kernels are specialised on L % 16 (vectorised loads only when rows are 16-aligned)
    for seqlen in (333, 336):
        torch.manual_seed(0)
        ins = make_inputs(2, 200, seqlen, 16, torch.float32, flags, grad=True)
        res = []
        for f in (selective_scan_ref, fn):
            leaves = {k: v.detach().clone().requires_grad_() for k, v in ins.items()}
            y, h = f(**leaves, delta_softplus=True, return_final_state=True)
            loss = (y * torch.cos(y.detach())).sum()
            (loss.add(h.sum()) if state_grad else loss).backward()
            res.append([y, h] + [v.grad for v in leaves.values()])
        errs.append(max(rel_err(r, o) for r, o in zip(*res)))
    return max(errs)


def override_keys() -> set[str]:
    """CONFIG_OVERRIDE keys that fused.py accepts (``_config`` raises ValueError on any other)."""
    return set(fused.CONFIG_KEYS)


def load_mamba_ssm():
    """mamba_ssm's CUDA ``selective_scan_fn`` wrapped to ssmtune's keyword names, or None, and a note (its version
    or why it did not import). The plain import runs ``mamba_ssm/__init__.py``; if that fails for another reason
    than the extension, the scan interface is imported alone through the shell package of _mamba_ssm_loader."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as first:  # noqa: BLE001 - ImportError, or a broken extension (undefined symbol, CUDA mismatch)
        try:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from _mamba_ssm_loader import _install_shell_package

            for name in [m for m in sys.modules if m == "mamba_ssm" or m.startswith("mamba_ssm.")]:
                del sys.modules[name]
            _install_shell_package()
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        except Exception:  # noqa: BLE001
            return None, f"{type(first).__name__}: {str(first)[:200]}"

    def fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_final_state=False):
        return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_final_state)

    try:
        from importlib.metadata import version

        ver = version("mamba_ssm")
    except Exception:  # noqa: BLE001
        ver = "unknown version"
    return fn, f"mamba_ssm {ver} (live)"


def _json_arg(text: str):
    """A JSON value given inline or as @path."""
    return json.loads(Path(text[1:]).read_text() if text.startswith("@") else text)


def time_pair(b, d, seqlen, n, dtype, ours_fn, peer_fn, bw: float) -> dict:
    """The peer variant (D, z, delta_bias, softplus) at one D: ours, then mamba_ssm (live or constants)."""
    flags = VARIANTS["peer"]
    ins = make_inputs(b, d, seqlen, n, dtype, flags, grad=True)
    fwd = time_fwd(ours_fn, ins, False)
    fwd_bwd, peak = time_fwd_bwd(ours_fn, ins, False)
    row = {"D": d, "variant": "peer", "fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd, "peak_GiB": peak}
    row["fwd_bw_frac"] = min_bytes(b, d, seqlen, n, 2, flags, False) / (fwd * 1e-3) / bw
    row["fwd_bwd_bw_frac"] = min_bytes(b, d, seqlen, n, 2, flags, True) / (fwd_bwd * 1e-3) / bw
    if peer_fn is not None:
        try:
            m_fwd = time_fwd(peer_fn, ins, False)
            m_fb, m_peak = time_fwd_bwd(peer_fn, ins, False)
            row.update(mamba_ssm_fwd_ms=m_fwd, mamba_ssm_fwd_bwd_ms=m_fb, mamba_ssm_peak_GiB=m_peak,
                       mamba_ssm_source="live")  # fmt: skip
        except Exception as e:  # noqa: BLE001 - keep ours even if the peer fails at this size
            row["mamba_ssm_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    if "mamba_ssm_fwd_ms" not in row and d in MAMBA_SSM and (b, seqlen, n) == (8, 2048, 16):
        row.update(mamba_ssm_fwd_ms=MAMBA_SSM[d][0], mamba_ssm_fwd_bwd_ms=MAMBA_SSM[d][1],
                   mamba_ssm_source=MAMBA_SSM_CONST_SOURCE)  # fmt: skip
    if "mamba_ssm_fwd_ms" in row:
        # ours / theirs: < 1 means ssmtune is faster
        row["vs_mamba_ssm_fwd"] = fwd / row["mamba_ssm_fwd_ms"]
        row["vs_mamba_ssm_fwd_bwd"] = fwd_bwd / row["mamba_ssm_fwd_bwd_ms"]
        if row.get("mamba_ssm_source") == "live":
            row["mamba_ssm_fwd_bw_frac"] = (
                min_bytes(b, d, seqlen, n, 2, flags, False) / (row["mamba_ssm_fwd_ms"] * 1e-3) / bw
            )
            row["mamba_ssm_fwd_bwd_bw_frac"] = (min_bytes(b, d, seqlen, n, 2, flags, True)
                                                / (row["mamba_ssm_fwd_bwd_ms"] * 1e-3) / bw)  # fmt: skip
    del ins
    torch.cuda.empty_cache()
    return row


def print_peer_table(rows: list[dict]) -> None:
    peers = [r for r in rows if r["variant"] == "peer"]
    if not peers:
        return
    print(f"{'D':>5} {'ours fwd':>9} {'theirs fwd':>10} {'ours/theirs':>11} {'ours f+b':>9} {'theirs f+b':>10}"
          f" {'ours/theirs':>11} {'peak ours/theirs GiB':>21}  mamba_ssm source")  # fmt: skip
    for r in peers:
        if "mamba_ssm_fwd_ms" not in r:
            print(f"{r['D']:>5} {r['fwd_ms']:>9.3f} {'n/a':>10} {'':>11} {r['fwd_bwd_ms']:>9.3f} {'n/a':>10} {'':>11}"
                  f" {r['peak_GiB']:>10.2f}/{'n/a':<10}  {r.get('mamba_ssm_error', 'none')}")  # fmt: skip
            continue
        mp = f"{r['mamba_ssm_peak_GiB']:.2f}" if "mamba_ssm_peak_GiB" in r else "n/a"
        src = "LIVE" if r["mamba_ssm_source"] == "live" else "FALLBACK " + r["mamba_ssm_source"]
        print(f"{r['D']:>5} {r['fwd_ms']:>9.3f} {r['mamba_ssm_fwd_ms']:>10.3f} {r['vs_mamba_ssm_fwd']:>10.2f}x"
              f" {r['fwd_bwd_ms']:>9.3f} {r['mamba_ssm_fwd_bwd_ms']:>10.3f} {r['vs_mamba_ssm_fwd_bwd']:>10.2f}x"
              f" {r['peak_GiB']:>10.2f}/{mp:<10}  {src}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_selective_scan.json")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--dstate", type=int, default=16)
    parser.add_argument("--dims", type=int, nargs="+", default=[1536, 4096, 5120])
    parser.add_argument("--no-sweep", action="store_true", help="skip the launch-configuration sweep")
    parser.add_argument("--configs", type=_json_arg, default=None,
                        help="sweep configurations (CONFIG_OVERRIDE dicts), a JSON list inline or @file")  # fmt: skip
    parser.add_argument("--override", type=_json_arg, default=None,
                        help="CONFIG_OVERRIDE for the main table (JSON dict inline or @file); implies --no-sweep")  # fmt: skip
    parser.add_argument("--main-json", type=Path, default=None,
                        help="with --only mamba_ssm: take CONFIG_OVERRIDE from this earlier run's JSON ('override')"
                        " unless --override is given, and show its peer rows beside the new ones")  # fmt: skip
    parser.add_argument("--only", choices=["all", "mamba_ssm"], default="all",
                        help="mamba_ssm: only the peer variant, ours and mamba_ssm's live (no sweep, torch, ref)")  # fmt: skip
    parser.add_argument("--peer-only", action="store_true", help="same as --only mamba_ssm")
    parser.add_argument("--no-mamba-ssm", action="store_true", help="do not import mamba_ssm; use the constants")
    args = parser.parse_args()
    peer_only = args.peer_only or args.only == "mamba_ssm"
    b, seqlen, n, dtype = args.batch, args.seqlen, args.dstate, torch.bfloat16
    t_start = time.time()
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "shape": {"B": b, "L": seqlen, "N": n, "dtype": "bf16"},
        "mode": "mamba_ssm only" if peer_only else "all",
    }

    def save() -> None:
        report["wall_s"] = time.time() - t_start
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)

    peer_fn, peer_note = (None, "disabled (--no-mamba-ssm)") if args.no_mamba_ssm else load_mamba_ssm()
    report["mamba_ssm"] = (
        peer_note if peer_fn is not None else f"unavailable: {peer_note}; fallback {MAMBA_SSM_CONST_SOURCE}"
    )
    print(f"mamba_ssm: {report['mamba_ssm']}", flush=True)
    if peer_only and peer_fn is None:
        save()
        raise SystemExit("--only mamba_ssm: mamba_ssm's selective_scan_fn does not import (see above)")
    known = override_keys()
    report["override_keys"] = sorted(known)
    main_json = json.loads(args.main_json.read_text()) if args.main_json and args.main_json.exists() else None
    override = args.override
    if override is None and peer_only and main_json is not None:
        override = main_json.get("override")
    if override is not None:
        unknown = sorted(set(override) - known)
        if unknown:
            print(f"override keys not accepted by fused.py, dropped: {unknown}")
        fused.CONFIG_OVERRIDE = {k: v for k, v in override.items() if k in known}
        args.no_sweep = True

    # warm-up compiles (cold Triton cache on a fresh machine)
    for name, flags in VARIANTS.items():
        if peer_only and name != "peer":
            continue
        ins = make_inputs(1, 64, 100, n, dtype, flags, grad=True)
        fused.selective_scan_triton(**ins, delta_softplus=True, return_final_state=True)[0].sum().backward()
    bw = copy_bandwidth()
    report["copy_bandwidth_TBps"] = bw / 1e12
    if peer_fn is not None:
        report["mamba_ssm_check_err"] = check(peer_fn, VARIANTS["peer"], state_grad=False)
        print(f"mamba_ssm vs fp32 reference (peer flags, fp32): max rel err {report['mamba_ssm_check_err']:.1e}")
    save()

    # 1. launch configuration sweep at the smallest D (peer variant); each configuration is verified first
    sweep = []
    if not args.no_sweep and not peer_only:
        d = args.dims[0]
        for cfg in args.configs if args.configs is not None else CONFIGS:
            row = {"config": cfg}
            unknown = sorted(set(cfg) - known)
            if unknown:
                row["skipped"] = f"keys not accepted by fused.py: {unknown}"
                sweep.append(row)
                continue
            fused.CONFIG_OVERRIDE = dict(cfg)
            try:
                row["max_rel_err"] = err = check(fused.selective_scan_triton)
                if err < 1e-4:
                    ins = make_inputs(b, d, seqlen, n, dtype, VARIANTS["peer"], grad=True)
                    row["fwd_ms"] = time_fwd(fused.selective_scan_triton, ins, False)
                    row["fwd_bwd_ms"] = time_fwd_bwd(fused.selective_scan_triton, ins, False)[0]
                    del ins
            except Exception as e:  # noqa: BLE001 - e.g. a configuration the kernel rejects
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            sweep.append(row)
        timed = [r for r in sweep if "fwd_ms" in r]
        report["sweep"] = sweep
        if timed:
            report["best_fwd_config"] = min(timed, key=lambda r: r["fwd_ms"])["config"]
            report["best_bwd_config"] = min(timed, key=lambda r: r["fwd_bwd_ms"] - r["fwd_ms"])["config"]
            fused.CONFIG_OVERRIDE = dict(min(timed, key=lambda r: r["fwd_bwd_ms"])["config"])
        else:
            fused.CONFIG_OVERRIDE = {}
    report["override"] = dict(fused.CONFIG_OVERRIDE)
    report["config"] = fused._config(args.dims[0], n)  # training (the fwd+bwd columns)
    report["config_inference"] = fused._config(args.dims[0], n, training=False)  # the fwd column (no gradients)
    report["config_err"] = check(fused.selective_scan_triton)
    save()

    # 2. main table (the fastest configuration of the sweep); --only mamba_ssm: the peer variant alone
    rows = []
    for d in args.dims:
        for name, flags in VARIANTS.items():
            if name == "peer":
                row = time_pair(b, d, seqlen, n, dtype, fused.selective_scan_triton, peer_fn, bw)
                if selective_scan_torch is not None and not peer_only:
                    ins = make_inputs(b, d, seqlen, n, dtype, flags, grad=True)
                    row["torch_fwd_ms"] = time_fwd(selective_scan_torch, ins, False)
                    row["torch_fwd_bwd_ms"] = time_fwd_bwd(selective_scan_torch, ins, False)[0]
                    del ins
                    torch.cuda.empty_cache()
                rows.append(row)
                report["rows"] = rows
                save()
                continue
            if peer_only:
                continue
            final_state = name == "all"
            ins = make_inputs(b, d, seqlen, n, dtype, flags, grad=True)
            fwd = time_fwd(fused.selective_scan_triton, ins, final_state)
            fwd_bwd, peak = time_fwd_bwd(fused.selective_scan_triton, ins, final_state)
            row = {"D": d, "variant": name, "fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd, "peak_GiB": peak}
            row["fwd_bw_frac"] = min_bytes(b, d, seqlen, n, 2, flags, False) / (fwd * 1e-3) / bw
            row["fwd_bwd_bw_frac"] = min_bytes(b, d, seqlen, n, 2, flags, True) / (fwd_bwd * 1e-3) / bw
            rows.append(row)
            del ins
            torch.cuda.empty_cache()
    by = {(r["D"], r["variant"]): r for r in rows}
    if not peer_only:
        for d in args.dims:
            by[(d, "all")]["all_over_peer_fwd"] = by[(d, "all")]["fwd_ms"] / by[(d, "peer")]["fwd_ms"]
            by[(d, "all")]["all_over_peer_fwd_bwd"] = by[(d, "all")]["fwd_bwd_ms"] / by[(d, "peer")]["fwd_bwd_ms"]
    report["rows"] = rows
    save()

    # 3. the sequential reference, timed at L/8 and scaled linearly in L
    short = max(1, seqlen // 8)
    if not peer_only:
        ins = make_inputs(b, args.dims[0], short, n, dtype, VARIANTS["peer"], grad=True)
        ref_fwd = time_fwd(selective_scan_ref, ins, False) * seqlen / short
        ref_fwd_bwd = time_fwd_bwd(selective_scan_ref, ins, False)[0] * seqlen / short
        report["ref"] = {
            "D": args.dims[0],
            "timed_L": short,
            "fwd_ms_scaled": ref_fwd,
            "fwd_bwd_ms_scaled": ref_fwd_bwd,
        }
    save()

    print(f"{report['device']}  torch {report['torch']}  triton {report['triton']}  copy {bw / 1e12:.2f} TB/s")
    print(f"main table config: {report['config']} (override {report['override']}, err {report['config_err']:.1e})")
    for r in sweep:
        if "fwd_ms" in r:
            t = f"err {r['max_rel_err']:.1e}  fwd {r['fwd_ms']:.3f}  fwd+bwd {r['fwd_bwd_ms']:.3f}"
        else:
            t = r.get("skipped") or r.get("error") or f"err {r['max_rel_err']:.1e}: not timed"
        print(f"sweep {r['config']}: {t}")
    if not peer_only:
        peer = by[(args.dims[0], "peer")]
        print(f"ref (sequential, D={args.dims[0]}, scaled from L={short}): fwd {ref_fwd:.1f} ms, fwd+bwd {ref_fwd_bwd:.1f} ms;"
              f" triton speed-up {ref_fwd / peer['fwd_ms']:.0f}x / {ref_fwd_bwd / peer['fwd_bwd_ms']:.0f}x")  # fmt: skip
        print(f"{'D':>5} {'variant':>7} {'fwd ms':>8} {'fwd+bwd':>8} {'bwd/fwd':>7} {'fwd %bw':>7} {'f+b %bw':>7}"
              f" {'vs mamba_ssm':>13} {'torch f/fb ms':>15} {'peak GiB':>8}")  # fmt: skip
        for r in rows:
            vs = f"{r['vs_mamba_ssm_fwd']:.2f}/{r['vs_mamba_ssm_fwd_bwd']:.2f}" if "vs_mamba_ssm_fwd" in r else ""
            if vs and r.get("mamba_ssm_source") != "live":
                vs += "*"
            tt = f"{r['torch_fwd_ms']:.2f}/{r['torch_fwd_bwd_ms']:.2f}" if "torch_fwd_ms" in r else ""
            print(f"{r['D']:>5} {r['variant']:>7} {r['fwd_ms']:>8.3f} {r['fwd_bwd_ms']:>8.3f}"
                  f" {r['fwd_bwd_ms'] / r['fwd_ms']:>7.2f} {100 * r['fwd_bw_frac']:>6.1f}% {100 * r['fwd_bwd_bw_frac']:>6.1f}%"
                  f" {vs:>13} {tt:>15} {r['peak_GiB']:>8.2f}")  # fmt: skip
        for d in args.dims:
            r = by[(d, "all")]
            print(f"D={d}: all/peer {r['all_over_peer_fwd']:.3f}x fwd, {r['all_over_peer_fwd_bwd']:.3f}x fwd+bwd")
        if any(r.get("mamba_ssm_source", "live") != "live" for r in rows if r["variant"] == "peer"):
            print(f"* vs mamba_ssm against the FALLBACK {MAMBA_SSM_CONST_SOURCE}, not a live measurement")
    if main_json is not None:
        print(f"peer rows of {args.main_json} (ours in that run):")
        for r in main_json.get("rows", []):
            if r.get("variant") == "peer":
                print(f"  D={r['D']}: fwd {r['fwd_ms']:.3f} ms, fwd+bwd {r['fwd_bwd_ms']:.3f} ms")
    print("peer variant (D, z, delta_bias, softplus; variable B/C [B, N, L]), ours/theirs < 1 = ssmtune faster:")
    print_peer_table(rows)


if __name__ == "__main__":
    main()
