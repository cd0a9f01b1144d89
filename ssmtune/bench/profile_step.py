"""Where a training step's GPU time goes: ssmtune against the authors' stack, kernel by kernel.

Builds variants of the ``train_step`` benchmark (same shapes, precision and step), runs ``--warmup`` steps, then
profiles ``--steps`` steps with ``torch.profiler`` (CUDA activity only) and sums the device time of every kernel per
step. Kernels are grouped into categories by name (``CATEGORIES``: the first pattern that matches wins) so that two
stacks can be compared line by line. The kernels' timeline also gives the GPU's idle time between kernels: per step,
how many kernels ran, how much idle time falls in gaps of each length (``GAP_BUCKETS_US``: many short gaps are the
launch latency of small kernels, long ones a host that fell behind) and the longest gaps with the kernels on either
side. On the CPU the top-level aten ops stand in for the kernels.
"""

from __future__ import annotations

import argparse
import itertools
import re
import time
from collections import defaultdict

import torch

from ssmtune.bench import train_step as ts
from ssmtune.bench.common import markdown, sync
from ssmtune.bench.registry import Benchmark, register

# (category, regex on the kernel name), first match wins
CATEGORIES = [
    ("mamba1 scan", r"selective_scan|nloop"),
    ("ssd scan", r"chunk|ssd|_state_passing|bmm_chunk"),
    ("conv1d", r"conv|depthwise"),
    ("gemm", r"gemm|sm90_|cutlass|nvjet|cublas|xmma|splitK|ampere_|s16816|wgmma"),
    ("softmax / cross-entropy", r"softmax|cross_entropy|nll_loss|log_softmax|logsumexp"),
    ("norm", r"norm|rms"),
    ("optimizer", r"adam|multi_tensor|foreach|_amp_"),
    ("copy / transpose / cast", r"copy|transpose|cat|Cat|to_copy|contiguous|convert"),
    ("reduce", r"reduce|sum|Reduce"),
    ("elementwise", r"elementwise|vectorized|unrolled|silu|softplus|exp|mul|add"),
]
# upper bounds (µs) of the gap-length buckets of idle_gaps(); the last bucket is open
GAP_BUCKETS_US = (5, 20, 100, 1000)


def idle_gaps(intervals: list[tuple[float, float, str]], steps: int, top: int = 10) -> dict:
    """The idle time between ``intervals`` ((start µs, end µs, kernel name), any order), per step: the span from the
    first start to the last end, the busy time (the union of the intervals), the number of intervals and of gaps and
    the idle ms in each bucket of ``GAP_BUCKETS_US``, and the ``top`` longest gaps with the kernels before and after."""
    iv = sorted(intervals)
    if not iv:
        return {"kernels": 0, "span_ms": 0.0, "busy_ms": 0.0, "idle_ms": 0.0, "buckets": {}, "largest": []}
    edges = (0.0, *GAP_BUCKETS_US, float("inf"))
    labels = [f"{lo:g}-{hi:g} us" if hi != float("inf") else f">{lo:g} us" for lo, hi in itertools.pairwise(edges)]
    buckets = {lab: [0.0, 0.0] for lab in labels}  # gaps per step, idle ms per step
    gaps = []
    busy, (cur_s, cur_e, last) = 0.0, iv[0]
    for s, e, name in iv[1:]:
        if s > cur_e:  # a gap: the GPU ran nothing between cur_e and s
            busy += cur_e - cur_s
            g = s - cur_e
            gaps.append((g, last, name))
            i = next(k for k in range(len(labels)) if g <= edges[k + 1])
            buckets[labels[i]][0] += 1 / steps
            buckets[labels[i]][1] += g / 1e3 / steps
            cur_s, cur_e, last = s, e, name
        elif e >= cur_e:
            cur_e, last = e, name
    busy += cur_e - cur_s
    span = cur_e - iv[0][0]
    return {
        "kernels": len(iv) / steps,
        "span_ms": span / 1e3 / steps,
        "busy_ms": busy / 1e3 / steps,
        "idle_ms": (span - busy) / 1e3 / steps,
        "buckets": {k: {"gaps": round(n, 1), "ms": ms} for k, (n, ms) in buckets.items()},
        "largest": [{"us": g, "before": a[:80], "after": b[:80]} for g, a, b in sorted(gaps, reverse=True)[:top]],
    }


def category(name: str) -> str:
    return next((cat for cat, pat in CATEGORIES if re.search(pat, name)), "other")


def parse_variant(spec: str) -> ts.Variant:
    parts = spec.split(":")
    sizes = parts[3].lower().split("x") if len(parts) == 4 else []
    if len(sizes) != 2 or not all(x.isdigit() for x in sizes):
        raise ValueError(f"bad --variants entry {spec!r}: want stack:model:method:BxL, e.g. ssmtune:mamba:none:8x2048")
    stack, model, method = parts[:3]
    if stack not in ts.STACKS or model not in ts.MODELS or method not in ts.METHODS:
        raise ValueError(f"bad --variants entry {spec!r}: stack in {ts.STACKS}, model in {ts.MODELS}, method in "
                         f"{ts.METHODS}")  # fmt: skip
    backend = {"ssmtune": "auto", "hf+peft": "torch-path", "mamba_ssm": "unfused"}[stack]
    return ts.Variant(stack, model, method, backend, int(sizes[0]), int(sizes[1]))


