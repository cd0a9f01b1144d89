"""Versions of the Mamba-1 scan kernels timed side by side in one process (an experiment, not a benchmark).

Each ``--variant NAME=PATH`` is a copy of ``ssmtune/ops/selective_scan/fused.py`` (e.g. the previous commit's, from
``git show``) imported as its own module; the library's own file is always the variant "current". Every variant is
first checked against the fp32 reference on a small case with every flag (outputs and all gradients), then timed at
B 8, L 2048, N 16, bf16, mamba_ssm's flags ("peer") and every state-PEFT input ("all"): the no-grad forward, the
backward alone and forward+backward, medians of triton.testing.do_bench, two rounds with the variants interleaved.
Registers of every compiled kernel are reported.

    python3 benchmarks/exp_scan_variants.py --variant s11=exp_variants/fused_s11.py --out $OUT/scan_variants.json

``--dh-config JSON`` (repeatable) times the separate dh' kernel (``state_offset_grad``) of every version that has it
alone, with ``STATE_OFFSET_GRAD_CONFIG`` updated by JSON (``'{}'``: the default launch): ms and GB/s of the bytes it
must move (dy, z, C read; dC read and written).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scan_inference import compiled_kernels
from bench_selective_scan import VARIANTS, check, make_inputs

SRC = Path(__file__).resolve().parents[1] / "ssmtune/ops/selective_scan/fused.py"


def load(name: str, path: Path):
    """Import the file at ``path`` as its own module ``name`` (a copy of a kernel file: its own kernels and caches)."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def times(mod, ins: dict) -> dict:
    leaves = list(ins.values())
    with torch.no_grad():
        fwd = do_bench(lambda: mod.selective_scan_triton(**ins, delta_softplus=True), return_mode="median")
    y = mod.selective_scan_triton(**ins, delta_softplus=True)
    dy = torch.randn_like(y)
    bwd = do_bench(lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True), return_mode="median")

    def step():
        torch.autograd.grad(mod.selective_scan_triton(**ins, delta_softplus=True), leaves, dy)

    return {"fwd_ms": fwd, "bwd_ms": bwd, "fwd_bwd_ms": do_bench(step, return_mode="median")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", action="append", default=[], help="NAME=PATH of a fused.py copy")
    ap.add_argument("--dims", type=int, nargs="+", default=[1536])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-check", action="store_true", help="skip the reference check (saves the fp32 compiles)")
    ap.add_argument("--dh-config", action="append", default=[], help="JSON update of STATE_OFFSET_GRAD_CONFIG")
    ap.add_argument("--out", default="scan_variants.json")
    args = ap.parse_args()
    mods = {"current": load("scan_variant_current", SRC)}
    for spec in args.variant:
        name, path = spec.split("=", 1)
        mods[name] = load(f"scan_variant_{name}", Path(path))
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "checks": {}, "rows": []}
    for name, mod in list(mods.items()):
        if args.no_check:
            break
        try:
            err = check(mod.selective_scan_triton)
        except Exception as e:  # noqa: BLE001 (a variant that does not compile is a result, the others still run)
            report["checks"][name] = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"{name}: FAILED {report['checks'][name]}", flush=True)
            del mods[name]
            continue
        report["checks"][name] = err
        print(f"{name}: worst relative error against the reference {err:.2e}", flush=True)
    for d in args.dims:
        for flags in ("peer", "all"):
            ins = make_inputs(8, d, 2048, 16, torch.bfloat16, VARIANTS[flags], grad=True)
            for rnd in range(args.rounds):
                for name, mod in mods.items():
                    row = {"D": d, "flags": flags, "variant": name, "round": rnd, **times(mod, ins)}
                    report["rows"].append(row)
                    print(f"D {d} {flags:4s} {name:10s} r{rnd} fwd {row['fwd_ms']:.3f} bwd {row['bwd_ms']:.3f} "
                          f"f+b {row['fwd_bwd_ms']:.3f}", flush=True)  # fmt: skip
    for d in args.dims if args.dh_config else ():
        ins = make_inputs(8, d, 2048, 16, torch.bfloat16, VARIANTS["all"], grad=False)
        dy, z, C, h = ins["u"], ins["z"], ins["C"], ins["state_offset"]
        dC = torch.zeros(C.shape, device=C.device)
        nbytes = 2 * dy.numel() * dy.element_size() + C.numel() * C.element_size() + 2 * dC.numel() * 4
        for name, mod in mods.items():
            if not hasattr(mod, "state_offset_grad"):
                continue  # a version without the separate kernel
            default = dict(mod.STATE_OFFSET_GRAD_CONFIG)
            for spec in args.dh_config:
                mod.STATE_OFFSET_GRAD_CONFIG.update(json.loads(spec))
                cfg = dict(mod.STATE_OFFSET_GRAD_CONFIG)
                ms = do_bench(lambda: mod.state_offset_grad(dy, z, C, h, dC), return_mode="median")  # noqa: B023
                row = {
                    "D": d,
                    "flags": "dh_kernel",
                    "variant": name,
                    "config": cfg,
                    "ms": ms,
                    "GBps": nbytes / ms / 1e6,
                }
                report["rows"].append(row)
                print(f"D {d} dh' kernel {name} {cfg}: {ms:.4f} ms, {row['GBps']:.0f} GB/s", flush=True)
                mod.STATE_OFFSET_GRAD_CONFIG.clear()
                mod.STATE_OFFSET_GRAD_CONFIG.update(default)
    for name, mod in mods.items():
        report[f"regs_{name}"] = {
            k: [c["n_regs"] for c in compiled_kernels(getattr(mod, k))]
            for k in ("selective_scan_fwd_nloop_kernel", "selective_scan_bwd_nloop_kernel")
        }
    Path(args.out).write_text(json.dumps(report, indent=1))
    print("\n| D | flags | variant | fwd ms | bwd ms | f+b ms | (best of rounds) |\n|---|---|---|---:|---:|---:|---|")
    for d in args.dims:
        for flags in ("peer", "all"):
            for name in mods:
                rs = [r for r in report["rows"] if (r["D"], r["flags"], r.get("variant")) == (d, flags, name)]
                best = {k: min(r[k] for r in rs) for k in ("fwd_ms", "bwd_ms", "fwd_bwd_ms")}
                print(f"| {d} | {flags} | {name} | {best['fwd_ms']:.3f} | {best['bwd_ms']:.3f} | "
                      f"{best['fwd_bwd_ms']:.3f} | |")  # fmt: skip
    for name in mods:
        print(name, "registers", report[f"regs_{name}"])


if __name__ == "__main__":
    main()
