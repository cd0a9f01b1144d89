"""Mamba-2 SSD scan: ssmtune's Triton kernels (bare / + h0 / + h' and y') against mamba_ssm and torch chunked paths.

Run on a CUDA machine (one H100: about 2 minutes; ``--budget-s`` stops starting new shapes after that many seconds):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/mamba_ssm*.whl
    PYTHONPATH=/tmp/site:. python3 benchmarks/bench_ssd.py --out $OUT/bench_ssd.json

CPU smoke test (Triton interpreter, one tiny shape, wall-clock timings that mean nothing):

    PYTHONPATH=. python3 benchmarks/bench_ssd.py --tiny --out /tmp/bench_ssd.json

Shapes: B 8, P 64, N 128, bf16, chunk 256, L in {2048, 8192} x H in {24, 64} x G in {1, 8}. Every case runs with
D [H], z, dt_bias and dt_softplus as in a Mamba-2 block; h0 / h' / y' are shared over the batch ([H, ...]).
Variants: ours, ours+h0, ours+h'+y' (dh' as one GEMM after the serial loop, h' pre-cast for the dots) and
ours+h'+y' old (the previous path, selected through ``fused.CONFIG_OVERRIDE``: dh' accumulated in the serial reverse
chunk loop, h' loaded in fp32); peers mamba_ssm+h0 (``mamba_chunk_scan_combined`` from the pure wheel, when
importable), torch+h0 (ssmtune's ``ssd_scan_torch``) and hf-torch+h0 (transformers' ``mamba2_chunk_scan`` torch path,
gate applied outside, when the installed transformers has it); the two torch peers only at L = 2048 (slow, memory).

Times are medians of ``triton.testing.do_bench`` (best of two interleaved rounds) after a warm-up fwd+bwd of every
variant. Before timing, ``--prewarm-procs`` subprocesses run every variant once at batch 1 on the same shapes, so the
Triton compilations (which do not depend on the batch) happen in parallel and land in the on-disk cache. "peak" is
the peak allocated memory of one fwd+bwd above the inputs. Per shape, the gradients of the new and old h' paths are
compared (``check`` in the JSON). The JSON is rewritten after every shape, so a run cut short still leaves its rows.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

if "--tiny" in sys.argv or not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' import

import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssmtune.ops.ssd import fused

# (L, H, G), most informative first, so that a run cut short by --budget-s still spans the grid; B 8, P 64, N 128
SHAPE_LHG = [
    (8192, 64, 8),
    (2048, 24, 1),
    (8192, 24, 1),
    (2048, 64, 8),
    (8192, 64, 1),
    (2048, 24, 8),
    (8192, 24, 8),
    (2048, 64, 1),
]
SHAPES = [(8, L, H, 64, 128, G) for L, H, G in SHAPE_LHG]
TINY_SHAPES = [(1, 40, 4, 8, 16, 2)]
OLD_PATH = {"DH_OFF_IN_LOOP": 1, "H_OFF_FP32": 1}
NEW_NAME, OLD_NAME = "ours+h'+y'", "ours+h'+y' old"
TORCH_PEER_MAX_L = 2048


@contextlib.contextmanager
def override(cfg: dict):
    saved = dict(fused.CONFIG_OVERRIDE)
    fused.CONFIG_OVERRIDE.update(cfg)
    try:
        yield
    finally:
        fused.CONFIG_OVERRIDE.clear()
        fused.CONFIG_OVERRIDE.update(saved)


def make(b, seqlen, h, p, n, g, dtype, device):
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


def _hf_chunk_scan():
    """transformers' torch chunked SSD (the undecorated function), or a reason why it is not there."""
    try:
        mod = importlib.import_module("transformers.models.mamba2.modeling_mamba2")
    except Exception as e:  # noqa: BLE001 - optional peer
        return None, f"transformers unavailable: {type(e).__name__}: {str(e)[:100]}"
    fn = getattr(mod, "mamba2_chunk_scan", None)
    if fn is None:
        return None, "this transformers has no standalone mamba2_chunk_scan (torch path inlined in Mamba2Mixer)"
    return inspect.unwrap(fn), None  # skip the hub-kernel / mamba_ssm dispatch wrapper


