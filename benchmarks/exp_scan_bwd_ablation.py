"""Where the Mamba-1 scan's backward spends its time: the backward kernel timed with parts of it removed.

An experiment (not a benchmark of the library): each ablation is a copy of ``ssmtune/ops/selective_scan/fused.py``
with a text edit, imported as its own module. The ablated kernels compute WRONG gradients (racy stores, dropped
terms); only their times mean something. The unedited copy is checked against the library first. Timed: the backward
alone (``torch.autograd.grad`` with ``retain_graph``, so the forward is not in it) at B 8, L 2048, D 1536, N 16, bf16,
with mamba_ssm's flags (D, z, delta_bias, softplus) and with every state-PEFT input (h0, h', y'; h''s terms are the
separate ``state_offset_grad_kernel``, included in the time since session 13). Also: registers and
spills of each compiled backward, and a few launch configurations of the unedited kernel.

    python3 benchmarks/exp_scan_bwd_ablation.py --out $OUT/scan_bwd_ablation.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scan_inference import compiled_kernels
from bench_selective_scan import VARIANTS, make_inputs
from exp_scan_variants import SRC, load

# name -> [(old, new), ...] applied to fused.py's text; each old must occur
ABLATIONS: dict[str, list[tuple[str, str]]] = {
    "base": [],
    # the dB / dC reductions over the program's channels and their fp32 atomics into [B, N, L]
    "no_dBdC": [
        ('    tl.atomic_add(dB + p_dbc, tl.sum(b_lams * b_dtu, axis=0), mask=m_t, sem="relaxed")\n', ""),
        ('    tl.atomic_add(dC + p_dbc, tl.sum(b_hs * b_g, axis=0), mask=m_t, sem="relaxed")\n', ""),
    ],
    # plain stores instead of atomics (racy)
    "dBdC_store": [
        ('tl.atomic_add(dB + p_dbc, tl.sum(b_lams * b_dtu, axis=0), mask=m_t, sem="relaxed")',
         "tl.store(dB + p_dbc, tl.sum(b_lams * b_dtu, axis=0), mask=m_t)"),
        ('tl.atomic_add(dC + p_dbc, tl.sum(b_hs * b_g, axis=0), mask=m_t, sem="relaxed")',
         "tl.store(dC + p_dbc, tl.sum(b_hs * b_g, axis=0), mask=m_t)"),
    ],
    # λ left in reversed time order (no gather)
    "no_lam_gather": [
        ("    b_lams = tl.gather(b_lams, tl.broadcast_to((BLOCK_L - 1 - o_l)[None, :], b_lams.shape), axis=1)\n", ""),
    ],
    # h not recomputed inside the tile (no scan, no exp2 for it)
    "no_recompute": [
        (("    b_pA, b_hs = tl.associative_scan((tl.exp2(b_dt * b_An2[:, None]), b_dBu), axis=1, combine_fn=_scan_combine)\n"
         "    b_hs += b_pA * b_h[:, None]\n"),
         "    b_hs = b_dBu + b_h[:, None]\n"),
    ],
    # no dA reduction per state
    "no_dA": [
        ("    b_dA_acc = tl.where(m_sel, b_dA_acc + tl.sum(b_term * b_dt, axis=1)[:, None], b_dA_acc)\n", ""),
    ],
}  # fmt: skip

CONFIGS = [
    {},
    {"BLOCK_D_BWD": 1},
    {"BLOCK_D_BWD": 4},
    {"BLOCK_L_BWD": 64},
    {"WARPS_BWD": 2},
    {"BLOCK_D_BWD": 4, "WARPS_BWD": 2},
]


def load_variant(name: str, edits: list[tuple[str, str]], tmp: Path):
    text = SRC.read_text()
    for old, new in edits:
        if old not in text:
            raise SystemExit(f"ablation {name}: text not found in fused.py: {old[:80]!r}")
        text = text.replace(old, new)
    path = tmp / f"ablate_{name}.py"
    path.write_text(text)
    return load(f"ablate_{name}", path)


def time_bwd(mod, ins: dict) -> float:
    leaves = list(ins.values())
    y = mod.selective_scan_triton(**ins, delta_softplus=True)
    dy = torch.randn_like(y)
    return do_bench(lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True), return_mode="median")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="scan_bwd_ablation.json")
    ap.add_argument("--dims", type=int, nargs="+", default=[1536])
    args = ap.parse_args()
    from ssmtune.ops.selective_scan import fused

    rows = []
    tmp = Path(tempfile.mkdtemp())
    # correctness of the unedited copy: the same gradients as the library (bitwise up to atomics' order)
    base = load_variant("base", [], tmp)
    ins = make_inputs(2, 64, 300, 16, torch.bfloat16, VARIANTS["all"], grad=True)
    leaves = list(ins.values())
    g_lib = torch.autograd.grad(fused.selective_scan_triton(**ins, delta_softplus=True).float().square().sum(), leaves)
    g_cp = torch.autograd.grad(base.selective_scan_triton(**ins, delta_softplus=True).float().square().sum(), leaves)
    worst = max(((a.float() - b.float()).norm() / (a.float().norm() + 1e-12)).item() for a, b in zip(g_lib, g_cp))
    print(f"unedited copy against the library: worst relative gradient difference {worst:.2e}", flush=True)
    for d in args.dims:
        for flags_name in ("peer", "all"):
            ins = make_inputs(8, d, 2048, 16, torch.bfloat16, VARIANTS[flags_name], grad=True)
            for name, edits in ABLATIONS.items():
                mod = base if name == "base" else load_variant(name, edits, tmp)
                ms = time_bwd(mod, ins)
                regs = [k.get("n_regs") for k in compiled_kernels(mod.selective_scan_bwd_nloop_kernel)]
                rows.append({"D": d, "flags": flags_name, "ablation": name, "config": {}, "bwd_ms": ms, "regs": regs})
                print(f"D {d} {flags_name:4s} {name:14s} bwd {ms:.3f} ms regs {regs}", flush=True)
            for cfg in CONFIGS[1:] if flags_name == "peer" else []:
                base.CONFIG_OVERRIDE.clear()
                base.CONFIG_OVERRIDE.update(cfg)
                try:
                    ms = time_bwd(base, ins)
                except Exception as e:  # noqa: BLE001 (an unsupported configuration is a result)
                    ms = None
                    print(f"  config {cfg}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                rows.append({"D": d, "flags": flags_name, "ablation": "base", "config": cfg, "bwd_ms": ms})
                print(f"D {d} {flags_name:4s} base {cfg} bwd {ms} ms", flush=True)
            base.CONFIG_OVERRIDE.clear()
    Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                          "check_worst_rel": worst, "rows": rows}, indent=1))  # fmt: skip
    print("\n| D | flags | ablation | config | bwd ms |\n|---|---|---|---|---|")
    for r in rows:
        ms = "-" if r["bwd_ms"] is None else f"{r['bwd_ms']:.3f}"
        print(f"| {r['D']} | {r['flags']} | {r['ablation']} | {r['config'] or ''} | {ms} |")


if __name__ == "__main__":
    main()
