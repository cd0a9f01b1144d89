"""Where a training step's GPU time goes: ssmtune against the authors' stack, kernel by kernel.

Builds variants of the ``train_step`` benchmark (same shapes, precision and step; or, for a model of ``hybrid_step``
such as ``qwen3_5_0.8b``, that benchmark's model, LoRA targets and step), runs ``--warmup`` steps, then
profiles ``--steps`` steps with ``torch.profiler`` (CUDA activity only) and sums the device time of every kernel per
step. Kernels are grouped into categories by name (``CATEGORIES``: the first pattern that matches wins) so that two
stacks can be compared line by line. The kernels' timeline also gives the GPU's idle time between kernels: per step,
how many kernels ran, how much idle time falls in gaps of each length (``GAP_BUCKETS_US``: many short gaps are the
launch latency of small kernels, long ones a host that fell behind) and the longest gaps with the kernels on either
side. On the CPU the top-level aten ops stand in for the kernels.

``--workload decode`` profiles decoding instead, on the models of the ``decode`` benchmark (its builders, shapes,
dtype and State-offset adapters: ``--models``, ``--stacks`` graph / eager / mamba_ssm / transformers, ``--batch``,
``--prompt-len``). Per model, stack and batch it prefills a prompt and runs ``--warmup`` untimed rounds, then profiles
a generate of 1 + ``--steps`` tokens and one of 1 token (prefill and the first token) in two sessions. The kernels
both traces start with (the prefill) are dropped from both, but the last, so that the gap to the first decode kernel
counts; every per-step figure is then the long run's rest minus the short run's rest (the first token's tail), over
``--steps``: the decode steps alone, with the decode loop's one-off costs spread over them as in ``decode``'s
tokens/s. It reports per step the kernels (and per layer), the device time per category, busy and idle time with the
gap buckets, the gaps summed by the kernels on either side, and the top kernels; ``wall_ms`` is
(t(1 + steps) - t(1)) / steps of unprofiled generates. A stack that cannot run here (mamba_ssm off CUDA or not built)
is a row with its reason.

Assumed about the trace: every GPU-side record of the session counts (kernels, memcpy, memset), whatever launched it.
Kernels replayed from a CUDA graph come as CUPTI kernel records with no CPU-side op above them (their correlation is
the ``cudaGraphLaunch`` call); nothing here asks for a parent op, so they count like directly launched kernels. The
rows also count the ``cudaGraphLaunch`` calls per step (``graph_launches``) and warn when graphs were launched but
fewer kernels than layers per step were recorded (a CUPTI that drops graph kernels).
"""

from __future__ import annotations

import argparse
import itertools
import re
import time
from collections import defaultdict
from collections.abc import Callable

import torch

from ssmtune.bench import decode as dec
from ssmtune.bench import hybrid_step as hs
from ssmtune.bench import train_step as ts
from ssmtune.bench.common import error_text, fmt, markdown, sync
from ssmtune.bench.registry import Benchmark, register