def variants(t, chunk_size: int, notes: list[str], peers: bool = True) -> dict:
    """name -> (fn, CONFIG_OVERRIDE to hold during its forward)."""
    common = {"D": t["D"], "z": t["z"], "dt_bias": t["dt_bias"], "dt_softplus": True}
    pos = (t["x"], t["dt"], t["A"], t["B"], t["C"])
    b, seqlen = t["x"].shape[:2]
    offsets = {"state_offset": t["h_off"], "y_offset": t["y_off"]}
    out = {
        "ours": (lambda: fused.ssd_scan_triton(*pos, chunk_size=chunk_size, **common), {}),
        "ours+h0": (lambda: fused.ssd_scan_triton(*pos, chunk_size=chunk_size, initial_state=t["h0"], **common), {}),
        NEW_NAME: (lambda: fused.ssd_scan_triton(*pos, chunk_size=chunk_size, **offsets, **common), {}),
        OLD_NAME: (lambda: fused.ssd_scan_triton(*pos, chunk_size=chunk_size, **offsets, **common), OLD_PATH),
    }
    if not peers:
        return out
    h0_rows = t["h0"].unsqueeze(0).expand(b, -1, -1, -1)
    if t["x"].is_cuda:
        try:
            from _mamba_ssm_loader import load_mamba_chunk_scan_combined

            mamba = load_mamba_chunk_scan_combined()
            out["mamba_ssm+h0"] = (lambda: mamba(*pos, chunk_size, initial_states=h0_rows, **common), {})
        except Exception as e:  # noqa: BLE001 - optional peer
            notes.append(f"mamba_ssm unavailable: {type(e).__name__}: {str(e)[:120]}")
    if seqlen > TORCH_PEER_MAX_L:
        notes.append(f"L={seqlen}: torch peers skipped (only L <= {TORCH_PEER_MAX_L}: slow, memory)")
        return out
    from ssmtune.ops.ssd.chunk import ssd_scan_torch

    out["torch+h0"] = (lambda: ssd_scan_torch(*pos, chunk_size=chunk_size, initial_state=t["h0"], **common), {})
    hf, why = _hf_chunk_scan()
    if hf is None:
        notes.append(f"hf-torch+h0 skipped: {why}")
    else:

        def hf_fn():
            y = hf(*pos, chunk_size, D=t["D"], dt_bias=t["dt_bias"], initial_states=h0_rows, dt_softplus=True)
            return (y * torch.nn.functional.silu(t["z"].float())).to(t["x"].dtype)

        out["hf-torch+h0"] = (hf_fn, {})
    return out


def _timer(cuda: bool):
    if cuda:
        from triton.testing import do_bench

        return lambda fn, rep: do_bench(fn, warmup=10, rep=rep, return_mode="median")

    def wall(fn, rep):  # the interpreter: a smoke test, not a measurement
        ts = []
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return min(ts)

    return wall


