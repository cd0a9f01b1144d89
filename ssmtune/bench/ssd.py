"""Mamba-2 SSD scan: ssmtune's Triton kernels (bare, + h0, + h' and y') against mamba_ssm and torch chunked paths.

Shapes: B 8, P 64, N 128, bf16, chunk 256, L in {2048, 8192} x H in {24, 64} x G in {1, 8} (``--shapes K``: the first
K, most informative first). Every case runs with D [H], z, dt_bias and dt_softplus as in a Mamba-2 block; h0 / h' / y'
are shared over the batch. Variants: ``bare``, ``h0`` (the peers run this one: mamba_ssm's
``mamba_chunk_scan_combined``, ssmtune's torch chunked path, transformers' ``mamba2_chunk_scan`` when it has one; the
torch paths only up to L 2048, for memory) and ``h'+y'``. Before any timing, each implementation is checked against the
fp32 reference on a small case (outputs and gradients); a peer that fails is reported, not timed. mamba_ssm autotunes
~140 kernel configurations on its first call: ``--mamba-autotune quick`` shortens their timing, ``one`` skips it.
"""

from __future__ import annotations

import argparse
import functools

import torch

from ssmtune.bench.common import CheckFailed, check_op, free_memory, measure_op, op_table
from ssmtune.bench.peers import hf_mamba2_chunk_scan, mamba_ssm_chunk_scan, set_mamba_autotune
from ssmtune.bench.registry import Benchmark, register

# (L, H, G), most informative first
SHAPE_LHG = [(8192, 64, 8), (2048, 24, 1), (8192, 24, 1), (2048, 64, 8), (8192, 64, 1), (2048, 24, 8), (8192, 24, 8),
             (2048, 64, 1)]  # fmt: skip
TORCH_PEER_MAX_L = 2048


def make(b, seqlen, h, p, n, g, dtype, device) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape, dt=torch.float32):
        return torch.randn(*shape, generator=gen).to(device, dt)

    return {
        "x": rnd(b, seqlen, h, p, dt=dtype),
        "dt": (rnd(b, seqlen, h) * 0.5 - 1.0).to(dtype),
        "A": -torch.rand(h, generator=gen).to(device) - 0.5,
        "B": (rnd(b, seqlen, g, n) / n**0.5).to(dtype),
        "C": rnd(b, seqlen, g, n, dt=dtype),
        "D": rnd(h),
        "z": rnd(b, seqlen, h, p, dt=dtype),
        "dt_bias": rnd(h) * 0.5,
        "h0": rnd(h, p, n) * 0.1,
        "h_off": rnd(h, p, n) * 0.1,
        "y_off": rnd(h, p) * 0.1,
    }


def implementations(chunk: int, peers: dict) -> dict[tuple[str, str], object]:
    """(variant, impl) -> fn(**tensors) returning y."""
    from ssmtune.ops.ssd.chunk import ssd_scan_torch
    from ssmtune.ops.ssd.fused import ssd_scan_triton

    def common(t):
        return {"D": t["D"], "z": t["z"], "dt_bias": t["dt_bias"], "dt_softplus": True}

    def pos(t):
        return t["x"], t["dt"], t["A"], t["B"], t["C"]

    def rows_h0(t):
        return t["h0"].unsqueeze(0).expand(t["x"].shape[0], -1, -1, -1)

    out = {
        ("bare", "ssmtune"): lambda **t: ssd_scan_triton(*pos(t), chunk_size=chunk, **common(t)),
        ("h0", "ssmtune"): lambda **t: ssd_scan_triton(*pos(t), chunk_size=chunk, initial_state=t["h0"], **common(t)),
        ("h'+y'", "ssmtune"): lambda **t: ssd_scan_triton(
            *pos(t), chunk_size=chunk, state_offset=t["h_off"], y_offset=t["y_off"], **common(t)
        ),
        ("h0", "torch"): lambda **t: ssd_scan_torch(*pos(t), chunk_size=chunk, initial_state=t["h0"], **common(t)),
    }
    if (mamba := peers["mamba_ssm"][0]) is not None:
        out["h0", "mamba_ssm"] = lambda **t: mamba(*pos(t), chunk, initial_states=rows_h0(t), **common(t))
    if (hf := peers["transformers"][0]) is not None:

        def hf_fn(**t):
            y = hf(*pos(t), chunk, D=t["D"], dt_bias=t["dt_bias"], initial_states=rows_h0(t), dt_softplus=True)
            return (y * torch.nn.functional.silu(t["z"].float())).to(t["x"].dtype)  # the gate outside

        out["h0", "transformers"] = hf_fn
    return out


