"""Serving throughput: many state-based adapters in one batch against switching adapters one request at a time.

Workload: ``--requests`` prompts of ``--prompt-len`` random tokens, each asking for exactly ``--new-tokens`` greedy
tokens (no EOS, so every row does the same work); request i uses adapter i mod A, for A in ``--adapters``. The adapters
cycle through ``--kinds``: ``state`` = State-offset h, State-offset y, Initial State; ``lora`` = LoRA r 8; ``mixed`` =
both interleaved, with random non-zero tensors, on a random base model of ``--shape``.

Modes (each timed ``--repeats`` times, median reported): ``engine`` (``ssmtune.serve.BatchEngine``, what ``ssmtune
serve`` runs, without HTTP: continuous batching, each row with its adapter), ``generate`` (``PeftModel.generate`` with
``adapter_names=``, chunks of ``--max-batch``), ``grouped`` (``set_adapter`` then one batched ``generate`` per adapter)
and ``switch`` (one request at a time, ``set_adapter`` before each: the baseline and the reference).

Check: every mode's tokens are compared with ``switch``'s before timing. A row that differs is looked at its first
differing token: if, in the single-row path's own logits at that step, the two tokens are within 2 ulps (a tie that
rounding decides, common in bf16 with random weights), it counts as a tie. A mode with a row that differs by more
than a tie is not timed (the benchmark stops).
"""

from __future__ import annotations

import argparse
import queue
import statistics
import time

import torch

from ssmtune.bench.common import CheckFailed, markdown, sync
from ssmtune.bench.registry import Benchmark, register

SHAPES = {
    "tiny": {"d_model": 64, "n_layer": 2, "vocab_size": 264},
    "130m": {"d_model": 768, "n_layer": 24, "vocab_size": 50280},
}
MODES = ("engine", "generate", "grouped", "switch")


def kinds(name: str) -> list:
    from ssmtune.methods import InitialStateConfig, LoraConfig, StateOffsetConfig

    state = [StateOffsetConfig(), StateOffsetConfig(variant="y"), InitialStateConfig()]
    lora = [LoraConfig(r=8)]
    return {"state": state, "lora": lora, "mixed": [state[0], lora[0], state[1], lora[0], state[2], lora[0]]}[name]


def build(args: argparse.Namespace, n_adapters: int):
    from ssmtune.core.peft_model import get_peft_model
    from ssmtune.models import Mamba2Config, MambaConfig, causal_lm_for

    shape = SHAPES[args.shape]
    cfg = (
        MambaConfig(**shape)
        if args.arch == "mamba"
        else Mamba2Config(**shape, headdim=16 if args.shape == "tiny" else 64)
    )
    torch.manual_seed(0)
    base = causal_lm_for(cfg).to(args.device).eval()
    if args.precision == "bf16":
        base.to(torch.bfloat16)
        for _, mixer in base.mixers():
            mixer.A_log.data = mixer.A_log.data.float()
    names = [f"a{i}" for i in range(n_adapters)]
    configs = kinds(args.kinds)
    peft = get_peft_model(base, configs[0], adapter_name=names[0])
    for i, n in enumerate(names[1:], start=1):
        peft.add_adapter(n, configs[i % len(configs)])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n in names:
            for p in peft.adapter_state_dict(n).values():
                p.add_((torch.randn(p.shape, generator=g) * 0.3).to(p))
    return peft, names


def count_ties(peft, prompts, names, outs, reference) -> int:
    """Rows whose first token that differs from the single-row reference was a tie in the reference's logits."""
    ties = 0
    for ids, name, out, ref in zip(prompts, names, outs, reference, strict=True):
        k = next((j for j, (a, b) in enumerate(zip(out, ref)) if a != b), None)
        if out == ref or k is None:  # equal, or one a prefix of the other (an end-of-sequence token): not a tie
            continue
        peft.set_adapter(name)
        ctx = torch.cat([ids, torch.tensor(ref[:k], dtype=ids.dtype, device=ids.device)])[None]
        logits = peft(ctx).logits[0, -1]
        ulp = torch.finfo(logits.dtype).eps * logits.abs().max().float().clamp_min(1.0)
        ties += bool((logits[out[k]].float() - logits[ref[k]].float()).abs() <= 2 * ulp)
    return ties


def run_switch(peft, prompts, names, args):
    out = []
    for ids, name in zip(prompts, names, strict=True):
        peft.set_adapter(name)
        out.append(peft.generate(ids[None], max_new_tokens=args.new_tokens)[0, ids.numel() :].tolist())
    return out


def run_grouped(peft, prompts, names, args):
    out: list = [None] * len(prompts)
    for name in dict.fromkeys(names):
        idx = [i for i, n in enumerate(names) if n == name]
        peft.set_adapter(name)
        for s in range(0, len(idx), args.max_batch):
            chunk = idx[s : s + args.max_batch]
            ids = torch.stack([prompts[i] for i in chunk])
            gen = peft.generate(ids, max_new_tokens=args.new_tokens)[:, ids.shape[1] :]
            for i, row in zip(chunk, gen.tolist(), strict=True):
                out[i] = row
    return out


