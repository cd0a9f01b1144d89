"""Inference (no gradient) of the Mamba-1 scan in the mixer's own layout, and a no-grad forward of a 130m-shaped model.

The mixer hands the scan time-major views (Δ from dt_proj, z from in_proj, B / C from x_proj: [B, L, ·] viewed as
[B, ·, L]). With ``fused.SEQUENTIAL_FORWARD`` (opt-in: ``SSMTUNE_SEQUENTIAL_SCAN=1``) ``selective_scan_triton`` runs
them through the sequential kernel of ``fused_seq.py`` when no gradient is needed; otherwise it copies them into
[B, D, L] for the n-loop forward. Rows, per (B, D) at L 2048, N 16, bf16; flags "peer" (D, z, Δ bias, softplus),
"h'" / "h0" (peer + state offset / initial state), "all" (peer + h0 + h' + y'):

- ``copies + n-loop``: ``fused.SEQUENTIAL_FORWARD = False`` (the default);
- ``sequential (default)``: the sequential kernel, default launch configuration;
- ``sequential PF/CHUNK/BLOCK_D/K/WARPS``: the configuration sweep (``--sweep``), to tune ``fused_seq._config``;
- ``mamba_ssm selective_scan_fn``: its CUDA scan on the same views (it copies non-contiguous inputs itself), when it
  imports (``PYTHONPATH=/tmp/mamba_site:.`` after ``benchmarks/build_mamba_ssm.sh``).
Each is checked against the n-loop's output first. Then ``MambaForCausalLM`` at the mamba-130m shape (random weights,
bf16, eval, no grad), bare and with State-offset (h): forward ms and tokens/s with the sequential kernel on and off.

    PYTHONPATH=. python3 benchmarks/bench_scan_inference.py --out $OUT/bench_scan_inference.json --sweep
    TRITON_INTERPRET=1 python benchmarks/bench_scan_inference.py --smoke --sweep --out /tmp/x.json   # CPU: the script
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssmtune.ops.selective_scan import fused, fused_seq

SHAPES = [(8, 1536), (8, 4096), (8, 5120), (1, 1536), (1, 4096)]
DSTATE = 16
DEVICE = "cuda"
SWEEP = [
    {"PF": pf, "CHUNK": c} for pf in (1, 2) for c in (0, 64, 128, 256, 512)
] + [{"PF": 2, "CHUNK": 128, "BLOCK_D": 64, "WARPS": 2}, {"PF": 2, "CHUNK": 0, "K": 16}]  # fmt: skip
MODEL_SIZES = [(8, 2048), (1, 2048), (4, 512)]


def mixer_inputs(b: int, d: int, seqlen: int, n: int, flags: str, rank: int = 48) -> dict:
    """The mixer's layouts (tests/ops/test_selective_scan_seq.py): u [B, D, L]; Δ, z, B, C time-major views."""
    dev, dt = DEVICE, torch.bfloat16
    ins = {
        "u": torch.randn(b, d, seqlen, device=dev, dtype=dt),
        "delta": (0.5 * torch.randn(b, seqlen, d, device=dev) - 2.0).to(dt).transpose(1, 2),
        "A": -torch.arange(1, n + 1, device=dev, dtype=torch.float32).repeat(d, 1),
        "D": torch.randn(d, device=dev),
        "z": torch.randn(b, seqlen, 2 * d, device=dev, dtype=dt)[..., d:].transpose(1, 2),
        "delta_bias": 0.1 * torch.randn(d, device=dev),
    }
    x_dbl = torch.randn(b, seqlen, rank + 2 * n, device=dev, dtype=dt)
    ins["B"], ins["C"] = x_dbl[..., rank : rank + n].transpose(1, 2), x_dbl[..., rank + n :].transpose(1, 2)
    # Initial State and State-offset (h) / (y) tensors, shared over the batch as in the model
    if flags in ("all", "h0"):
        ins["initial_state"] = 0.1 * torch.randn(d, n, device=dev)
    if flags in ("all", "h'"):
        ins["state_offset"] = 0.1 * torch.randn(d, n, device=dev)
    if flags == "all":
        ins["y_offset"] = 0.1 * torch.randn(d, device=dev)
    return ins


def min_bytes(b: int, d: int, seqlen: int, n: int) -> int:
    """u, Δ, z read and y written once (bf16), B and C read once."""
    return 2 * (4 * b * d * seqlen + 2 * b * n * seqlen)


