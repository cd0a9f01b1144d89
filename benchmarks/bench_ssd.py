"""Mamba-2 SSD scan: ssmtune's Triton kernels (bare / + h0 / + h' and y') against mamba_ssm and torch chunked paths.

Run on a CUDA machine (one H100: ~150 s with the default ``--budget-s 140``, which no variant is started past):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/mamba_ssm*.whl
    PYTHONPATH=/tmp/site:. timeout -k 5 170 python3 benchmarks/bench_ssd.py --out $OUT/bench_ssd.json

CPU smoke test (Triton interpreter, one tiny shape, wall-clock timings that mean nothing, ~30 s):

    PYTHONPATH=. python3 benchmarks/bench_ssd.py --tiny --out /tmp/bench_ssd.json

Shapes: B 8, P 64, N 128, bf16, chunk 256, L in {2048, 8192} x H in {24, 64} x G in {1, 8}. Every case runs with
D [H], z, dt_bias and dt_softplus as in a Mamba-2 block; h0 / h' / y' are shared over the batch ([H, ...]).
Variants: ours, ours+h0, ours+h'+y' (dh' accumulated in the serial reverse chunk loop, h' pre-cast for the dots);
peers mamba_ssm+h0 (``mamba_chunk_scan_combined`` from the pure wheel, when importable), torch+h0 (ssmtune's ``ssd_scan_torch``) and hf-torch+h0 (transformers' ``mamba2_chunk_scan`` torch path,
gate applied outside, when the installed transformers has it); the two torch peers only at L = 2048 (slow, memory).

Order: pass 1 runs ours on every shape, pass 2 the peers, so a run cut short has ours everywhere. Each variant prints
its row when measured (first call timed as ``warm_s``, one ``do_bench`` median, peak allocated memory of one fwd+bwd
above the inputs) and the JSON is rewritten; a second round per shape, interleaved over its variants, keeps the best
median. On the first shape a torch.profiler pass records each kernel's device time for ours / ours+h'+y'
(``meta.kernel_profile``, printed as a table), which shows which kernels the h' + y' overhead sits in.

Compilation is most of the cost (each shape has its own constexprs; mamba_ssm autotunes ~140 configs, compiled
serially on its first call). ``Prewarm`` compiles in parallel subprocesses while pass 1 runs: one job per shape for
ours, in shape order (pass 1 waits only for its shape's job), then jobs that compile disjoint slices of mamba_ssm's
configs; see ``_mamba_ssm_loader.set_mamba_autotune`` for what is patched. ``--budget-s`` is checked before every
variant against ``EST_S`` and enforced inside it by SIGALRM (which cannot cut a call blocked in C++).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import inspect
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _die_with_parent() -> None:
    """In a prewarm child: get SIGKILL when the parent dies, however it dies (Linux prctl PR_SET_PDEATHSIG)."""
    parent = int(os.environ.get("BENCH_SSD_PARENT", "0"))
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if parent and os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


if "--warm-only" in sys.argv:
    _die_with_parent()  # before the slow imports, so that a parent killed meanwhile takes us along

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
OFFSETS_NAME = "ours+h'+y'"
PROFILED = ("ours", OFFSETS_NAME)  # per-kernel device times on the first shape
TORCH_PEER_MAX_L = 2048


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


def ours_variants(t, chunk_size: int) -> dict:
    """name -> forward fn."""
    common = {"D": t["D"], "z": t["z"], "dt_bias": t["dt_bias"], "dt_softplus": True}
    pos = (t["x"], t["dt"], t["A"], t["B"], t["C"])
    offsets = {"state_offset": t["h_off"], "y_offset": t["y_off"]}
    return {
        "ours": lambda: fused.ssd_scan_triton(*pos, chunk_size=chunk_size, **common),
        "ours+h0": lambda: fused.ssd_scan_triton(*pos, chunk_size=chunk_size, initial_state=t["h0"], **common),
        OFFSETS_NAME: lambda: fused.ssd_scan_triton(*pos, chunk_size=chunk_size, **offsets, **common),
    }


def mamba_variant(t, chunk_size: int, mamba):
    common = {"D": t["D"], "z": t["z"], "dt_bias": t["dt_bias"], "dt_softplus": True}
    pos = (t["x"], t["dt"], t["A"], t["B"], t["C"])
    h0_rows = t["h0"].unsqueeze(0).expand(t["x"].shape[0], -1, -1, -1)
    return lambda: mamba(*pos, chunk_size, initial_states=h0_rows, **common)


def torch_variants(t, chunk_size: int, notes: list[str]) -> dict:
    """ssmtune's torch chunked path and transformers' (when it has a standalone one), both + h0."""
    from ssmtune.ops.ssd.chunk import ssd_scan_torch

    common = {"D": t["D"], "z": t["z"], "dt_bias": t["dt_bias"], "dt_softplus": True}
    pos = (t["x"], t["dt"], t["A"], t["B"], t["C"])
    out = {"torch+h0": lambda: ssd_scan_torch(*pos, chunk_size=chunk_size, initial_state=t["h0"], **common)}
    hf, why = _hf_chunk_scan()
    if hf is None:
        notes.append(f"hf-torch+h0 skipped: {why}")
        return out
    h0_rows = t["h0"].unsqueeze(0).expand(t["x"].shape[0], -1, -1, -1)

    def hf_fn():
        y = hf(*pos, chunk_size, D=t["D"], dt_bias=t["dt_bias"], initial_states=h0_rows, dt_softplus=True)
        return (y * torch.nn.functional.silu(t["z"].float())).to(t["x"].dtype)

    out["hf-torch+h0"] = hf_fn
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


class BudgetExceeded(Exception):
    pass


@contextlib.contextmanager
def deadline(t_end: float):
    """Raise BudgetExceeded in the main thread at t_end. Python code only: a call blocked in C++ (a Triton compile,
    the autograd engine running a backward) is interrupted when it returns, so the budget estimates still matter."""

    def fire(signum, frame):
        raise BudgetExceeded

    left = t_end - time.time()
    if left <= 0:
        raise BudgetExceeded
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, left)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Case:
    """One shape's inputs and the fwd / fwd+bwd closures of its variants, timed one variant at a time."""

    def __init__(self, t: dict, cuda: bool, rep: int, chunk_size: int = 256):
        self.t, self.cuda, self.rep, self.chunk_size = t, cuda, rep, chunk_size
        self.leaves = list(t.values())
        self.dy = torch.randn_like(t["x"])
        self.bench = _timer(cuda)
        self.sync = torch.cuda.synchronize if cuda else (lambda: None)

    def fwd_bwd(self, fn):
        return lambda: torch.autograd.grad(fn(), self.leaves, self.dy, allow_unused=True)

    def measure(self, fn) -> dict:
        """First call (compile / autotune, timed as warm_s), one timing round, peak memory of one fwd+bwd."""
        fwd_bwd = self.fwd_bwd(fn)
        t0 = time.perf_counter()
        fwd_bwd()
        self.sync()
        res = {"warm_s": round(time.perf_counter() - t0, 2), "rounds": 0}
        self.retime(fn, res)
        if self.cuda:
            self.sync()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fwd_bwd()
            self.sync()
            res["peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
        else:
            res["peak_gib"] = float("nan")
        return res

    def retime(self, fn, res: dict) -> None:
        """One more timing round; keep the best median (rounds are interleaved over the variants of a shape)."""
        with torch.no_grad():
            f = self.bench(fn, self.rep)
        fb = self.bench(self.fwd_bwd(fn), self.rep)
        res["fwd_ms"] = min(res.get("fwd_ms", f), f)
        res["fwd_bwd_ms"] = min(res.get("fwd_bwd_ms", fb), fb)
        res["rounds"] += 1


def device_times(fn, iters: int = 3) -> dict:
    """Device time (us) per call of ``fn`` of each CUDA kernel it launches, largest first (after one warm-up call)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    times = {}
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None)
        if us is None:
            us = getattr(ev, "cuda_time_total", 0.0)
        if us > 0:  # torch's kernel names share long prefixes: sum those that the cut makes equal
            times[ev.key[:60]] = times.get(ev.key[:60], 0.0) + us / iters
    return {k: round(v, 1) for k, v in sorted(times.items(), key=lambda kv: -kv[1])}


def kernel_profile(case: Case, names: tuple, iters: int = 3) -> dict:
    """Device time per fwd+bwd (us) of each CUDA kernel, per variant: where the h' + y' overhead goes."""
    variants = ours_variants(case.t, case.chunk_size)
    return {name: device_times(case.fwd_bwd(variants[name]), iters) for name in names}


def print_profile(prof: dict) -> None:
    base = prof.get("ours", {})
    cols = list(prof)
    print("\nper-kernel device us per fwd+bwd (" + " | ".join(cols) + "):")
    keys = sorted({k for v in prof.values() for k in v}, key=lambda k: -max(v.get(k, 0.0) for v in prof.values()))
    for k in keys:
        vals = " | ".join(f"{prof[c].get(k, 0.0):9.1f}" for c in cols)
        print(f"  {k:<60} {vals}   (+{max(v.get(k, 0.0) for v in prof.values()) - base.get(k, 0.0):.1f})")


class Prewarm:
    """Compile in parallel subprocesses while the parent measures; the kernels land in Triton's on-disk cache.

    Jobs: "ours:I" runs ssmtune's three variants once on shape I at batch 2 (none of our kernel arguments depends on
    the batch; 2, not 1, because Triton specializes integer arguments equal to 1, e.g. mamba_ssm's ``batch``), in
    shape order, so that shape 0 is ready first; then "mamba:J" jobs, each compiling mamba_ssm's autotune configs
    J, J + K, ... (K jobs) by running fwd+bwd with one config per kernel over every shape. The children stay in our
    process group (so that gpu_call.sh's group kill reaches them), ask the kernel to SIGKILL them when we die
    (PR_SET_PDEATHSIG, which also covers our SIGKILL) and are killed by ``kill_all`` at exit or on SIGTERM/SIGINT.
    """

    def __init__(self, jobs: list[str], procs: int, chunk_size: int, tiny: bool):
        self.todo, self.procs, self.chunk_size, self.tiny = list(jobs), procs, chunk_size, tiny
        self.running: dict[str, tuple[subprocess.Popen, object, float]] = {}
        self.done: dict[str, dict] = {}
        atexit.register(self.kill_all)

    def poll(self) -> None:
        for job, (p, err, t0) in list(self.running.items()):
            if p.poll() is None:
                continue
            del self.running[job]
            info = {"rc": p.returncode, "s": round(time.time() - t0, 1)}
            if p.returncode:
                err.seek(0)
                info["stderr"] = err.read().decode(errors="replace")[-300:]
            err.close()
            self.done[job] = info
            print(f"prewarm {job}: rc {info['rc']} after {info['s']} s", flush=True)
        while self.todo and len(self.running) < self.procs:
            job = self.todo.pop(0)
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--warm-only",
                job,
                "--chunk-size",
                str(self.chunk_size),
            ]
            cmd += ["--tiny"] if self.tiny else []
            err = tempfile.TemporaryFile()  # noqa: SIM115 - closed in poll; a file, a chatty child must not block
            env = {**os.environ, "BENCH_SSD_PARENT": str(os.getpid())}
            self.running[job] = (
                subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env),
                err,
                time.time(),
            )

    def wait(self, jobs: list[str], t_end: float) -> bool:
        """Wait until the jobs are done (True when all exited 0) or t_end."""
        while True:
            self.poll()
            if all(j in self.done for j in jobs):
                return all(self.done[j]["rc"] == 0 for j in jobs)
            if time.time() >= t_end:
                return False
            time.sleep(0.1)

    def ok(self, job: str) -> bool:
        return self.done.get(job, {}).get("rc") == 0

    def kill_all(self) -> None:
        self.todo.clear()
        for job, (p, err, _) in list(self.running.items()):
            if p.poll() is None:
                p.kill()
                p.wait()
                self.done[job] = {"rc": "killed"}
            err.close()
        self.running.clear()


def warm_only(job: str, chunk_size: int, tiny: bool) -> None:
    what, index = job.split(":")
    shapes = TINY_SHAPES if tiny else SHAPES
    device = "cpu" if tiny else "cuda"
    if what == "ours":
        _, seqlen, h, p, n, g = shapes[int(index)]
        t = make(2, seqlen, h, p, n, g, torch.bfloat16, device)
        case = Case(t, not tiny, 1)
        for fn in ours_variants(t, chunk_size).values():
            case.fwd_bwd(fn)()
    else:
        from _mamba_ssm_loader import load_mamba_chunk_scan_combined, max_mamba_configs, set_mamba_autotune

        mamba = load_mamba_chunk_scan_combined()
        set_mamba_autotune("full")
        j, k = (int(v) for v in index.split("/"))
        for i in range(j, max_mamba_configs(), k):
            set_mamba_autotune(f"pick:{i}")
            for _, seqlen, h, p, n, g in shapes:
                t = make(2, seqlen, h, p, n, g, torch.bfloat16, device)
                with contextlib.suppress(Exception):  # a config out of resources: the autotuner skips it too
                    Case(t, True, 1).fwd_bwd(mamba_variant(t, chunk_size, mamba))()
    if not tiny:
        torch.cuda.synchronize()


def print_table(meta: dict, rows: list[dict], notes: list[str]) -> None:
    print(f"\n{json.dumps(meta)}")
    for note in dict.fromkeys(notes):
        print(f"note: {note}")
    print(f"{'shape':<22}{'impl':<19}{'fwd ms':>9}{'fwd+bwd ms':>12}{'peak GiB':>10}{'vs ours':>9}{'vs mamba':>10}")
    for r in rows:
        shape = f"L={r['L']} H={r['H']} G={r['G']}"
        if "error" in r:
            print(f"{shape:<22}{r['impl']:<19}  {r['error'][:80]}")
            continue
        same = [q for q in rows if (q["L"], q["H"], q["G"]) == (r["L"], r["H"], r["G"]) and "fwd_bwd_ms" in q]
        ref = {q["impl"]: q["fwd_bwd_ms"] for q in same}
        vs_ours = r["fwd_bwd_ms"] / ref["ours"] if "ours" in ref else float("nan")
        vs_mamba = r["fwd_bwd_ms"] / ref["mamba_ssm+h0"] if "mamba_ssm+h0" in ref else float("nan")
        print(
            f"{shape:<22}{r['impl']:<19}{r['fwd_ms']:>9.3f}{r['fwd_bwd_ms']:>12.3f}{r['peak_gib']:>10.2f}"
            f"{vs_ours:>9.2f}{vs_mamba:>10.2f}"
        )
    print("\nh'+y' overhead (fwd+bwd and fwd / bare; target <= 1.05):")
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
            f"  L={key[0]} H={key[1]} G={key[2]}: fwd+bwd {ratio(OFFSETS_NAME, 'fwd_bwd_ms')}"
            f" | fwd {ratio(OFFSETS_NAME, 'fwd_ms')}"
        )


# Conservative wall-clock estimates (H100) of one variant on one shape: first call + one timing round + peak memory;
# a variant starts only when its estimate fits in what is left of --budget-s. "cold": its compilations not prewarmed
# (ours: ~10 kernels per variant at ~1-2 s each; mamba_ssm: ~140 autotune configs compiled serially).
EST_S = {"ours": 3.0, "ours_cold": 25.0, "retime": 1.0, "mamba_first": 25.0, "mamba": 4.0, "mamba_cold": 150.0}
EST_S |= {"torch": 8.0, "profile": 6.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench_ssd.json"))
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--budget-s", type=float, default=140.0, help="start no variant that would not end by then")
    ap.add_argument("--shapes", type=int, default=len(SHAPES), help="run only the first K shapes")
    ap.add_argument("--rep-ms", type=int, default=100, help="do_bench rep (ms) per timing")
    ap.add_argument("--rounds", type=int, default=2, help="timing rounds per variant (best median kept)")
    ap.add_argument("--prewarm-procs", type=int, default=None, help="parallel compile subprocesses (0: none)")
    ap.add_argument("--mamba-jobs", type=int, default=6, help="prewarm jobs splitting mamba_ssm's autotune configs")
    ap.add_argument(
        "--mamba-autotune", default="quick", choices=["quick", "full", "one"], help="see _mamba_ssm_loader.py"
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
    t_start = time.time()
    t_end = t_start + args.budget_s

    def on_signal(signum, frame):  # SIGTERM from `timeout`: exit through atexit, which kills the prewarm children
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # `timeout` signals us and then our group: one exit is enough
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    shapes = SHAPES[: args.shapes] if cuda else TINY_SHAPES
    dtype = torch.bfloat16
    from _mamba_ssm_loader import mamba_ssm_available, mamba_ssm_version

    with_mamba = cuda and not args.no_peers and mamba_ssm_available()
    meta = {
        "device": torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "mamba_ssm": mamba_ssm_version(),
        "mamba_autotune": args.mamba_autotune if with_mamba else None,
        "python": platform.python_version(),
        "dtype": str(dtype)[6:],
        "chunk_size": args.chunk_size,
        "rep_ms": args.rep_ms,
        "budget_s": args.budget_s,
        "command": " ".join(sys.argv),
    }
    rows: list[dict] = []
    notes: list[str] = []
    if not args.no_peers and cuda and not with_mamba:
        notes.append("mamba_ssm not importable: its rows skipped")
    if args.prewarm_procs is None:
        args.prewarm_procs = max(1, min(14, (os.cpu_count() or 2) - 2)) if cuda else 1
    jobs = [f"ours:{i}" for i in range(len(shapes))]
    if with_mamba and args.mamba_autotune != "one":
        jobs += [f"mamba:{j}/{args.mamba_jobs}" for j in range(args.mamba_jobs)]
    pool = Prewarm(jobs if args.prewarm_procs > 0 else [], args.prewarm_procs, args.chunk_size, not cuda)
    pool.poll()

    def save() -> None:
        meta["elapsed_s"] = round(time.time() - t_start, 1)
        meta["prewarm"] = dict(pool.done)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        doc = {"meta": meta, "rows": rows, "notes": notes}
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(args.out)  # atomic: a kill mid-write leaves the previous version

    def fits(est: float, what: str) -> bool:
        pool.poll()
        if time.time() + est <= t_end:
            return True
        notes.append(f"budget {args.budget_s:.0f} s: {what} not measured (needs ~{est:.0f} s)")
        print(f"skip {what}: budget", flush=True)
        return False

    def out_of_time(e: Exception) -> bool:
        # the alarm's exception may come back wrapped (the Triton interpreter re-raises it as InterpreterError)
        return isinstance(e, BudgetExceeded) or time.time() >= t_end

    def run_variant(case: Case, shape: tuple, name: str, fn, est: float) -> dict | None:
        b, seqlen, h, p, n, g = shape
        label = f"L={seqlen} H={h} G={g} {name}"
        if not fits(est, label):
            return None
        row = {"B": b, "L": seqlen, "H": h, "P": p, "N": n, "G": g, "impl": name}
        try:
            with deadline(t_end):
                row |= case.measure(fn)
        except Exception as e:  # noqa: BLE001 - record the failure and keep benchmarking
            if out_of_time(e):
                notes.append(f"budget {args.budget_s:.0f} s ran out during {label}")
                print(f"budget ran out during {label}", flush=True)
                return None
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        if "fwd_bwd_ms" in row:
            row["tokens_per_s_fwd_bwd"] = b * seqlen / row["fwd_bwd_ms"] * 1e3
        rows.append(row)
        print(json.dumps(row), flush=True)
        save()
        return row

    def more_rounds(case: Case, done: list[tuple[dict, object]]) -> None:
        """Rounds 2.. interleaved over the variants just measured on this shape (drift hits them alike)."""
        for _ in range(args.rounds - 1):
            for row, fn in done:
                if "error" in row or not fits(EST_S["retime"], f"round 2+ of L={row['L']} {row['impl']}"):
                    continue
                try:
                    with deadline(t_end):
                        case.retime(fn, row)
                except Exception as e:
                    if out_of_time(e):
                        return
                    raise
                row["tokens_per_s_fwd_bwd"] = row["B"] * row["L"] / row["fwd_bwd_ms"] * 1e3
                print(f"  round {row['rounds']}: {row['impl']} fwd {row['fwd_ms']:.3f} f+b {row['fwd_bwd_ms']:.3f}")
        save()

    def new_case(shape: tuple) -> Case:
        b, seqlen, h, p, n, g = shape
        if cuda:
            torch.cuda.empty_cache()
        return Case(make(b, seqlen, h, p, n, g, dtype, "cuda" if cuda else "cpu"), cuda, args.rep_ms, args.chunk_size)

    # pass 1: ours on every shape, each shape as soon as its prewarm job is done
    for i, shape in enumerate(shapes):
        warmed = pool.wait([f"ours:{i}"], t_end - EST_S["ours"]) if jobs and args.prewarm_procs > 0 else False
        case = new_case(shape)
        done = []
        for k, (name, fn) in enumerate(ours_variants(case.t, args.chunk_size).items()):
            est = EST_S["ours"] if warmed or k else EST_S["ours_cold"]
            row = run_variant(case, shape, name, fn, est)
            if row is not None:
                done.append((row, fn))
        more_rounds(case, done)
        if cuda and i == 0 and done and fits(EST_S["profile"], "kernel profile"):
            try:
                with deadline(t_end):
                    meta["kernel_profile"] = {f"L={shape[1]} H={shape[2]} G={shape[5]}": kernel_profile(case, PROFILED)}
                print_profile(next(iter(meta["kernel_profile"].values())))
                save()
            except Exception as e:  # noqa: BLE001 - the profile is extra information: note why, go on
                why = "budget ran out" if out_of_time(e) else f"{type(e).__name__}: {str(e)[:120]}"
                notes.append(f"kernel profile not recorded: {why}")
        del case
    meta["pass1_s"] = round(time.time() - t_start, 1)
    print(f"pass 1 (ours) done at {meta['pass1_s']} s", flush=True)

    # pass 2: the peers
    mamba, mamba_warm = None, False
    if with_mamba:
        from _mamba_ssm_loader import load_mamba_chunk_scan_combined, set_mamba_autotune

        mamba_jobs = [j for j in jobs if j.startswith("mamba:")]
        mamba_warm = pool.wait(mamba_jobs, t_end - EST_S["mamba_first"]) if mamba_jobs else True
        try:
            mamba = load_mamba_chunk_scan_combined()
            meta["mamba_autotuners"] = set_mamba_autotune(args.mamba_autotune)
        except Exception as e:  # noqa: BLE001 - optional peer
            notes.append(f"mamba_ssm unavailable: {type(e).__name__}: {str(e)[:120]}")
    pool.kill_all()  # whatever still compiles would only disturb the timings
    mamba_first = True
    for shape in shapes:
        if time.time() >= t_end:
            break
        case = new_case(shape)
        done = []
        if mamba is not None:
            est = EST_S["mamba_first" if mamba_warm else "mamba_cold"] if mamba_first else EST_S["mamba"]
            row = run_variant(case, shape, "mamba_ssm+h0", mamba_variant(case.t, args.chunk_size, mamba), est)
            if row is not None:
                mamba_first = False
                done.append((row, mamba_variant(case.t, args.chunk_size, mamba)))
                meta.setdefault("mamba_first_call_s", row.get("warm_s"))
        if not args.no_peers and shape[1] <= TORCH_PEER_MAX_L:
            for name, fn in torch_variants(case.t, args.chunk_size, notes).items():
                row = run_variant(case, shape, name, fn, EST_S["torch"])
                if row is not None:
                    done.append((row, fn))
        elif not args.no_peers:
            notes.append(f"L={shape[1]}: torch peers skipped (only L <= {TORCH_PEER_MAX_L}: slow, memory)")
        more_rounds(case, done)
        del case
    save()
    print_table(meta, rows, notes)


if __name__ == "__main__":
    main()
