"""Serving throughput: many state-based adapters in one batch against switching adapters one request at a time.

Workload: ``--requests`` prompts of ``--prompt-len`` random tokens, each asking for exactly ``--new-tokens`` greedy
tokens (no EOS, so every row does the same work); request i uses adapter i mod A, for A in ``--adapters`` (1, 4, 16).
The adapters cycle through ``--kinds``: ``state`` = State-offset h, State-offset y, Initial State; ``lora`` = LoRA r 8
on in_proj + out_proj; ``mixed`` = both lists interleaved (all routable per row), with random non-zero tensors, on a
random base model of ``--shape`` (tiny: d_model 64, 2 layers; 130m: d_model 768, 24 layers).

Modes (each timed ``--repeats`` times, median reported):
- ``engine``: ``ssmtune.serve.BatchEngine`` (what ``ssmtune serve`` runs, without HTTP): all requests submitted at
  once, up to ``--max-batch`` rows decoded together, each row with its adapter (continuous batching).
- ``generate``: ``PeftModel.generate(ids, adapter_names=[...])`` on chunks of ``--max-batch`` requests.
- ``grouped``: requests grouped by adapter; ``set_adapter`` then one batched ``generate`` per group (chunked).
- ``switch``: one request at a time, ``set_adapter`` before each (the baseline the issue asks for).

Gate: before timing, every mode's tokens are compared with ``switch``'s; the match fraction is reported (1.0 expected
in fp32; bf16 may flip near-ties because batched and single-row kernels round differently). Each row that differs is
checked at its first differing token: ``ties`` counts those where, in the single-row path's own logits at that step,
the two tokens are within 2 ulps of the logits' dtype (a tie that rounding decides, not a wrong adapter); ``match+ties``
is then 1.0 for a correct batch. (The 130m shape in bf16 has random weights and a 50k vocabulary: exact bf16 ties among
the top logits are common, so its plain match is well below 1 once LoRA rows batch: measured 0.53-0.56 on the H100.)

CPU (tiny, ~30 s on 2 cores):  PYTHONPATH=. python benchmarks/bench_serve.py --device cpu --shape tiny
GPU (H100):                    PYTHONPATH=. python benchmarks/bench_serve.py --shape 130m --requests 64 --max-batch 16
"""

from __future__ import annotations

import argparse
import json
import platform
import queue
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssmtune import InitialStateConfig, LoraConfig, StateOffsetConfig, get_peft_model
from ssmtune.models import Mamba2Config, MambaConfig, causal_lm_for
from ssmtune.serve import BatchEngine, GenerationRequest, GenerationSettings

SHAPES = {
    "tiny": {"d_model": 64, "n_layer": 2, "vocab_size": 264},
    "130m": {"d_model": 768, "n_layer": 24, "vocab_size": 50280},
}
STATE_KINDS = [StateOffsetConfig(), StateOffsetConfig(variant="y"), InitialStateConfig()]
LORA_KINDS = [LoraConfig(r=8)]
KINDS = {
    "state": STATE_KINDS,
    "lora": LORA_KINDS,
    "mixed": [STATE_KINDS[0], LORA_KINDS[0], STATE_KINDS[1], LORA_KINDS[0], STATE_KINDS[2], LORA_KINDS[0]],
}


def build(args, n_adapters: int):
    shape = SHAPES[args.shape]
    cfg = (
        MambaConfig(**shape)
        if args.arch == "mamba"
        else Mamba2Config(**shape, headdim=64 if args.shape != "tiny" else 16)
    )
    torch.manual_seed(0)
    base = causal_lm_for(cfg).to(args.device).eval()
    if args.precision == "bf16":
        base.to(torch.bfloat16)
        for _, mixer in base.mixers():
            mixer.A_log.data = mixer.A_log.data.float()
    names = [f"a{i}" for i in range(n_adapters)]
    kinds = KINDS[args.kinds]
    peft = get_peft_model(base, kinds[0], adapter_name=names[0])
    for i, n in enumerate(names[1:], start=1):
        peft.add_adapter(n, kinds[i % len(kinds)])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n in names:
            for p in peft.adapter_state_dict(n).values():
                p.add_((torch.randn(p.shape, generator=g) * 0.3).to(p))
    return peft, names


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def count_ties(peft, prompts, names, outs, reference) -> int:
    """Rows whose first token that differs from the single-row reference was a tie in the reference's logits."""
    ties = 0
    for ids, name, out, ref in zip(prompts, names, outs, reference):
        if out == ref:
            continue
        k = next((j for j, (a, b) in enumerate(zip(out, ref)) if a != b), None)
        if k is None:  # one is a prefix of the other (an end-of-sequence token): not a tie
            continue
        peft.set_adapter(name)
        ctx = torch.cat([ids, torch.tensor(ref[:k], dtype=ids.dtype, device=ids.device)])[None]
        logits = peft(ctx).logits[0, -1]
        ulp = torch.finfo(logits.dtype).eps * logits.abs().max().float().clamp_min(1.0)
        ties += bool((logits[out[k]].float() - logits[ref[k]].float()).abs() <= 2 * ulp)
    return ties