def copy_bandwidth() -> float:
    x = torch.empty(2**28 if DEVICE == "cuda" else 2**20, device=DEVICE, dtype=torch.float32)
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / (do_bench(lambda: y.copy_(x), return_mode="median") * 1e-3)


def mamba_ssm_scan():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as e:  # noqa: BLE001 (any import failure of the optional peer: report it, time without it)
        return None, f"{type(e).__name__}: {e}"

    def fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, **_):
        return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, True, False)

    return fn, "live"


def scan(ins: dict, sequential: bool):
    fused.SEQUENTIAL_FORWARD = sequential
    with torch.no_grad():
        return fused.selective_scan_triton(**ins, delta_softplus=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def kernel_rows(args, bw: float, add) -> None:
    peer, note = mamba_ssm_scan()
    print(f"mamba_ssm: {note}", flush=True)
    for b, d in SHAPES:
        for flags in ("peer", "all", "h'", "h0"):
            if time.monotonic() > args.deadline:
                return
            ins = mixer_inputs(b, d, args.seqlen, DSTATE, flags)
            ref = scan(ins, False)
            base = {"B": b, "D": d, "L": args.seqlen, "flags": flags}
            gb = min_bytes(b, d, args.seqlen, DSTATE) / 1e9
            variants = [
                ("copies + n-loop", lambda ins=ins: scan(ins, False), {}),
                ("sequential (default)", lambda ins=ins: scan(ins, True), {}),
            ]
            if args.sweep:
                sweep = SWEEP if flags == "peer" else [{"PF": 1}, {"PF": 2}]
                variants += [
                    ("sequential " + "/".join(f"{k}{v}" for k, v in c.items()), lambda ins=ins: scan(ins, True), c)
                    for c in sweep
                ]
            if peer is not None and flags == "peer":
                variants.append(("mamba_ssm selective_scan_fn", lambda ins=ins: peer(**ins), {}))
            t_base = None
            for name, fn, cfg in variants:
                fused_seq.CONFIG_OVERRIDE = dict(cfg)
                try:
                    err = rel(fn(), ref)
                    ms = do_bench(fn, warmup=10, rep=60, return_mode="median")
                except Exception as e:  # noqa: BLE001 (a configuration that fails to compile is reported, not fatal)
                    add({**base, "impl": name, "error": f"{type(e).__name__}: {str(e)[:200]}"})
                    continue
                finally:
                    fused_seq.CONFIG_OVERRIDE = {}
                t_base = t_base or ms
                add({**base, "impl": name, "ms": ms, "rel_err_vs_nloop": err, "speedup_vs_copies_nloop": t_base / ms,
                     "bw_fraction": gb / (ms * 1e-3) / bw * 1e9})  # fmt: skip
    fused.SEQUENTIAL_FORWARD = True


def model_rows(args, add) -> None:
    from ssmtune import StateOffsetConfig, get_peft_model
    from ssmtune.models import MambaConfig, MambaForCausalLM
    from ssmtune.train.loop import apply_precision

    torch.manual_seed(0)
    shape = (
        {"d_model": 768, "n_layer": 24, "vocab_size": 50280}
        if DEVICE == "cuda"
        else {"d_model": 16, "n_layer": 2, "vocab_size": 64}
    )
    with torch.device(DEVICE):
        base = MambaForCausalLM(MambaConfig(**shape))
    apply_precision(base.requires_grad_(False), "bf16")  # frozen weights to bf16 (A_log and D stay fp32)
    models = {"none": base.eval()}
    with torch.device(DEVICE):
        tuned = MambaForCausalLM(MambaConfig(**shape))
    tuned.load_state_dict(base.state_dict())
    tuned = get_peft_model(tuned, StateOffsetConfig(variant="h"))
    apply_precision(tuned.requires_grad_(False), "bf16")
    models["state_offset_h"] = tuned.eval()
    for b, seqlen in MODEL_SIZES:
        ids = torch.randint(0, shape["vocab_size"], (b, seqlen), device=DEVICE)
        for method, model in models.items():
            outs = {}
            for sequential in (False, True):
                if time.monotonic() > args.deadline:
                    return
                fused.SEQUENTIAL_FORWARD = sequential

                def fwd(model=model, ids=ids):
                    with torch.no_grad():
                        out = model(ids)
                    return getattr(out, "logits", out)

                outs[sequential] = fwd()
                ms = do_bench(fwd, warmup=100, rep=1000, return_mode="median")  # 20-60 forwards
                add({"model": "mamba-130m shape", "method": method, "B": b, "L": seqlen, "sequential": sequential,
                     "ms": ms, "tokens_per_s": b * seqlen / (ms * 1e-3)})  # fmt: skip
            fused.SEQUENTIAL_FORWARD = True
            add({"model": "mamba-130m shape", "method": method, "B": b, "L": seqlen,
                 "logits_rel_err_seq_vs_nloop": rel(outs[True], outs[False])})  # fmt: skip


def smoke() -> None:
    """Tiny shapes on the CPU (the kernels under ``TRITON_INTERPRET=1``), timed by the wall clock: tests the script."""
    global DEVICE, SHAPES, DSTATE, SWEEP, MODEL_SIZES, do_bench
    DEVICE, SHAPES, DSTATE, SWEEP, MODEL_SIZES = "cpu", [(2, 4)], 4, SWEEP[:2], [(2, 16)]

    def do_bench(fn, warmup=0, rep=0, return_mode="median"):
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3


def compiled_kernels(kernel) -> list[dict]:
    """Registers and spills of every compiled variant of a (heuristics-wrapped) Triton kernel: its constexprs."""
    out = []
    jit = getattr(kernel, "fn", kernel)
    try:
        for cache in getattr(jit, "device_caches", {}).values():
            for key, k in (cache[0] if isinstance(cache, tuple) else cache).items():
                out.append({"key": str(key)[-300:], "n_regs": getattr(k, "n_regs", None),
                            "n_spills": getattr(k, "n_spills", None)})  # fmt: skip
    except Exception as e:  # noqa: BLE001 (Triton's cache layout is internal: report instead of failing the run)
        out.append({"error": f"{type(e).__name__}: {e}"})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench_scan_inference.json")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--sweep", action="store_true", help="also time SWEEP's launch configurations (peer flags)")
    ap.add_argument("--no-model", action="store_true")
    ap.add_argument("--parts", default="kernels,model", help="what to time, in this order (kernels, model)")
    ap.add_argument("--budget-s", type=float, default=240.0)
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes, wall-clock timing")
    args = ap.parse_args()
    if args.smoke:
        smoke()
        args.seqlen = 12
    args.deadline = time.monotonic() + args.budget_s
    meta = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke)", "torch": torch.__version__, "triton": triton.__version__,
            "command": " ".join(sys.argv)}  # fmt: skip
    rows: list[dict] = []

    def add(row: dict) -> None:  # rewritten per row: a run cut short keeps what it measured
        rows.append(row)
        print(json.dumps(row), flush=True)
        Path(args.out).write_text(json.dumps({**meta, "rows": rows}, indent=1))

    meta["copy_bandwidth_TBps"] = (bw := copy_bandwidth()) / 1e12
    for part in args.parts.split(","):
        if part == "kernels":
            kernel_rows(args, bw, add)
        elif part == "model" and not args.no_model:
            model_rows(args, add)
    meta["sequential_kernels"] = compiled_kernels(fused_seq.selective_scan_fwd_seq_kernel)
    Path(args.out).write_text(json.dumps({**meta, "rows": rows}, indent=1))
    print(
        f"\n{meta}\n| B | D | flags | impl | ms | x vs copies + n-loop | of copy BW | err |\n|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        if "impl" in r and "ms" in r:
            print(f"| {r['B']} | {r['D']} | {r['flags']} | {r['impl']} | {r['ms']:.3f} | {r['speedup_vs_copies_nloop']:.2f} "
                  f"| {r['bw_fraction']:.1%} | {r['rel_err_vs_nloop']:.1e} |")  # fmt: skip
        elif "impl" in r:
            print(f"| {r['B']} | {r['D']} | {r['flags']} | {r['impl']} | {r['error']} | | | |")
    print("\n| model | method | B x L | sequential | ms | tokens/s |\n|---|---|---|---|---|---|")
    for r in rows:
        if "tokens_per_s" in r:
            print(f"| {r['model']} | {r['method']} | {r['B']} x {r['L']} | {r['sequential']} | {r['ms']:.2f} "
                  f"| {r['tokens_per_s']:,.0f} |")  # fmt: skip
        elif "logits_rel_err_seq_vs_nloop" in r:
            print(f"| {r['model']} | {r['method']} | {r['B']} x {r['L']} | logits rel. err. | "
                  f"{r['logits_rel_err_seq_vs_nloop']:.1e} | |")  # fmt: skip


if __name__ == "__main__":
    main()
