"""Where a training step's GPU time goes: ssmtune against the authors' stack, kernel by kernel.

Builds the variants of ``bench_train_step.py`` (same shapes, precision and step), runs ``--warmup`` steps, then
profiles ``--steps`` steps with ``torch.profiler`` (CUDA activity only) and sums the device time of every kernel per
step. Kernels are grouped into categories by name (``CATEGORIES``: the first pattern that matches wins) so that two
stacks can be compared line by line. The kernels' timeline also gives the GPU's idle time between kernels: per step,
how many kernels ran, how much idle time falls in gaps of each length (``GAP_BUCKETS_US``: many short gaps are the
launch latency of small kernels, long ones a host that fell behind) and the longest gaps with the kernels on either
side. Prints, per variant: wall ms per step, GPU-busy ms per step, the categories, the idle time and the top kernels;
then a table of categories side by side. Raw: ``--out`` (JSON).

GPU (with mamba_ssm's extension built as in ``scripts/gpu_call.sh``):

    PYTHONPATH=/tmp/mamba_site:. python3 benchmarks/profile_train_step.py --out profile_train_step.json \
        --variants ssmtune:mamba:state_offset_h:8x2048 mamba_ssm:mamba:none:8x2048

CPU smoke test:  PYTHONPATH=. python benchmarks/profile_train_step.py --tiny --device cpu
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_train_step as bts

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
    for cat, pat in CATEGORIES:
        if re.search(pat, name):
            return cat
    return "other"


def parse_variant(spec: str) -> bts.Variant:
    try:
        stack, model, method, size = spec.split(":")
        b, seqlen = (int(x) for x in size.lower().split("x"))
    except ValueError as e:
        raise SystemExit(
            f"bad --variants entry {spec!r}: want stack:model:method:BxL, e.g. ssmtune:mamba:none:8x2048"
        ) from e
    if stack not in bts.STACKS or model not in bts.MODELS or method not in bts.METHODS:
        raise SystemExit(
            f"bad --variants entry {spec!r}: stack in {bts.STACKS}, model in {bts.MODELS}, method in {bts.METHODS}"
        )
    backend = {"ssmtune": "auto", "hf+peft": "torch-path", "mamba_ssm": "unfused"}[stack]
    return bts.Variant(stack, model, method, backend, b, seqlen)


def profile(v: bts.Variant, args: argparse.Namespace, device: torch.device) -> dict:
    build = {"ssmtune": bts.build_ssmtune, "hf+peft": bts.build_hf_peft, "mamba_ssm": bts.build_mamba_ssm}[v.stack]
    model, detail = build(v, args.shape, device)
    ids = bts.make_batch(v.batch, v.seqlen, model.config.vocab_size if hasattr(model, "config") else 256, device)
    step, _ = bts.make_step(v, model, ids)
    for _ in range(args.warmup):
        step()
    bts.sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    bts.sync(device)
    wall_ms = (time.perf_counter() - t0) * 1e3 / args.steps
    # CUDA activity only on the GPU: tracing the CPU ops would slow the host down and add idle time of its own
    acts = [torch.profiler.ProfilerActivity.CUDA if device.type == "cuda" else torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(args.steps):
            step()
        bts.sync(device)
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    intervals = []
    for ev in prof.events():
        # device kernels on CUDA; on the CPU smoke test, the top-level aten ops stand in for them
        if device.type == "cuda":
            if ev.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
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
    busy = sum(cats.values())
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[: args.top]
    del model, step
    bts.free_memory(device)
    return {
        "variant": f"{v.stack}:{v.model}:{v.method}:{v.batch}x{v.seqlen}",
        "detail": detail,
        "wall_ms": wall_ms,
        "busy_ms": busy,
        "timeline": idle_gaps(intervals, args.steps),
        "categories": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
        "top": [{"name": n[:120], "ms": ms, "calls": calls} for n, (ms, calls) in top],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="+", default=["ssmtune:mamba:state_offset_h:8x2048", "mamba_ssm:mamba:none:8x2048"],
                    help="stack:model:method:BxL entries (stacks ssmtune, hf+peft, mamba_ssm)")  # fmt: skip
    ap.add_argument("--tiny", action="store_true", help="tiny shape for a CPU smoke test")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--out", type=Path, default=Path("profile_train_step.json"))
    args = ap.parse_args()
    args.shape = "tiny" if args.tiny else "130m"
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    results = []
    for spec in args.variants:
        v = parse_variant(spec)
        try:
            r = profile(v, args, device)
        except Exception as e:  # noqa: BLE001 - one failing stack (e.g. mamba_ssm not built) must not lose the others
            r = {"variant": spec, "error": f"{type(e).__name__}: {e}"}
            print(f"{spec}: {r['error']}", flush=True)
        results.append(r)
        args.out.write_text(
            json.dumps({"device": str(device), "torch": torch.__version__, "results": results}, indent=1)
        )
        if "error" in r:
            continue
        print(
            f"\n## {r['variant']}  wall {r['wall_ms']:.1f} ms/step, GPU busy {r['busy_ms']:.1f} ms/step  ({r['detail']})"
        )
        for cat, ms in r["categories"].items():
            print(f"  {cat:28s} {ms:8.2f} ms")
        tl = r["timeline"]
        print(
            f"  timeline: {tl['kernels']:.0f} kernels, span {tl['span_ms']:.1f} ms, idle {tl['idle_ms']:.1f} ms a step"
        )
        for lab, b in tl["buckets"].items():
            print(f"    gaps {lab:>12s}: {b['gaps']:8.1f} per step, {b['ms']:7.2f} ms")
        for g in tl["largest"][:5]:
            print(f"    gap {g['us']:9.1f} us  after {g['before']}  before {g['after']}")
        print("  top kernels:")
        for k in r["top"]:
            print(f"    {k['ms']:8.2f} ms {k['calls']:6.1f}x  {k['name']}")
    ok = [r for r in results if "error" not in r]
    if len(ok) > 1:
        cats = sorted(
            {c for r in ok for c in r["categories"]}, key=lambda c: -max(r["categories"].get(c, 0) for r in ok)
        )
        print("\n| category | " + " | ".join(r["variant"] for r in ok) + " |")
        print("|---|" + "---:|" * len(ok))
        for c in cats:
            print(f"| {c} | " + " | ".join(f"{r['categories'].get(c, 0.0):.2f}" for r in ok) + " |")
        print("| GPU busy | " + " | ".join(f"{r['busy_ms']:.2f}" for r in ok) + " |")
        print("| GPU idle (profiled) | " + " | ".join(f"{r['timeline']['idle_ms']:.2f}" for r in ok) + " |")
        print("| kernels | " + " | ".join(f"{r['timeline']['kernels']:.0f}" for r in ok) + " |")
        print("| wall | " + " | ".join(f"{r['wall_ms']:.2f}" for r in ok) + " |")


if __name__ == "__main__":
    main()