def profile(v: ts.Variant, args: argparse.Namespace, device: torch.device) -> dict:
    build = {"ssmtune": ts.build_ssmtune, "hf+peft": ts.build_hf_peft, "mamba_ssm": ts.build_mamba_ssm}[v.stack]
    model, detail = build(v, args.shape, device)
    ids = ts.make_batch(v.batch, v.seqlen, ts.SHAPES[args.shape]["vocab_size"], device)
    step, _ = ts.make_step(v, model, ids)
    for _ in range(args.warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    wall_ms = (time.perf_counter() - t0) * 1e3 / args.steps
    # CUDA activity only on the GPU: tracing the CPU ops would slow the host down and add idle time of its own
    acts = [torch.profiler.ProfilerActivity.CUDA if device.type == "cuda" else torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(args.steps):
            step()
        sync(device)
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    intervals = []
    for ev in prof.events():
        if device.type == "cuda":
            if ev.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = ev.device_time_total
        else:
            if ev.cpu_parent is not None or not ev.name.startswith("aten::"):
                continue
            us = ev.cpu_time_total
        k = per_kernel[ev.name]
        k[0] += us / 1e3 / args.steps
        k[1] += 1 / args.steps
        intervals.append((ev.time_range.start, ev.time_range.end, ev.name))
    cats: dict[str, float] = defaultdict(float)
    for name, (ms, _) in per_kernel.items():
        cats[category(name)] += ms
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[: args.top]
    del model, step
    ts.free_memory(device)
    return {
        "variant": f"{v.stack}:{v.model}:{v.method}:{v.batch}x{v.seqlen}",
        "detail": detail,
        "wall_ms": wall_ms,
        "busy_ms": sum(cats.values()),
        "timeline": idle_gaps(intervals, args.steps),
        "categories": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
        "top": [{"name": n[:120], "ms": ms, "calls": calls} for n, (ms, calls) in top],
    }


def table(results: list[dict]) -> str:
    ok = [r for r in results if "error" not in r]
    lines = [f"{r['variant']}: {r['error']}" for r in results if "error" in r]
    for r in ok:
        tl = r["timeline"]
        lines.append(f"{r['variant']}: idle {tl['idle_ms']:.2f} ms a step in gaps " +
                     ", ".join(f"{lab} {b['ms']:.2f} ms" for lab, b in tl["buckets"].items()))  # fmt: skip
    if not ok:
        return "\n".join(lines)
    cats = sorted({c for r in ok for c in r["categories"]}, key=lambda c: -max(r["categories"].get(c, 0) for r in ok))
    rows = [[c, *(f"{r['categories'].get(c, 0.0):.2f}" for r in ok)] for c in cats]
    rows += [["busy (ms/step)", *(f"{r['busy_ms']:.2f}" for r in ok)],
             ["idle (ms/step)", *(f"{r['timeline']['idle_ms']:.2f}" for r in ok)],
             ["kernels / step", *(f"{r['timeline']['kernels']:.0f}" for r in ok)],
             ["wall (ms/step)", *(f"{r['wall_ms']:.2f}" for r in ok)]]  # fmt: skip
    return "\n".join(lines) + "\n\n" + markdown(["category", *(r["variant"] for r in ok)], rows)


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--variants", nargs="+",
                    default=["ssmtune:mamba:state_offset_h:8x2048", "mamba_ssm:mamba:none:8x2048"],
                    help="stack:model:method:BxL entries (stacks ssmtune, hf+peft, mamba_ssm)")  # fmt: skip
    ap.add_argument("--small", action="store_true", help="tiny shape (d_model 64, 2 layers): a CPU test")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=15, help="kernels listed per variant")


def run(args: argparse.Namespace) -> dict:
    variants = [parse_variant(spec) for spec in args.variants]  # every entry checked before the first build
    args.shape = "tiny" if args.small else "130m"
    device = torch.device(args.device)
    results = []
    for v in variants:
        try:
            results.append(profile(v, args, device))
        except Exception as e:  # noqa: BLE001 - one failing stack (e.g. mamba_ssm not built) must not lose the others
            results.append({"variant": f"{v.stack}:{v.model}:{v.method}:{v.batch}x{v.seqlen}",
                            "error": f"{type(e).__name__}: {str(e)[:200]}"})  # fmt: skip
    return {"rows": results, "table": table(results)}


register(Benchmark("profile", "where a training step's GPU time goes, kernel by kernel, and the GPU's idle gaps",
                   add_args, run))  # fmt: skip