def reference(variant: str):
    from ssmtune.ops.ssd.naive import ssd_scan_ref

    extra = {"bare": lambda t: {}, "h0": lambda t: {"initial_state": t["h0"]},
             "h'+y'": lambda t: {"state_offset": t["h_off"], "y_offset": t["y_off"]}}[variant]  # fmt: skip
    return lambda **t: ssd_scan_ref(t["x"], t["dt"], t["A"], t["B"], t["C"], D=t["D"], z=t["z"], dt_bias=t["dt_bias"],
                                    dt_softplus=True, **extra(t))  # fmt: skip


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--shapes", type=int, default=len(SHAPE_LHG), help="run only the first K shapes")
    ap.add_argument("--small", action="store_true", help="one small shape (B 1, L 64, H 4, P 16, N 16): a smoke test")
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--rep-ms", type=int, default=100, help="do_bench time per measurement")
    ap.add_argument("--no-peers", action="store_true", help="time ssmtune's kernels only")
    ap.add_argument("--mamba-autotune", choices=["full", "quick", "one"], default="quick",
                    help="mamba_ssm's autotuning: as shipped, short timings per config, or one config per kernel")  # fmt: skip


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    none = (None, "disabled (--no-peers)")
    peers = {"mamba_ssm": none, "transformers": none}
    if not args.no_peers:
        peers = {"mamba_ssm": mamba_ssm_chunk_scan(), "transformers": hf_mamba2_chunk_scan()}
        if peers["mamba_ssm"][0] is not None:
            set_mamba_autotune(args.mamba_autotune)
    if args.small:
        shapes, chunk = [(1, 64, 4, 16, 16, 2)], 16
    else:
        shapes, chunk = [(8, L, H, 64, 128, G) for L, H, G in SHAPE_LHG[: args.shapes]], args.chunk_size
    impls = implementations(chunk, peers)
    notes = {"torch": "ssmtune backend torch"} | {k: v[1] for k, v in peers.items()}
    # the check: fp32, L 80 over chunks of 32 (a ragged last chunk), two groups
    small = make(2, 80, 4, 16, 16, 2, torch.float32, device)
    check, failed = {}, {}
    for (variant, impl), fn in impls.items():
        ours = impl == "ssmtune"
        try:
            fn32 = implementations(32, peers)[variant, impl]
            # on CUDA the kernels' fp32 dots run in tf32 (as the GPU tests' tolerance allows)
            tol = (5e-3 if device.type == "cuda" else 1e-3) if ours else 1e-2
            check[f"{impl} {variant}"] = check_op(f"{impl} {variant}", reference(variant), fn32, small, tol)
        except Exception as e:  # a peer that fails its check or errors is reported, not timed
            if ours:
                raise
            failed[impl] = f"check failed: {e}" if isinstance(e, CheckFailed) else f"error: {type(e).__name__}: {e}"
    rows = []
    for b, seqlen, h, p, n, g in shapes:
        t = make(b, seqlen, h, p, n, g, torch.bfloat16, device)
        for v in t.values():
            v.requires_grad_()
        for (variant, impl), fn in impls.items():
            row = {"L": seqlen, "H": h, "G": g, "variant": variant, "impl": impl}
            rows.append(row)
            if impl in failed:
                row["status"] = failed[impl]
                continue
            if impl in ("torch", "transformers") and seqlen > TORCH_PEER_MAX_L:
                row["status"] = f"skipped (L > {TORCH_PEER_MAX_L}: slow, memory)"
                continue
            try:
                row |= measure_op(functools.partial(fn, **t), list(t.values()), device, args.rep_ms)
            except Exception as e:  # a peer failing at one shape (e.g. out of memory) loses only its row
                if impl == "ssmtune":
                    raise
                row["status"] = f"error: {type(e).__name__}: {str(e)[:120]}"
                continue
            print(f"L {seqlen} H {h} G {g} {variant} {impl}: fwd {row['fwd_ms']:.3f} ms, "
                  f"fwd+bwd {row['fwd_bwd_ms']:.3f} ms", flush=True)  # fmt: skip
        del t
        free_memory(device)
    for impl in ("mamba_ssm", "transformers"):
        if not any(k[1] == impl for k in impls):
            rows.append(
                {"L": "-", "H": "-", "G": "-", "variant": "h0", "impl": impl, "status": f"unavailable: {notes[impl]}"}
            )
    return {"shape": {"B": shapes[0][0], "P": shapes[0][3], "N": shapes[0][4], "chunk": chunk, "dtype": "bf16"},
            "peers": notes | failed, "check_rel_err": check, "rows": rows,
            "table": op_table(rows, ("L", "H", "G", "variant"))}  # fmt: skip


register(Benchmark("ssd", "Mamba-2 SSD scan kernels (fwd, fwd+bwd) against mamba_ssm, transformers and torch",
                   add_args, run, needs_cuda=True))  # fmt: skip
