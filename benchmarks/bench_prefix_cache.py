"""Prefill with Prefix adapters: the kept prefix states (gradients off) against a prefix pass on every forward.

Workload: one prefill forward of ``--requests`` prompts of ``--prompt-len`` random tokens with a fresh cache, as
``BatchEngine`` runs it (``inference_mode``, ``adapter_names=``), request i on Prefix adapter i mod A
(``--virtual-tokens`` M each), on the tiny random Mamba-1 of ``bench_serve.py`` (d_model 64, 2 layers) or ``--shape
130m``. ``fresh`` is the former behaviour (one mixer pass over the M virtual tokens per adapter and layer on every
forward), ``kept`` the current one. Reported: median over ``--repeats`` (fresh and kept timed in turn) of the mean ms per prefill over
``--iters`` calls.

CPU:  PYTHONPATH=. python benchmarks/bench_prefix_cache.py --device cpu
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssmtune import PrefixTuningConfig, get_peft_model
from ssmtune.methods.prefix import PrefixStates
from ssmtune.models import InferenceCache, MambaConfig, causal_lm_for

SHAPES = {
    "tiny": {"d_model": 64, "n_layer": 2, "vocab_size": 264},
    "130m": {"d_model": 768, "n_layer": 24, "vocab_size": 50280},
}


def build(args, n_adapters: int):
    torch.manual_seed(0)
    base = causal_lm_for(MambaConfig(**SHAPES[args.shape])).to(args.device).eval()
    config = PrefixTuningConfig(num_virtual_tokens=args.virtual_tokens, init_std=0.5)
    peft = get_peft_model(base, config, adapter_name="a0")
    for i in range(1, n_adapters):
        peft.add_adapter(f"a{i}", config)
    return peft


def time_prefill(peft, ids: torch.Tensor, names: list[str], args) -> tuple[float, float]:
    """Median ms per prefill (fresh, kept); the two are timed in alternation, so load on a shared machine hits both."""
    kept_states = PrefixStates._states

    def run(fresh: bool) -> float:
        if fresh:
            PrefixStates._states = lambda self: self.prefix_states()  # the former behaviour
        try:
            t0 = time.perf_counter()
            for _ in range(args.iters):
                peft(ids, cache=InferenceCache(peft.config.n_layer), adapter_names=names)
            if ids.is_cuda:
                torch.cuda.synchronize()
            return (time.perf_counter() - t0) / args.iters * 1e3
        finally:
            PrefixStates._states = kept_states

    times: dict[bool, list[float]] = {True: [], False: []}
    with torch.inference_mode():
        run(True), run(False)  # warm-up
        for _ in range(args.repeats):
            for fresh in (True, False):
                times[fresh].append(run(fresh))
    return statistics.median(times[True]), statistics.median(times[False])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--virtual-tokens", type=int, default=16)
    ap.add_argument("--adapters", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    print(f"shape {args.shape}, {args.device}, {torch.get_num_threads()} threads; R {args.requests}, "
          f"P {args.prompt_len}, M {args.virtual_tokens}")  # fmt: skip
    print("| adapters | fresh ms | kept ms | speed-up |")
    print("|---|---|---|---|")
    for n in args.adapters:
        peft = build(args, n)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, SHAPES[args.shape]["vocab_size"], (args.requests, args.prompt_len), generator=g)
        ids = ids.to(args.device)
        names = [f"a{i % n}" for i in range(args.requests)]
        fresh, kept = time_prefill(peft, ids, names, args)
        print(f"| {n} | {fresh:.2f} | {kept:.2f} | {fresh / kept:.2f}x |")


if __name__ == "__main__":
    main()
