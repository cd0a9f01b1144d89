"""Shared pieces of the benchmarks: devices, timing, the correctness gate, the environment, tables."""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from importlib.metadata import version
from typing import Any

import torch


class CheckFailed(RuntimeError):
    """An op's output differs from its reference: the benchmark reports no timings."""


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} needs CUDA, which this machine does not have")
    return device


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_ms(fn: Callable[[], Any], device: torch.device, rep_ms: int = 100, grad_to_none=None) -> float:
    """Median ms of ``fn``: Triton's ``do_bench`` on CUDA (L2 flushed between calls); on the CPU a few timed calls."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, rep=rep_ms, grad_to_none=grad_to_none, return_mode="median")
    fn()  # warm-up
    times = []
    t_end = time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or (time.perf_counter() < t_end and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_gib(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak memory of one call of ``fn`` above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**30


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write) on a 1 GiB buffer."""
    x = torch.empty(2**28, device=device, dtype=torch.float32)
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / (time_ms(lambda: y.copy_(x), device) * 1e-3)


def check_close(what: str, ref: Sequence[torch.Tensor | None], out: Sequence[torch.Tensor | None], tol: float) -> float:
    """The worst RMS-relative error of ``out`` against ``ref`` (pairs of None are skipped); raises CheckFailed
    above ``tol``."""
    from ssmtune.ops.testing import rel_err

    errs = [rel_err(r, o) for r, o in zip(ref, out, strict=True) if r is not None or o is not None]
    worst = max(errs, default=0.0)
    if not worst <= tol:  # NaN fails too
        raise CheckFailed(f"{what}: relative error {worst:.2e} against the reference exceeds {tol:.0e}")
    return worst


def environment(device: torch.device) -> dict[str, Any]:
    """Device name and library versions for the JSON report."""
    env: dict[str, Any] = {"python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    else:
        env["device_name"] = platform.processor() or platform.machine()
        env["threads"] = torch.get_num_threads()
    for pkg in ("ssmtune", "torch", "triton", "transformers", "peft", "mamba_ssm", "causal_conv1d", "fla-core"):
        with contextlib.suppress(Exception):
            env[pkg] = version(pkg)
    # the peers' compiled extensions change their speed several-fold (mamba_ssm's decode without causal_conv1d's
    # kernel falls back to torch ops): record whether they are there, not only the package versions
    for ext in ("selective_scan_cuda", "causal_conv1d_cuda"):
        env[ext] = importlib.util.find_spec(ext) is not None
    env["torch"] = torch.__version__
    return env


def fmt(x: float | None, spec: str, prefix: str = "") -> str:
    return "n/a" if x is None else prefix + format(x, spec)


def markdown(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; the first column is left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def parse_sizes(sizes: Sequence[str]) -> list[tuple[int, int]]:
    """``["4x512", ...]`` -> ``[(4, 512), ...]``."""
    out = []
    for x in sizes:
        parts = x.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"sizes are BxL with positive integers, e.g. 4x512; got {x!r}")
        out.append((int(parts[0]), int(parts[1])))
    return out


def error_text(e: BaseException) -> str:
    msg = str(e).splitlines()[0][:160] if str(e) else ""
    return f"{type(e).__name__}: {msg}"


def outputs_and_grads(fn: Callable[..., Any], inputs: dict[str, torch.Tensor]) -> list[torch.Tensor | None]:
    """``fn(**inputs)``'s outputs and the gradients of every floating input under a fixed non-linear loss."""
    leaves = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in inputs.items()}
    out = fn(**leaves)
    outs = list(out) if isinstance(out, tuple) else [out]
    loss = sum((o.float() * torch.cos(o.detach().float())).sum() for o in outs)
    loss.backward()
    return [*outs, *(v.grad for v in leaves.values())]


def check_op(what: str, ref: Callable[..., Any], fn: Callable[..., Any], inputs: dict, tol: float) -> float:
    """``fn`` against ``ref`` on ``inputs``: outputs and gradients; raises CheckFailed above ``tol``."""
    return check_close(what, outputs_and_grads(ref, inputs), outputs_and_grads(fn, inputs), tol)


def measure_op(fn: Callable[[], torch.Tensor], leaves: list[torch.Tensor], device: torch.device, rep_ms: int) -> dict:
    """Median ms of the forward (no grad) and of forward + backward, and the peak memory of one forward + backward."""
    with torch.no_grad():
        fwd = time_ms(fn, device, rep_ms)
    y = fn()
    dy = torch.randn_like(y)
    del y

    def step() -> None:
        fn().backward(dy)

    fwd_bwd = time_ms(step, device, rep_ms, grad_to_none=leaves)
    for t in leaves:
        t.grad = None
    return {"fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd, "peak_gib": peak_gib(step, device)}


def op_table(rows: Sequence[dict], keys: Sequence[str], ours: str = "ssmtune") -> str:
    """Rows of ``measure_op`` results, grouped by ``keys``: ssmtune first, then each peer with its time over ours
    (> 1: ssmtune is faster)."""
    header = [*keys, "impl", "fwd ms", "fwd+bwd ms", "peak GiB", "x ours fwd", "x ours fwd+bwd"]
    base = {tuple(r[k] for k in keys): r for r in rows if r["impl"] == ours and "fwd_ms" in r}
    out = []
    for r in sorted(rows, key=lambda r: r["impl"] != ours):
        cells = [r[k] for k in keys] + [r["impl"]]
        if "fwd_ms" not in r:
            out.append([*cells, r.get("status", "not run"), "", "", "", ""])
            continue
        b = base.get(tuple(r[k] for k in keys))
        ratios = [f"{r[k] / b[k]:.2f}" if b is not None and b is not r else "" for k in ("fwd_ms", "fwd_bwd_ms")]
        out.append([*cells, f"{r['fwd_ms']:.3f}", f"{r['fwd_bwd_ms']:.3f}", fmt(r["peak_gib"], ".2f"), *ratios])
    return markdown(header, out)
