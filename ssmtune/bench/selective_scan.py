"""Mamba-1 selective scan: ssmtune's Triton kernels against mamba_ssm's CUDA scan and ssmtune's torch backend.

Shape B 8, L 2048, N 16, bf16, D in {1536, 4096, 5120}. Variants: ``bare`` (no optional input), ``peer`` (D, z,
delta_bias, softplus: mamba_ssm's benchmark configuration; the peers run this one) and ``all`` (adds h0, h' and y',
with the final state). Before any timing, ours (every variant) and each peer are checked against the fp32 reference
on a small case, outputs and gradients; a peer that fails is reported, not timed. ``--config`` passes a launch
configuration to the kernels (``selective_scan_triton(config=...)``). Times are medians of ``do_bench``; the bandwidth
fraction uses the minimum bytes an op must move against the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import functools
import json

import torch

from ssmtune.bench.common import CheckFailed, check_op, copy_bandwidth, free_memory, measure_op, op_table
from ssmtune.bench.peers import mamba_ssm_selective_scan
from ssmtune.bench.registry import Benchmark, register

OPTIONAL = ("D", "z", "delta_bias", "initial_state", "state_offset", "y_offset")
VARIANTS = {"bare": (), "peer": ("D", "z", "delta_bias"), "all": OPTIONAL}


def make_inputs(b: int, d: int, seqlen: int, n: int, dtype: torch.dtype, flags, device) -> dict[str, torch.Tensor]:
    """Activations in ``dtype``; A, D, bias, h0, h', y' in fp32 (shared over the batch, as in the model)."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, dt=torch.float32):
        return torch.randn(*shape, generator=g).to(device, dt)

    ins = {
        "u": rnd(b, d, seqlen, dt=dtype),
        "delta": (0.5 * rnd(b, d, seqlen) - 2.0).to(dtype),
        "A": -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1).to(device),
        "B": rnd(b, n, seqlen, dt=dtype),
        "C": rnd(b, n, seqlen, dt=dtype),
        "D": rnd(d),
        "z": rnd(b, d, seqlen, dt=dtype),
        "delta_bias": 0.1 * rnd(d),
        "initial_state": rnd(d, n),
        "state_offset": rnd(d, n),
        "y_offset": rnd(d),
    }
    return {k: v for k, v in ins.items() if k not in OPTIONAL or k in flags}


def min_bytes(b: int, d: int, seqlen: int, n: int, itemsize: int, flags, backward: bool) -> int:
    """Bytes an ideal kernel moves: [B, D, L] activations and [B, N, L] B/C read once, outputs written once."""
    act, bc = b * d * seqlen * itemsize, b * n * seqlen * itemsize
    n_act = 2 + ("z" in flags)  # u, delta (, z)
    fwd = (n_act + 1) * act + 2 * bc  # + y
    return fwd if not backward else 2 * fwd + n_act * act + 2 * bc  # read inputs + dy, write their gradients


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--dstate", type=int, default=16)
    ap.add_argument("--dims", type=int, nargs="+", default=[1536, 4096, 5120])
    ap.add_argument("--small", action="store_true", help="one small shape (B 1, L 32, D 8): a smoke test")
    ap.add_argument("--config", type=json.loads, default=None,
                    help='launch configuration of the kernels as JSON, e.g. \'{"BLOCK_L": 128}\'')  # fmt: skip
    ap.add_argument("--rep-ms", type=int, default=100, help="do_bench time per measurement")
    ap.add_argument("--no-peers", action="store_true", help="time ssmtune's kernels only")