def run_generate(peft, prompts, names, args):
    out = []
    for s in range(0, len(prompts), args.max_batch):
        ids = torch.stack(prompts[s : s + args.max_batch])
        gen = peft.generate(ids, max_new_tokens=args.new_tokens, adapter_names=names[s : s + args.max_batch])
        out.extend(gen[:, ids.shape[1] :].tolist())
    return out


def run_engine(engine, prompts, names, args):
    from ssmtune.serve import GenerationRequest, GenerationSettings

    qs = []
    for ids, name in zip(prompts, names, strict=True):
        q: queue.Queue = queue.Queue()
        settings = GenerationSettings(max_new_tokens=args.new_tokens)
        engine.submit(GenerationRequest(prompt_ids=ids.tolist(), adapter=name, settings=settings, emit=q.put))
        qs.append(q)
    out = []
    for q in qs:
        tokens = []
        while "done" not in (event := q.get(timeout=600)):
            if "error" in event:
                raise RuntimeError(event["error"])
            if "token" not in event:
                break
            tokens.append(event["token"])
        out.append(tokens)
    return out


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--shape", choices=list(SHAPES), default="tiny")
    ap.add_argument("--arch", choices=["mamba", "mamba2"], default="mamba")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--kinds", choices=["state", "lora", "mixed"], default="state", help="adapter methods to cycle")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))


def run(args: argparse.Namespace) -> dict:
    from ssmtune.serve import BatchEngine

    if args.precision is None:
        args.precision = "bf16" if args.device.startswith("cuda") else "fp32"
    rows = []
    for n_adapters in args.adapters:
        peft, adapter_list = build(args, n_adapters)
        g = torch.Generator().manual_seed(2)
        vocab = peft.config.vocab_size
        prompts = [
            torch.randint(0, vocab, (args.prompt_len,), generator=g).to(args.device) for _ in range(args.requests)
        ]
        names = [adapter_list[i % n_adapters] for i in range(args.requests)]
        engine = BatchEngine(peft, eos_token_id=None, max_batch=args.max_batch, batch_wait_s=0.002)
        engine.start()
        runners = {"switch": (run_switch, peft), "grouped": (run_grouped, peft), "generate": (run_generate, peft),
                   "engine": (run_engine, engine)}  # fmt: skip
        try:
            with torch.inference_mode():
                reference = run_switch(peft, prompts, names, args)  # also the single-row path's warm-up
                for mode in args.modes:
                    fn, target = runners[mode]
                    outs = fn(target, prompts, names, args)  # warm-up and check
                    match = sum(a == b for a, b in zip(outs, reference, strict=True)) / len(reference)
                    ties = count_ties(peft, prompts, names, outs, reference) if match < 1 else 0
                    if match + ties / len(reference) < 1:
                        bad = len(reference) - round(match * len(reference)) - ties
                        raise CheckFailed(f"mode {mode}, {n_adapters} adapters: {bad} of {len(reference)} requests "
                                          "differ from one-request-at-a-time generation by more than a tie")  # fmt: skip
                    times = []
                    for _ in range(args.repeats):
                        sync(args.device)
                        t0 = time.perf_counter()
                        outs = fn(target, prompts, names, args)
                        sync(args.device)
                        times.append(time.perf_counter() - t0)
                    t = statistics.median(times)
                    new_tokens = sum(len(o) for o in outs)
                    rows.append({"adapters": n_adapters, "mode": mode, "seconds": t, "requests_per_s": args.requests / t,
                                 "tokens_per_s": new_tokens / t, "match_switch": match, "ties": ties,
                                 "max_rows": engine.stats.max_rows if mode == "engine" else None})  # fmt: skip
                    print(f"A={n_adapters:>2} {mode:<9} {t * 1e3:8.1f} ms  {new_tokens / t:9.1f} tok/s  match {match:.2f}",
                          flush=True)  # fmt: skip
        finally:
            engine.stop()
    table = []
    for r in sorted(rows, key=lambda r: (r["adapters"], r["mode"] == "switch")):
        base = next((x for x in rows if x["adapters"] == r["adapters"] and x["mode"] == "switch"), None)
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else "n/a"
        table.append([r["adapters"], r["mode"], f"{r['requests_per_s']:.1f}", f"{r['tokens_per_s']:.0f}", ratio,
                      f"{r['match_switch']:.2f}", r["ties"]])  # fmt: skip
    header = ["adapters", "mode", "req/s", "tok/s", "x switch", "match", "ties"]
    return {"rows": rows, "table": markdown(header, table)}


register(Benchmark("serve", "serving throughput: many adapters in one batch against switching adapters per request",
                   add_args, run))  # fmt: skip