# (category, regex on the kernel name), first match wins
CATEGORIES = [
    # decode-step kernels first: mamba_ssm's _selective_scan_update_kernel would land in "mamba1 scan", ssmtune's
    # ssd_state_update in "ssd scan", the conv updates in "conv1d" and an argmax in "reduce"
    ("state update", r"state_update|scan_update"),
    ("conv update", r"causal_conv1d_update|conv1d_update"),
    ("argmax / sampling", r"argmax|ArgMax|multinomial|topk|TopK|sample"),
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
# the CUDA runtime / driver call that replays a captured graph (a suffix such as _v10000 on some CUDA versions)
GRAPH_LAUNCH = re.compile(r"cu(da)?GraphLaunch")


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


def kernels_of(fn: Callable[[], object], device: torch.device) -> tuple[list[tuple[float, float, str]], int]:
    """Profile ``fn()`` (synced): the (start µs, end µs, name) of every GPU-side record (on the CPU: every top-level
    aten op) and the number of CUDA graph launches. GPU records are taken by device type alone, never through a
    CPU-side parent op: kernels replayed from a CUDA graph have none."""
    # CUDA activity only on the GPU: tracing the CPU ops would slow the host down and add idle time of its own
    acts = [torch.profiler.ProfilerActivity.CUDA if device.type == "cuda" else torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=acts) as prof:
        fn()
        sync(device)
    intervals, launches = [], 0
    for ev in prof.events():
        if device.type == "cuda":
            if ev.device_type != torch.autograd.DeviceType.CUDA:
                # the CUDA runtime calls come as CPU-side records
                launches += bool(GRAPH_LAUNCH.match(ev.name))
                continue
        elif ev.cpu_parent is not None or not ev.name.startswith("aten::"):
            continue
        intervals.append((ev.time_range.start, ev.time_range.end, ev.name))
    return intervals, launches


def per_kernel_ms(intervals: list[tuple[float, float, str]], steps: int) -> dict[str, list[float]]:
    """Name -> [ms per step, calls per step]."""
    out: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for start, end, name in intervals:
        k = out[name]
        k[0] += (end - start) / 1e3 / steps
        k[1] += 1 / steps
    return out


def categories(per_kernel: dict[str, list[float]]) -> dict[str, float]:
    cats: dict[str, float] = defaultdict(float)
    for name, (ms, _) in per_kernel.items():
        cats[category(name)] += ms
    return cats


def parse_variant(spec: str) -> ts.Variant:
    parts = spec.split(":")
    sizes = parts[3].lower().split("x") if len(parts) == 4 else []
    if len(sizes) != 2 or not all(x.isdigit() for x in sizes):
        raise ValueError(f"bad --variants entry {spec!r}: want stack:model:method:BxL, e.g. ssmtune:mamba:none:8x2048")
    stack, model, method = parts[:3]
    if model in hs.SHAPES:  # a hybrid_step model: its stacks and methods
        if stack not in ("ssmtune", "hf+peft") or method not in hs.METHODS or (stack == "hf+peft" and method != "lora"):
            raise ValueError(f"bad --variants entry {spec!r}: a hybrid model takes ssmtune:MODEL:METHOD (METHOD in "
                             f"{hs.METHODS}) or hf+peft:MODEL:lora")  # fmt: skip
        return ts.Variant(stack, model, method, "hybrid", int(sizes[0]), int(sizes[1]))
    if stack not in ts.STACKS or model not in ts.MODELS or method not in ts.METHODS:
        raise ValueError(f"bad --variants entry {spec!r}: stack in {ts.STACKS}, model in {ts.MODELS} or "
                         f"{tuple(hs.SHAPES)}, method in {ts.METHODS}")  # fmt: skip
    backend = {"ssmtune": "auto", "hf+peft": "torch-path", "mamba_ssm": "unfused"}[stack]
    return ts.Variant(stack, model, method, backend, int(sizes[0]), int(sizes[1]))


def _hybrid_step(v: ts.Variant, args: argparse.Namespace, device: torch.device):
    """A ``hybrid_step`` configuration (its builders, LoRA targets, bf16 recipe and step): model, detail, step."""
    targets = hs.lora_targets(v.stack, v.model) if v.method == "lora" else None
    build = hs.build_ours if v.stack == "ssmtune" else hs.build_peer
    model = build(v.model, v.method, args.small, device, targets)
    vocab = (hs.SMALL_SHAPES if args.small else hs.SHAPES)[v.model][1]["vocab_size"]
    ids = torch.randint(1, vocab, (v.batch, v.seqlen), generator=torch.Generator().manual_seed(1)).to(device)
    step, _ = hs.make_step(model, v.method, ids, ours=v.stack == "ssmtune")
    detail = "targets " + "+".join(targets) if targets else ""
    if v.stack == "ssmtune" and (backend := hs.gdn_backend(v.model, device, grad=True)):
        detail = (detail + f" | gated_delta_rule backend {backend}").strip(" |")
    return model, detail, step


def profile(v: ts.Variant, args: argparse.Namespace, device: torch.device) -> dict:
    if v.backend == "hybrid":
        model, detail, step = _hybrid_step(v, args, device)
    else:
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
    intervals, _ = kernels_of(lambda s=step: [s() for _ in range(args.steps)], device)
    per_kernel = per_kernel_ms(intervals, args.steps)
    cats = categories(per_kernel)
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


def decode_step(args: argparse.Namespace, fn: Callable[[int], torch.Tensor], rows: int, device: torch.device) -> dict:
    """Per-step figures of decoding ``rows`` rows with ``fn`` (``decode.generator_fn``): a profiled generate of
    1 + ``args.steps`` tokens minus one of 1 token, over the steps."""
    n = args.steps
    t_n, t_1 = dec.time_generate(fn, 1 + n, max(1, args.warmup), device)  # also the warmup: compile, capture

    def traced(k: int):
        with torch.inference_mode():
            return kernels_of(lambda: fn(k), device)

    (iv_n, launches_n), (iv_1, launches_1) = traced(1 + n), traced(1)
    # the kernels both runs start with are the prefill: dropped from both (but the last, whose gap to the first decode
    # kernel counts), so that the prefill's run-to-run noise stays out of the difference
    iv_n, iv_1 = sorted(iv_n), sorted(iv_1)
    same = next((i for i, (x, y) in enumerate(zip(iv_n, iv_1)) if x[2] != y[2]), min(len(iv_n), len(iv_1)))
    iv_n, iv_1 = iv_n[max(same - 1, 0) :], iv_1[max(same - 1, 0) :]
    pk_n, pk_1 = per_kernel_ms(iv_n, n), per_kernel_ms(iv_1, n)
    # a kernel run as often in both (the first token's tail) is no decode kernel: its difference is noise
    per_kernel = {name: [pk_n.get(name, [0.0, 0])[0] - pk_1.get(name, [0.0, 0])[0],
                         pk_n.get(name, [0.0, 0])[1] - pk_1.get(name, [0.0, 0])[1]]
                  for name in {*pk_n, *pk_1}}  # fmt: skip
    per_kernel = {name: v for name, v in per_kernel.items() if abs(v[1]) > 1e-9}
    cats = categories(per_kernel)
    a, b = idle_gaps(iv_n, n, top=len(iv_n)), idle_gaps(iv_1, n, top=len(iv_1))
    buckets = {lab: {"gaps": round(x["gaps"] - b["buckets"].get(lab, {}).get("gaps", 0.0), 2),
                     "ms": x["ms"] - b["buckets"].get(lab, {}).get("ms", 0.0)}
               for lab, x in a["buckets"].items()}  # fmt: skip
    pairs: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])  # (before, after) -> [us, gaps]
    for sign, tl in ((1, a), (-1, b)):
        for g in tl["largest"]:
            pairs[g["before"], g["after"]][0] += sign * g["us"] / n
            pairs[g["before"], g["after"]][1] += sign / n
    top_gaps = [{"ms": us / 1e3, "gaps": round(k, 2), "before": before, "after": after}
                for (before, after), (us, k) in sorted(pairs.items(), key=lambda kv: -kv[1][0])[: args.top]
                if us > 0]  # fmt: skip
    n_layer = ts.SHAPES[args.shape]["n_layer"]
    kernels = a["kernels"] - b["kernels"]
    wall_ms = (t_n - t_1) * 1e3 / n
    out = {
        "wall_ms": wall_ms,
        "tok_s": rows * 1e3 / wall_ms if wall_ms > 0 else None,
        "busy_ms": sum(cats.values()),
        "timeline": {
            "kernels": kernels,
            "kernels_per_layer": kernels / n_layer,
            **{k: a[k] - b[k] for k in ("span_ms", "busy_ms", "idle_ms")},
            "buckets": buckets,
            "top_gaps": top_gaps,
        },
        "graph_launches": (launches_n - launches_1) / n,
        "categories": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
        "top": [
            {"name": k[:120], "ms": ms, "calls": round(calls, 2)}
            for k, (ms, calls) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[: args.top]
        ],
    }
    if out["graph_launches"] > 0 and kernels < n_layer:
        out["warning"] = (f"{out['graph_launches']:.1f} CUDA graph launches but {kernels:.1f} kernels a step recorded "
                          f"for {n_layer} layers: this CUPTI may drop the kernels of graph replays")  # fmt: skip
    return out