def run(args: argparse.Namespace) -> dict:
    from ssmtune.ops.selective_scan.fused import selective_scan_triton
    from ssmtune.ops.selective_scan.naive import selective_scan_ref
    from ssmtune.ops.selective_scan.parallel import selective_scan_torch

    device = torch.device(args.device)
    if args.small:
        args.batch, args.seqlen, args.dims = 1, 32, [8]
    ours = functools.partial(selective_scan_triton, config=args.config)
    peers = {"torch": (selective_scan_torch, "ssmtune backend torch")}
    if not args.no_peers:
        fn, note = mamba_ssm_selective_scan()
        peers["mamba_ssm"] = (fn, note)
    notes = {name: note for name, (_, note) in peers.items()}

    def scan(f, final: bool):
        return lambda **kw: f(**kw, delta_softplus=True, return_final_state=final)

    # the check: L 333 and 336 (the kernels specialise on L % 16), fp32; mamba_ssm ignores h_L's gradient
    check = {}
    for seqlen in (333, 336):
        small = make_inputs(2, 8 if args.small else 96, seqlen, args.dstate, torch.float32, OPTIONAL, device)
        check[f"ssmtune L{seqlen}"] = check_op("ssmtune", scan(selective_scan_ref, True), scan(ours, True), small, 1e-4)
        peer_in = {k: v for k, v in small.items() if k not in VARIANTS["all"] or k in VARIANTS["peer"]}
        for name, (fn, _) in list(peers.items()):
            if fn is None:
                continue
            try:
                err = check_op(name, scan(selective_scan_ref, False), scan(fn, False), peer_in, 1e-3)
                check[f"{name} L{seqlen}"] = err
            except Exception as e:  # noqa: BLE001 - a peer that fails its check or errors is reported, not timed
                why = f"check failed: {e}" if isinstance(e, CheckFailed) else f"error: {type(e).__name__}: {e}"
                peers[name] = (None, why)
                notes[name] = why
    bw = copy_bandwidth(device) if device.type == "cuda" else None
    b, seqlen, n = args.batch, args.seqlen, args.dstate
    rows = []
    for d in args.dims:
        for variant, flags in VARIANTS.items():
            impls = {"ssmtune": ours} | ({k: v[0] for k, v in peers.items()} if variant == "peer" else {})
            ins = make_inputs(b, d, seqlen, n, torch.bfloat16, flags, device)
            for t in ins.values():
                t.requires_grad_()
            for impl, fn in impls.items():
                row = {"D": d, "variant": variant, "impl": impl}
                rows.append(row)
                if fn is None:
                    row["status"] = f"unavailable: {notes[impl]}"
                    continue
                final = variant == "all"
                call = functools.partial(fn, **ins, delta_softplus=True, return_final_state=final)
                try:
                    row |= measure_op(lambda call=call: _y(call()), list(ins.values()), device, args.rep_ms)
                except Exception as e:  # a peer failing at one size (e.g. out of memory) loses only its row
                    if impl == "ssmtune":
                        raise
                    row["status"] = f"error: {type(e).__name__}: {str(e)[:120]}"
                    continue
                if bw:
                    row["fwd_bw_frac"] = min_bytes(b, d, seqlen, n, 2, flags, False) / (row["fwd_ms"] * 1e-3) / bw
                    row["fwd_bwd_bw_frac"] = (
                        min_bytes(b, d, seqlen, n, 2, flags, True) / (row["fwd_bwd_ms"] * 1e-3) / bw
                    )
                print(
                    f"D {d} {variant} {impl}: fwd {row['fwd_ms']:.3f} ms, fwd+bwd {row['fwd_bwd_ms']:.3f} ms",
                    flush=True,
                )
            del ins
            free_memory(device)
    return {"shape": {"B": b, "L": seqlen, "N": n, "dtype": "bf16"}, "config": args.config, "peers": notes,
            "copy_bandwidth_GBps": bw / 1e9 if bw else None, "check_rel_err": check, "rows": rows,
            "table": op_table(rows, ("D", "variant"))}  # fmt: skip


def _y(out):
    return out[0] if isinstance(out, tuple) else out


register(Benchmark("selective_scan", "Mamba-1 selective scan kernels (fwd, fwd+bwd) against mamba_ssm and torch",
                   add_args, run, needs_cuda=True))  # fmt: skip
