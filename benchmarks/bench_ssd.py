"""Mamba-2 SSD scan: ssmtune's Triton kernels (bare / + h0 / + h' and y') against mamba_ssm and a torch chunked path.

Run on a CUDA machine after the correctness tests (``pytest -m gpu tests/ops/test_ssd_triton.py``):

    PYTHONPATH=.:/tmp/site python3 benchmarks/bench_ssd.py --out $OUT/bench_ssd.json

Times are medians of ``triton.testing.do_bench`` (best of two interleaved rounds) after a warm-up fwd+bwd of every
variant (cold compile/autotune excluded).
Every case runs with D [H], z, dt_bias and dt_softplus as in a Mamba-2 block; "peak" is the peak allocated memory of
one fwd+bwd above the inputs. The JSON is rewritten after every shape, so a run cut short still leaves its results.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssmtune.ops.ssd.fused import ssd_scan_triton

# (B, L, H, P, N, G): the most different shapes first, so that a run cut short by --budget-s still spans the grid
SHAPES = [
    (8, L, H, 64, 128, G)
    for L, H, G in [(8192, 64, 8), (2048, 64, 8), (8192, 24, 1), (2048, 24, 1), (2048, 24, 8), (8192, 64, 1)]
]


def make(b, seqlen, h, p, n, g, dtype=torch.bfloat16, device="cuda"):
    act = {"dtype": dtype, "device": device}
    t = {
        "x": torch.randn(b, seqlen, h, p, **act),
        "dt": torch.randn(b, seqlen, h, **act) * 0.5 - 1.0,
        "A": -torch.rand(h, device=device) - 0.5,
        "B": torch.randn(b, seqlen, g, n, **act) / n**0.5,
        "C": torch.randn(b, seqlen, g, n, **act),
        "D": torch.randn(h, device=device),
        "z": torch.randn(b, seqlen, h, p, **act),
        "dt_bias": torch.randn(h, device=device) * 0.5,
        "h0": torch.randn(h, p, n, device=device) * 0.1,
        "h_off": torch.randn(h, p, n, device=device) * 0.1,
        "y_off": torch.randn(h, p, device=device) * 0.1,
    }
    for v in t.values():
        v.requires_grad_()
    return t


def variants(t, chunk_size: int) -> dict:
    common = {"D": t["D"], "z": t["z"], "dt_bias": t["dt_bias"], "dt_softplus": True}
    pos = (t["x"], t["dt"], t["A"], t["B"], t["C"])
    out = {
        "ours": lambda: ssd_scan_triton(*pos, chunk_size=chunk_size, **common),
        "ours+h0": lambda: ssd_scan_triton(*pos, chunk_size=chunk_size, initial_state=t["h0"], **common),
        "ours+h'+y'": lambda: ssd_scan_triton(
            *pos, chunk_size=chunk_size, state_offset=t["h_off"], y_offset=t["y_off"], **common
        ),
    }
    try:
        from _mamba_ssm_loader import load_mamba_chunk_scan_combined

        mamba = load_mamba_chunk_scan_combined()
        b = t["x"].shape[0]
        out["mamba_ssm+h0"] = lambda: mamba(
            *pos, chunk_size, initial_states=t["h0"].unsqueeze(0).expand(b, -1, -1, -1), **common
        )
    except ImportError as e:
        print(f"mamba_ssm unavailable: {e}", file=sys.stderr)
    try:
        torch_fn = importlib.import_module("ssmtune.ops.ssd.chunk").ssd_scan_torch
        if t["x"].shape[1] * t["x"].shape[2] <= 2048 * 24:
            out["torch+h0"] = lambda: torch_fn(*pos, chunk_size=chunk_size, initial_state=t["h0"], **common)
    except (ImportError, AttributeError):
        pass
    return out


def measure_all(fns: dict, t, rounds: int = 2) -> dict[str, dict]:
    """Warm up every variant first (compile/autotune), then time them in interleaved rounds; keep the best median."""
    leaves = list(t.values())
    dy = torch.randn_like(t["x"])
    fwd_bwd = {
        name: (lambda fn=fn: torch.autograd.grad(fn(), leaves, dy, allow_unused=True)) for name, fn in fns.items()
    }
    res: dict[str, dict] = {}
    for name in list(fns):
        try:
            fwd_bwd[name]()
        except Exception as e:  # noqa: BLE001 - record the failure and keep benchmarking
            res[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    torch.cuda.synchronize()
    ok = [n for n in fns if n not in res]
    for n in ok:
        res[n] = {"fwd_ms": float("inf"), "fwd_bwd_ms": float("inf")}
    for _ in range(rounds):
        for n in ok:
            with torch.no_grad():
                res[n]["fwd_ms"] = min(res[n]["fwd_ms"], do_bench(fns[n], return_mode="median"))
            res[n]["fwd_bwd_ms"] = min(res[n]["fwd_bwd_ms"], do_bench(fwd_bwd[n], return_mode="median"))
    for n in ok:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd[n]()
        torch.cuda.synchronize()
        res[n]["peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench_ssd.json"))
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--budget-s", type=float, default=240.0, help="stop starting new shapes after this many seconds")
    ap.add_argument("--shapes", type=int, default=len(SHAPES), help="run only the first K shapes")
    args = ap.parse_args()
    from _mamba_ssm_loader import mamba_ssm_version

    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "mamba_ssm": mamba_ssm_version(),
        "python": platform.python_version(),
        "dtype": "bfloat16",
        "chunk_size": args.chunk_size,
        "command": " ".join(sys.argv),
    }
    rows = []
    t_start = time.time()
    for b, seqlen, h, p, n, g in SHAPES[: args.shapes]:
        if time.time() - t_start > args.budget_s:
            print(f"budget reached, skipping B={b} L={seqlen} H={h} G={g}", file=sys.stderr)
            continue
        t = make(b, seqlen, h, p, n, g)
        for name, r in measure_all(variants(t, args.chunk_size), t).items():
            row = {"B": b, "L": seqlen, "H": h, "P": p, "N": n, "G": g, "impl": name, **r}
            row["tokens_per_s_fwd_bwd"] = b * seqlen / row["fwd_bwd_ms"] * 1e3 if "fwd_bwd_ms" in row else None
            rows.append(row)
            print(json.dumps(row), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        del t
        torch.cuda.empty_cache()
    print(f"\n{meta}")
    print(f"{'shape':<26}{'impl':<14}{'fwd ms':>9}{'fwd+bwd ms':>12}{'peak GiB':>10}{'vs ours':>9}{'vs mamba':>10}")
    for r in rows:
        shape = f"L={r['L']} H={r['H']} G={r['G']}"
        if "error" in r:
            print(f"{shape:<26}{r['impl']:<14}  {r['error'][:80]}")
            continue
        same = [q for q in rows if (q["L"], q["H"], q["G"]) == (r["L"], r["H"], r["G"]) and "fwd_bwd_ms" in q]
        ref = {q["impl"]: q["fwd_bwd_ms"] for q in same}
        vs_ours = r["fwd_bwd_ms"] / ref["ours"] if "ours" in ref else float("nan")
        vs_mamba = r["fwd_bwd_ms"] / ref["mamba_ssm+h0"] if "mamba_ssm+h0" in ref else float("nan")
        print(
            f"{shape:<26}{r['impl']:<14}{r['fwd_ms']:>9.3f}{r['fwd_bwd_ms']:>12.3f}{r['peak_gib']:>10.2f}"
            f"{vs_ours:>9.2f}{vs_mamba:>10.2f}"
        )


if __name__ == "__main__":
    main()