def run_decode(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Every (model, stack, batch) of ``--workload decode``, through the ``decode`` benchmark's loop (``dec.cases``)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n_adapters = args.adapters or (4 if args.small else 16)

    def mixes(stack: str, batch: int) -> list[tuple[str, list[str] | None]]:
        # one row per batch: its rows routed to the adapters in turn (--mixed) or on one adapter
        mixed = args.mixed and batch >= n_adapters > 1
        return dec.adapter_mixes(n_adapters, batch, "interleaved") if mixed else [("1 adapter", None)]

    rows = []
    runs = dec.cases(args.models, args.stacks, args.batch, mixes, shape=args.shape, device=device, dtype=dtype,
                     prompt_len=args.prompt_len, n_adapters=n_adapters)  # fmt: skip
    for case in runs:
        names = case.names
        row = {"variant": f"{case.stack}:{case.model}:b{case.batch}" + (f":{n_adapters} adapters" if names else ""),
               "workload": "decode", "model": case.model, "stack": case.stack, "batch": case.batch,
               "adapters": case.mix, "prompt_len": args.prompt_len, "steps": args.steps,
               "dtype": str(dtype).removeprefix("torch.")}  # fmt: skip
        rows.append(row)
        if case.why is not None:
            row["skipped"] = case.why
            continue
        try:
            row.update(decode_step(args, dec.generator_fn(case.stack, case.lm(), case.ids, names), case.batch, device))
        except Exception as e:  # noqa: BLE001 - one failing stack must not lose the others
            row["error"] = error_text(e)
        if getattr(args, "report_partial", None) is not None:
            args.report_partial({"rows": rows})
    return rows


def table(results: list[dict], unit: str = "ms") -> str:
    """Categories against variants, one column a variant; ``unit`` "us" shows the times in µs (decode steps)."""
    scale, spec = (1e3, ".1f") if unit == "us" else (1.0, ".2f")
    ok = [r for r in results if "error" not in r and "skipped" not in r]
    lines = [f"{r['variant']}: {r['error']}" for r in results if "error" in r]
    lines += [f"{r['variant']}: skipped: {r['skipped']}" for r in results if "skipped" in r]
    lines += [f"{r['variant']}: warning: {r['warning']}" for r in ok if "warning" in r]
    for r in ok:
        tl = r["timeline"]
        gaps = ", ".join(f"{lab} {b['ms'] * scale:{spec}} {unit}" for lab, b in tl["buckets"].items())
        lines.append(f"{r['variant']}: idle {tl['idle_ms'] * scale:{spec}} {unit} a step in gaps {gaps}")
    if not ok:
        return "\n".join(lines)
    cats = sorted({c for r in ok for c in r["categories"]}, key=lambda c: -max(r["categories"].get(c, 0) for r in ok))
    rows = [[c, *(f"{r['categories'].get(c, 0.0) * scale:{spec}}" for r in ok)] for c in cats]
    rows += [[f"busy ({unit}/step)", *(f"{r['busy_ms'] * scale:{spec}}" for r in ok)],
             [f"idle ({unit}/step)", *(f"{r['timeline']['idle_ms'] * scale:{spec}}" for r in ok)],
             ["kernels / step", *(f"{r['timeline']['kernels']:.0f}" for r in ok)]]  # fmt: skip
    if unit == "us":  # decode rows
        rows += [["kernels / layer", *(f"{r['timeline']['kernels_per_layer']:.1f}" for r in ok)],
                 ["graph launches / step", *(f"{r['graph_launches']:.1f}" for r in ok)]]  # fmt: skip
    rows += [[f"wall ({unit}/step)", *(f"{r['wall_ms'] * scale:{spec}}" for r in ok)]]
    if unit == "us":
        rows += [["decode tok/s", *(fmt(r["tok_s"], ",.0f") for r in ok)]]
    return "\n".join(lines) + "\n\n" + markdown(["category", *(r["variant"] for r in ok)], rows)


def decode_tables(rows: list[dict], top: int = 5) -> str:
    """One table per (model, batch) with the stacks side by side, then each stack's top kernels and gaps."""
    out = []
    for key in dict.fromkeys((r["model"], r["batch"]) for r in rows):
        group = [r for r in rows if (r["model"], r["batch"]) == key]
        out.append(f"### {key[0]}, batch {key[1]} (per decode step)\n\n" + table(group, unit="us"))
        for r in group:
            if "top" not in r:
                continue
            out.append(f"{r['variant']} top kernels (us/step, calls/step):\n" + "\n".join(
                f"  {k['ms'] * 1e3:8.1f} {k['calls']:6.1f}  {k['name'][:90]}" for k in r["top"][:top]))  # fmt: skip
            out.append(f"{r['variant']} top gaps (us/step, gaps/step, before -> after):\n" + "\n".join(
                f"  {g['ms'] * 1e3:8.1f} {g['gaps']:6.1f}  {g['before'][:40]} -> {g['after'][:40]}"
                for g in r["timeline"]["top_gaps"][:top]))  # fmt: skip
    return "\n\n".join(out)


def add_args(ap: argparse.ArgumentParser) -> None:
    what = "train: a training step per --variants entry; decode: decode steps per model, stack and batch"
    ap.add_argument("--workload", choices=("train", "decode"), default="train", help=what)
    ap.add_argument("--variants", nargs="+", default=None,
                    help="train: stack:model:method:BxL entries (stacks ssmtune, hf+peft, mamba_ssm; models mamba, "
                         "mamba2 or a hybrid_step model, e.g. ssmtune:qwen3_5_0.8b:state_offset_h:4x1024; default "
                         "ssmtune:mamba:state_offset_h:8x2048 mamba_ssm:mamba:none:8x2048)")  # fmt: skip
    ap.add_argument("--small", action="store_true", help="tiny shape (d_model 64, 2 layers): a CPU test")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps (decode: generate rounds) before profiling")
    ap.add_argument("--steps", type=int, default=None, help="profiled steps (default: train 3, decode 32; --small 3)")
    ap.add_argument("--top", type=int, default=15, help="kernels listed per variant")
    dec_opts = ap.add_argument_group("--workload decode (models and stacks of the decode benchmark)")
    dec_opts.add_argument("--models", nargs="+", choices=dec.MODELS, default=None, help="default: mamba mamba2")
    dec_opts.add_argument("--stacks", nargs="+", choices=dec.STACKS, default=None,
                          help="default: graph mamba_ssm eager")  # fmt: skip
    dec_opts.add_argument("--batch", type=int, nargs="+", default=None, help="rows (default 1 16 64; --small 2)")
    dec_opts.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 128; --small 8)")
    dec_opts.add_argument("--adapters", type=int, default=None, help="State-offset adapters built (default 16)")
    mixed = "graph / eager: rows routed to the adapters in turn (batches of >= --adapters rows)"
    dec_opts.add_argument("--mixed", action="store_true", help=mixed)