def measure_all(fns: dict, t, cuda: bool, rep: int, rounds: int = 2) -> dict[str, dict]:
    """Warm up every variant first (compile/autotune), then time them in interleaved rounds; keep the best median."""
    leaves = list(t.values())
    dy = torch.randn_like(t["x"])

    def with_cfg(fn, cfg):
        def run():
            with override(cfg):
                return fn()

        return run

    fwd = {n: with_cfg(fn, cfg) for n, (fn, cfg) in fns.items()}
    fwd_bwd = {n: (lambda f=f: torch.autograd.grad(f(), leaves, dy, allow_unused=True)) for n, f in fwd.items()}
    res: dict[str, dict] = {}
    for name in fns:
        try:
            fwd_bwd[name]()
        except Exception as e:  # noqa: BLE001 - record the failure and keep benchmarking
            res[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    bench = _timer(cuda)
    ok = [n for n in fns if n not in res]
    for n in ok:
        res[n] = {"fwd_ms": float("inf"), "fwd_bwd_ms": float("inf")}
    for _ in range(rounds):
        for n in ok:
            with torch.no_grad():
                res[n]["fwd_ms"] = min(res[n]["fwd_ms"], bench(fwd[n], rep))
            res[n]["fwd_bwd_ms"] = min(res[n]["fwd_bwd_ms"], bench(fwd_bwd[n], rep))
    for n in ok:
        if not cuda:
            res[n]["peak_gib"] = float("nan")
            continue
        sync()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd[n]()
        sync()
        res[n]["peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    return res


def check_paths(t, chunk_size: int) -> dict:
    """Gradients of the new h' path against the old one (same inputs): RMS of the difference over RMS of the old."""
    leaves = list(t.values())
    dy = torch.randn_like(t["x"])
    common = {"D": t["D"], "z": t["z"], "dt_bias": t["dt_bias"], "dt_softplus": True}
    grads = []
    for cfg in ({}, OLD_PATH):
        with override(cfg):
            y = fused.ssd_scan_triton(
                t["x"], t["dt"], t["A"], t["B"], t["C"], chunk_size=chunk_size, state_offset=t["h_off"],
                y_offset=t["y_off"], **common,
            )  # fmt: skip
        grads.append(torch.autograd.grad(y, leaves, dy, allow_unused=True))
    out = {}
    for name, new, old in zip(t, *grads):
        if new is not None and old is not None:
            out[name] = ((new.float() - old.float()).norm() / old.float().norm().clamp_min(1e-30)).item()
    return out


def prewarm(shapes, chunk_size: int, procs: int, timeout_s: float, peers: bool, tiny: bool) -> list[str]:
    """Compile every variant at batch 1 in parallel subprocesses; the kernels land in Triton's on-disk cache.

    One job per shape for ssmtune's variants, plus one job for mamba_ssm's autotuned kernels (its autotune keys hold no
    batch, length or head count, so one shape compiles them all), started first because it is the longest.
    """
    script = str(Path(__file__).resolve())
    todo = ([("mamba", 0)] if peers else []) + [("ours", i) for i in range(len(shapes))]
    running: list[tuple[tuple[str, int], subprocess.Popen, object]] = []
    failures, t0 = [], time.time()
    while todo or running:
        while todo and len(running) < procs:
            job = todo.pop(0)
            cmd = [sys.executable, script, "--warm-only", f"{job[0]}:{job[1]}", "--chunk-size", str(chunk_size)]
            cmd += ["--tiny"] if tiny else []
            err = tempfile.TemporaryFile()  # noqa: SIM115 - closed below; not a pipe, a chatty child must not block
            running.append((job, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err), err))
        time.sleep(0.2)
        for item in list(running):
            job, p, err = item
            if p.poll() is not None:
                running.remove(item)
                if p.returncode:
                    err.seek(0)
                    failures.append(f"prewarm {job} rc {p.returncode}: {err.read().decode(errors='replace')[-300:]}")
                err.close()
            elif time.time() - t0 > timeout_s:
                p.kill()
                p.wait()
                running.remove(item)
                err.close()
                failures.append(f"prewarm {job} killed after {timeout_s:.0f} s")
    return failures


def warm_only(job: str, chunk_size: int, tiny: bool) -> None:
    what, index = job.split(":")
    _, seqlen, h, p, n, g = (TINY_SHAPES if tiny else SHAPES)[int(index)]
    t = make(1, seqlen, h, p, n, g, torch.bfloat16, "cpu" if tiny else "cuda")
    leaves = list(t.values())
    for name, (fn, cfg) in variants(t, chunk_size, [], peers=what == "mamba").items():
        if name.startswith(what):
            with override(cfg):
                y = fn()
            torch.autograd.grad(y, leaves, torch.ones_like(y), allow_unused=True)
    if not tiny:
        torch.cuda.synchronize()


def print_table(meta: dict, rows: list[dict], notes: list[str]) -> None:
    print(f"\n{json.dumps(meta)}")
    for note in dict.fromkeys(notes):
        print(f"note: {note}")
    print(f"{'shape':<22}{'impl':<16}{'fwd ms':>9}{'fwd+bwd ms':>12}{'peak GiB':>10}{'vs ours':>9}{'vs mamba':>10}")
    for r in rows:
        shape = f"L={r['L']} H={r['H']} G={r['G']}"
        if "error" in r:
            print(f"{shape:<22}{r['impl']:<16}  {r['error'][:80]}")
            continue
        same = [q for q in rows if (q["L"], q["H"], q["G"]) == (r["L"], r["H"], r["G"]) and "fwd_bwd_ms" in q]
        ref = {q["impl"]: q["fwd_bwd_ms"] for q in same}
        vs_ours = r["fwd_bwd_ms"] / ref["ours"] if "ours" in ref else float("nan")
        vs_mamba = r["fwd_bwd_ms"] / ref["mamba_ssm+h0"] if "mamba_ssm+h0" in ref else float("nan")
        print(
            f"{shape:<22}{r['impl']:<16}{r['fwd_ms']:>9.3f}{r['fwd_bwd_ms']:>12.3f}{r['peak_gib']:>10.2f}"
            f"{vs_ours:>9.2f}{vs_mamba:>10.2f}"
        )
    print("\nh'+y' overhead (fwd+bwd / bare; target <= 1.05), new path vs old:")
    seen = []
    for r in rows:
        key = (r["L"], r["H"], r["G"])
        if key in seen:
            continue
        seen.append(key)
        ref = {q["impl"]: q for q in rows if (q["L"], q["H"], q["G"]) == key and "fwd_bwd_ms" in q}
        if "ours" not in ref:
            continue

        def ratio(name, col, ref=ref):
            return f"{ref[name][col] / ref['ours'][col]:.3f}" if name in ref else "  -  "

        print(
            f"  L={key[0]} H={key[1]} G={key[2]}: fwd+bwd new {ratio(NEW_NAME, 'fwd_bwd_ms')}"
            f" old {ratio(OLD_NAME, 'fwd_bwd_ms')} | fwd new {ratio(NEW_NAME, 'fwd_ms')} old {ratio(OLD_NAME, 'fwd_ms')}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench_ssd.json"))
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--budget-s", type=float, default=150.0, help="stop starting new shapes after this many seconds")
    ap.add_argument("--shapes", type=int, default=len(SHAPES), help="run only the first K shapes")
    ap.add_argument("--rep-ms", type=int, default=100, help="do_bench rep (ms) per timing")
    ap.add_argument(
        "--prewarm-procs", type=int, default=None, help="parallel compile subprocesses (0: none; default 9, --tiny 1)"
    )
    ap.add_argument("--no-peers", action="store_true", help="only ssmtune's variants")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test under the Triton interpreter, one tiny shape")
    ap.add_argument("--warm-only", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda:
        args.chunk_size = 16
    if args.warm_only is not None:
        warm_only(args.warm_only, args.chunk_size, not cuda)
        return
    if args.prewarm_procs is None:
        args.prewarm_procs = 9 if cuda else 1
    shapes = SHAPES[: args.shapes] if cuda else TINY_SHAPES
    dtype = torch.bfloat16
    from _mamba_ssm_loader import mamba_ssm_version

    meta = {
        "device": torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "mamba_ssm": mamba_ssm_version(),
        "python": platform.python_version(),
        "dtype": str(dtype)[6:],
        "chunk_size": args.chunk_size,
        "rep_ms": args.rep_ms,
        "command": " ".join(sys.argv),
    }
    t_start = time.time()
    notes: list[str] = []
    if args.prewarm_procs > 0:
        notes += prewarm(
            shapes, args.chunk_size, args.prewarm_procs, 0.6 * args.budget_s, cuda and not args.no_peers, not cuda
        )
        meta["prewarm_s"] = round(time.time() - t_start, 1)
        print(f"prewarm: {meta['prewarm_s']} s", flush=True)
    rows, checks = [], []
    for b, seqlen, h, p, n, g in shapes:
        if time.time() - t_start > args.budget_s:
            notes.append(f"budget {args.budget_s:.0f} s reached: L={seqlen} H={h} G={g} not measured")
            continue
        t = make(b, seqlen, h, p, n, g, dtype, "cuda" if cuda else "cpu")
        shape_notes: list[str] = []
        fns = variants(t, args.chunk_size, shape_notes, peers=not args.no_peers)
        notes += shape_notes
        for name, r in measure_all(fns, t, cuda, args.rep_ms).items():
            row = {"B": b, "L": seqlen, "H": h, "P": p, "N": n, "G": g, "impl": name, **r}
            row["tokens_per_s_fwd_bwd"] = b * seqlen / row["fwd_bwd_ms"] * 1e3 if "fwd_bwd_ms" in row else None
            rows.append(row)
            print(json.dumps(row), flush=True)
        chk = {"L": seqlen, "H": h, "G": g, "rel_rms_new_vs_old": check_paths(t, args.chunk_size)}
        checks.append(chk)
        print(json.dumps(chk), flush=True)
        meta["elapsed_s"] = round(time.time() - t_start, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "rows": rows, "checks": checks, "notes": notes}, indent=1))
        del t, fns
        if cuda:
            torch.cuda.empty_cache()
    meta["elapsed_s"] = round(time.time() - t_start, 1)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows, "checks": checks, "notes": notes}, indent=1))
    worst = max((v for c in checks for v in c["rel_rms_new_vs_old"].values()), default=float("nan"))
    notes.append(f"new vs old h' path, worst gradient rel. RMS difference over shapes and inputs: {worst:.2e}")
    print_table(meta, rows, notes)


if __name__ == "__main__":
    main()