def run_switch(peft, prompts, names, args):
    out = []
    for ids, name in zip(prompts, names):
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
            for i, row in zip(chunk, gen.tolist()):
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
    qs = []
    for ids, name in zip(prompts, names):
        q: queue.Queue = queue.Queue()
        settings = GenerationSettings(max_new_tokens=args.new_tokens)
        engine.submit(GenerationRequest(prompt_ids=ids.tolist(), adapter=name, settings=settings, emit=q.put))
        qs.append(q)
    out = []
    for q in qs:
        tokens = []
        while True:
            event = q.get(timeout=600)
            if "token" in event:
                tokens.append(event["token"])
            elif "error" in event:
                raise RuntimeError(event["error"])
            else:
                break
        out.append(tokens)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", choices=list(SHAPES), default="tiny")
    ap.add_argument("--arch", choices=["mamba", "mamba2"], default="mamba")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--kinds", choices=sorted(KINDS), default="state", help="which adapter methods to cycle through")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", nargs="+", default=["engine", "generate", "grouped", "switch"])
    ap.add_argument("--out", default="bench_serve.json")
    args = ap.parse_args()
    if args.precision is None:
        args.precision = "bf16" if args.device.startswith("cuda") else "fp32"
    if args.device == "cpu":
        torch.set_num_threads(max(torch.get_num_threads(), 1))

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
        runners = {
            "switch": (run_switch, peft),
            "grouped": (run_grouped, peft),
            "generate": (run_generate, peft),
            "engine": (run_engine, engine),
        }

        def run(mode: str, runners=runners, prompts=prompts, names=names) -> list[list[int]]:
            fn, target = runners[mode]
            return fn(target, prompts, names, args)

        try:
            with torch.inference_mode():
                reference = run("switch")  # also the warm-up of the single-row path
                for mode in args.modes:
                    outs = run(mode)  # warm-up and correctness gate
                    match = sum(a == b for a, b in zip(outs, reference)) / len(reference)
                    ties = count_ties(peft, prompts, names, outs, reference) if match < 1 else 0
                    times = []
                    for _ in range(args.repeats):
                        sync(args.device)
                        t0 = time.perf_counter()
                        outs = run(mode)
                        sync(args.device)
                        times.append(time.perf_counter() - t0)
                    t = statistics.median(times)
                    new_tokens = sum(len(o) for o in outs)
                    rows.append({
                        "adapters": n_adapters, "mode": mode, "seconds": t, "requests_per_s": args.requests / t,
                        "tokens_per_s": new_tokens / t, "match_switch": match, "ties": ties,
                        "match_or_tie": match + ties / len(reference),
                        "max_rows": engine.stats.max_rows if mode == "engine" else None,
                    })  # fmt: skip
                    print(f"A={n_adapters:>2} {mode:<9} {t * 1e3:8.1f} ms  {args.requests / t:8.1f} req/s  "
                          f"{new_tokens / t:9.1f} tok/s  match={match:.2f} match+ties={match + ties / len(reference):.2f}",
                          flush=True)  # fmt: skip
        finally:
            engine.stop()

    meta = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "args": vars(args),
    }  # fmt: skip
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print("\n| adapters | mode | req/s | tok/s | x switch | match | match+ties |\n|---|---|---|---|---|---|---|")
    for r in rows:
        base = next(x for x in rows if x["adapters"] == r["adapters"] and x["mode"] == "switch")
        print(f"| {r['adapters']} | {r['mode']} | {r['requests_per_s']:.1f} | {r['tokens_per_s']:.0f} | "
              f"{r['tokens_per_s'] / base['tokens_per_s']:.2f} | {r['match_switch']:.2f} | {r['match_or_tie']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