DECODE_ONLY = ("models", "stacks", "batch", "prompt_len", "adapters")


def run(args: argparse.Namespace) -> dict:
    args.shape = "tiny" if args.small else "130m"
    device = torch.device(args.device)
    if args.workload == "decode":
        if args.variants is not None:
            raise ValueError("--variants is for --workload train; decode takes --models, --stacks and --batch")
        args.models = args.models or list(dec.MODELS)
        args.stacks = args.stacks or ["graph", "mamba_ssm", "eager"]
        args.batch = args.batch or ([2] if args.small else [1, 16, 64])
        args.prompt_len = (8 if args.small else 128) if args.prompt_len is None else args.prompt_len
        args.steps = (3 if args.small else 32) if args.steps is None else args.steps
        if min(args.batch) < 1 or args.prompt_len < 1 or args.steps < 1:
            raise ValueError(f"--batch, --prompt-len and --steps must be positive, got {args.batch}, "
                             f"{args.prompt_len}, {args.steps}")  # fmt: skip
        rows = run_decode(args, device)
        return {"rows": rows, "table": decode_tables(rows)}
    given = [f"--{k.replace('_', '-')}" for k in DECODE_ONLY if getattr(args, k) is not None] + ["--mixed"] * args.mixed
    if given:
        raise ValueError(f"{' '.join(given)} only apply to --workload decode")
    args.variants = args.variants or ["ssmtune:mamba:state_offset_h:8x2048", "mamba_ssm:mamba:none:8x2048"]
    args.steps = 3 if args.steps is None else args.steps
    variants = [parse_variant(spec) for spec in args.variants]  # every entry checked before the first build
    results = []
    for v in variants:
        try:
            results.append(profile(v, args, device))
        except Exception as e:  # noqa: BLE001 - one failing stack (e.g. mamba_ssm not built) must not lose the others
            results.append({"variant": f"{v.stack}:{v.model}:{v.method}:{v.batch}x{v.seqlen}",
                            "error": f"{type(e).__name__}: {str(e)[:200]}"})  # fmt: skip
    return {"rows": results, "table": table(results)}


register(Benchmark("profile", "where a training step's (or, --workload decode, a decode step's) GPU time goes, kernel "
                   "by kernel, and the GPU's idle gaps", add_args, run))  # fmt: skip
