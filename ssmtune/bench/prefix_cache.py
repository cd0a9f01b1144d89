"""Prefill with Prefix adapters: the kept prefix states (gradients off) against a prefix pass on every forward.

Workload: one prefill forward of ``--requests`` prompts of ``--prompt-len`` random tokens with a fresh cache, as
``BatchEngine`` runs it (``inference_mode``, ``adapter_names=``), request i on Prefix adapter i mod A (``--virtual-tokens``
M each), on a tiny random Mamba-1 (d_model 64, 2 layers) or ``--shape 130m``. ``fresh`` runs one mixer pass over the M
virtual tokens per adapter and layer on every forward (no kept states), ``kept`` is what ssmtune does. Check: both give
the same logits. Reported: median over ``--repeats`` (fresh and kept timed in turn) of the mean ms per prefill.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ssmtune.bench.common import check_close, markdown, sync
from ssmtune.bench.registry import Benchmark, register

SHAPES = {
    "tiny": {"d_model": 64, "n_layer": 2, "vocab_size": 264},
    "130m": {"d_model": 768, "n_layer": 24, "vocab_size": 50280},
}


def build(args: argparse.Namespace, n_adapters: int):
    from ssmtune.core.peft_model import get_peft_model
    from ssmtune.methods import PrefixTuningConfig
    from ssmtune.models import MambaConfig, causal_lm_for

    torch.manual_seed(0)
    base = causal_lm_for(MambaConfig(**SHAPES[args.shape])).to(args.device).eval()
    config = PrefixTuningConfig(num_virtual_tokens=args.virtual_tokens, init_std=0.5)
    peft = get_peft_model(base, config, adapter_name="a0")
    for i in range(1, n_adapters):
        peft.add_adapter(f"a{i}", config)
    return peft


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--shape", choices=list(SHAPES), default="tiny")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--virtual-tokens", type=int, default=16)
    ap.add_argument("--adapters", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--iters", type=int, default=20)


def run(args: argparse.Namespace) -> dict:
    from ssmtune.methods.prefix import PrefixStates
    from ssmtune.models import InferenceCache

    kept_states = PrefixStates._states
    rows, table = [], []
    for n in args.adapters:
        peft = build(args, n)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, SHAPES[args.shape]["vocab_size"], (args.requests, args.prompt_len), generator=g)
        ids = ids.to(args.device)
        names = [f"a{i % n}" for i in range(args.requests)]

        def prefill(fresh: bool, ids=ids, names=names, peft=peft) -> torch.Tensor:
            if fresh:
                PrefixStates._states = lambda self: self.prefix_states()  # a prefix pass on every forward
            try:
                return peft(ids, cache=InferenceCache(peft.config.n_layer), adapter_names=names).logits
            finally:
                PrefixStates._states = kept_states

        def timed(fresh: bool, prefill=prefill) -> float:
            sync(args.device)
            t0 = time.perf_counter()
            for _ in range(args.iters):
                prefill(fresh)
            sync(args.device)
            return (time.perf_counter() - t0) / args.iters * 1e3

        times: dict[bool, list[float]] = {True: [], False: []}
        with torch.inference_mode():
            err = check_close(f"kept prefix states, {n} adapters", [prefill(True)], [prefill(False)], 1e-5)
            for _ in range(args.repeats):  # alternated, so load on a shared machine hits both
                for fresh in (True, False):
                    times[fresh].append(timed(fresh))
        fresh_ms, kept_ms = statistics.median(times[True]), statistics.median(times[False])
        rows.append({"adapters": n, "fresh_ms": fresh_ms, "kept_ms": kept_ms, "check_rel_err": err})
        table.append([n, f"{kept_ms:.2f}", f"{fresh_ms:.2f}", f"{fresh_ms / kept_ms:.2f}"])
    header = ["adapters", "kept ms", "fresh ms", "x kept (fresh / kept)"]
    return {"rows": rows, "table": markdown(header, table)}


register(Benchmark("prefix_cache", "prefill with Prefix adapters: kept prefix states against a prefix pass per forward",
                   add_args, run))  # fmt: skip
