"""Decoding throughput: ssmtune's graphed decoding against its eager decoding, mamba_ssm's ``generate(cg=True)`` and
transformers' ``generate``, on randomly initialised 130M-shaped Mamba / Mamba-2 models in bf16.

Workload: ``--batches`` rows (1, 16, 64) of ``--prompt-len`` random tokens (128), then ``--new-tokens`` greedy tokens
(128; no EOS, every row runs to the end). ssmtune's models carry ``--adapters`` State-offset (h) adapters (16),
perturbed away from their zero init; ``1 adapter`` rows decode with one active adapter, ``N adapters`` rows route the
batch's rows to the N adapters in turn (``adapter_names=``, rows r -> adapter r mod N; batches of at least N rows);
``--adapter-layout blocked`` gives each adapter a block of consecutive rows instead (rows r -> adapter r·N // batch),
``both`` times the two (the decode kernels read a row's h' by its adapter: neighbouring rows of one adapter share
cache lines).
The peers have no adapter: they decode the bare model of the same shape (Mamba-1: d_state 16; Mamba-2: headdim 64,
d_state 128). mamba_ssm is timed when it imports (its default fused path, CUDA graphs on).

``--eval-examples N`` also times ``ssmtune eval`` on a generation task end to end (``eval.evaluate``: the
teacher-forced loss pass, then ``generate`` with ``--eval-beams`` beams (5, the default of ``ssmtune eval``),
``--new-tokens`` new tokens, at least 5): N records of a user JSONL task (random ASCII prompts of ``--prompt-len``
bytes, the byte tokenizer), the model with one State-offset adapter, three ways: eager one prompt at a time (the
eval of before graphed decoding and batched prompts), graphed one prompt at a time (these two must give the same
predictions), and the default (graphed, ``eval.batch_size`` prompts per ``generate``; how many of its predictions
equal the eager ones is reported, since batches of another size may round differently); each after an untimed
one-example warm-up.

``--num-beams k`` times beam search instead (what ``ssmtune eval`` runs on generation tasks, k = 5, batch 1): tok/s
count the rows' tokens, not the beams'; mamba_ssm has no beam search (its rows are skipped).

``--state-dtype`` sets the dtype of ssmtune's decode states: ``auto`` (the default, ``generate``'s default: the model's
dtype, bf16 on CUDA, as the peers keep theirs), ``fp32`` (the exact continuation of the training scan's states) or
``bf16``; each row records its stack's state dtype. ``--adapter-dtype model`` casts the adapters to the model's dtype,
as ``ssmtune serve --precision bf16`` serves them (default fp32, as training and evaluation hold them): the 16-adapter
rows read each row's h' from a table of the adapters present, so its dtype sets that table's memory traffic.

Stacks: ``graph`` = ``generate(cuda_graph=None)`` (captured on CUDA; on the CPU the static decoder runs eagerly),
``eager`` = ``generate(cuda_graph=False)``, ``mamba_ssm``, ``transformers``.

Check: before timing, ssmtune's graphed and eager decoding must give the same tokens (the first batch size, mixed
adapters when N > 1, 16 tokens); otherwise the benchmark reports no timings.

Timing: each configuration runs once untimed (Triton compilation, graph capture), then ``--repeats`` times a
generate of ``new-tokens`` tokens and one of a single token, alternated; medians. ``decode tok/s`` = rows x
(new-tokens - 1) / (t(new) - t(1)), the decode steps alone; ``e2e tok/s`` = rows x new-tokens / t(new), prefill
included.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ssmtune.bench.common import CheckFailed, error_text, fmt, markdown, sync
from ssmtune.bench.peers import mamba_ssm_missing, transformers_peft
from ssmtune.bench.registry import Benchmark, register
from ssmtune.bench.train_step import MAMBA2_EXTRA, SHAPES, free_memory, ssmtune_config
from ssmtune.models.cache import decode_state_dtype

MODELS = ("mamba", "mamba2")
STATE_DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}
STATE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
STACKS = ("graph", "eager", "mamba_ssm", "transformers")


def build_ours(
    model: str,
    shape: str,
    n_adapters: int,
    device: torch.device,
    dtype: torch.dtype,
    adapter_dtype: str = "fp32",
    min_vocab: int = 0,
):
    """The base in ``dtype`` with ``n_adapters`` perturbed State-offset (h) adapters a0, a1, ...: in fp32 (as training
    and ``ssmtune eval`` hold them) or, ``adapter_dtype="model"``, cast to ``dtype`` (as ``ssmtune serve --precision
    bf16`` serves them)."""
    from ssmtune.core.peft_model import get_peft_model
    from ssmtune.methods import StateOffsetConfig
    from ssmtune.models import causal_lm_for

    torch.manual_seed(0)
    config = ssmtune_config(model, shape)
    config.vocab_size = max(config.vocab_size, min_vocab)  # the eval rows' byte tokenizer on the tiny shape
    base = causal_lm_for(config).to(device=device, dtype=dtype).eval()
    peft = get_peft_model(base, StateOffsetConfig(), adapter_name="a0")
    for i in range(1, n_adapters):
        peft.add_adapter(f"a{i}", StateOffsetConfig())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "__state_offset" in name:  # every adapter's h', not only the trainable (active) one's
                p.add_(torch.randn(p.shape, generator=g).to(p) * 0.05)
    peft.set_adapter("a0")
    if adapter_dtype == "model":
        peft.to(dtype)
    return peft.eval()


def build_mamba_ssm(model: str, shape: str, device: torch.device, dtype: torch.dtype):
    from mamba_ssm.models.config_mamba import MambaConfig as MSConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    s = SHAPES[shape]
    if model == "mamba":
        ssm_cfg = {"layer": "Mamba1"}
    else:
        e = MAMBA2_EXTRA[shape]
        ssm_cfg = {"layer": "Mamba2", "headdim": e["headdim"], "d_state": e["d_state"]}
    cfg = MSConfig(d_model=s["d_model"], n_layer=s["n_layer"], vocab_size=s["vocab_size"], ssm_cfg=ssm_cfg)
    torch.manual_seed(0)
    return MambaLMHeadModel(cfg, device=device, dtype=dtype).eval()


def build_transformers(model: str, shape: str, device: torch.device, dtype: torch.dtype):
    import transformers

    s = SHAPES[shape]
    common = {"vocab_size": s["vocab_size"], "hidden_size": s["d_model"], "num_hidden_layers": s["n_layer"],
              "expand": 2, "conv_kernel": 4, "use_cache": True, "tie_word_embeddings": True}  # fmt: skip
    if model == "mamba":
        cfg, klass = transformers.MambaConfig(state_size=16, **common), transformers.MambaForCausalLM
    else:
        e = MAMBA2_EXTRA[shape]
        cfg = transformers.Mamba2Config(num_heads=2 * s["d_model"] // e["headdim"], head_dim=e["headdim"],
                                        state_size=e["d_state"], n_groups=1, **common)  # fmt: skip
        klass = transformers.Mamba2ForCausalLM
    torch.manual_seed(0)
    with torch.device(device):
        m = klass(cfg)
    return m.to(dtype=dtype).eval()


def generator_fn(
    stack: str, m, ids: torch.Tensor, names: list[str] | None, beams: int = 1, state_dtype: torch.dtype | None = None
) -> Callable[[int], torch.Tensor]:
    """``fn(n)``: greedy (or beam search) generate of n tokens after ``ids`` on the stack's model (``state_dtype``:
    ssmtune's decode states)."""
    length = ids.shape[1]
    if stack in ("graph", "eager"):
        cg = None if stack == "graph" else False
        return lambda n: m.generate(ids, max_new_tokens=n, num_beams=beams, cuda_graph=cg, adapter_names=names,
                                    state_dtype=state_dtype)  # fmt: skip
    if stack == "mamba_ssm":
        return lambda n: m.generate(ids, max_length=length + n, cg=True, top_k=1)
    mask = torch.ones_like(ids)
    return lambda n: m.generate(
        ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, num_beams=beams
    )


def time_generate(fn: Callable[[int], torch.Tensor], n: int, repeats: int, device: torch.device) -> tuple[float, float]:
    """Median seconds of fn(n) and of fn(1), after one untimed fn(n) (the longer first: peers size caches by it)."""
    with torch.inference_mode():
        fn(n)
        fn(1)
        t_n, t_1 = [], []
        for _ in range(repeats):
            for k, out in ((n, t_n), (1, t_1)):
                sync(device)
                t0 = time.perf_counter()
                fn(k)
                sync(device)
                out.append(time.perf_counter() - t0)
    return statistics.median(t_n), statistics.median(t_1)


def check(
    peft, ids: torch.Tensor, names: list[str] | None, beams: int = 1, state_dtype: torch.dtype | None = None
) -> None:
    kw = {"max_new_tokens": 16, "adapter_names": names, "num_beams": beams, "state_dtype": state_dtype}
    with torch.inference_mode():
        eager = peft.generate(ids, cuda_graph=False, **kw)
        graph = peft.generate(ids, cuda_graph=None if ids.is_cuda else True, **kw)
    if not torch.equal(eager, graph):
        same = (eager == graph).float().mean().item()
        raise CheckFailed(f"graphed decoding differs from eager decoding ({same:.1%} of the tokens agree)")


def unavailable(stack: str, device: torch.device, beams: int = 1) -> str | None:
    """Why ``stack`` cannot decode here (None: it can)."""
    if stack == "mamba_ssm":
        return "no beam search" if beams > 1 else mamba_ssm_missing() if device.type == "cuda" else "needs CUDA"
    if stack == "transformers":
        return transformers_peft()[1] if transformers_peft()[0] is None else None
    return None


OURS = ("graph", "eager")  # ssmtune's stacks; the others are the peers, which decode the bare model


@dataclass
class Case:
    """One (model, stack, batch, adapter mix) of a decode benchmark (``cases``)."""

    model: str
    stack: str
    batch: int
    mix: str  # the row's label: "1 adapter", "N adapters", ... ("bare" for the peers)
    names: list[str] | None  # the rows' adapter_names
    ids: torch.Tensor  # [batch, prompt_len] prompts, on the device
    why: str | None  # why the stack cannot decode here; None: it can
    lm: Callable[[], object]  # the stack's model: ssmtune's, or the peer's, built at the first call (which can fail)


def cases(
    models: list[str],
    stacks: list[str],
    batches: list[int],
    mixes: Callable[[str, int], list[tuple[str, list[str] | None]]],
    *,
    shape: str,
    device: torch.device,
    dtype: torch.dtype,
    prompt_len: int,
    n_adapters: int,
    adapter_dtype: str = "fp32",
    beams: int = 1,
    on_model: Callable[[str, object], None] | None = None,
) -> Iterator[Case]:
    """The decode loop the ``decode`` and ``profile --workload decode`` benchmarks share: per model (ssmtune's built
    with ``n_adapters`` adapters, ``on_model(model, peft)`` called before its rows), stack and batch (prompts seeded by
    the batch size), one ``Case`` per ``mixes(stack, batch)`` entry of ssmtune's stacks and a "bare" one of a peer's.
    A model and its peers are freed before the next model is built."""
    vocab = SHAPES[shape]["vocab_size"]
    missing = {stack: unavailable(stack, device, beams) for stack in stacks}
    for model in models:
        peft = build_ours(model, shape, n_adapters, device, dtype, adapter_dtype)
        if on_model is not None:
            on_model(model, peft)
        peers: dict = {}

        def lm(stack: str, model: str = model, peft=peft, peers: dict = peers):
            if stack in OURS:
                return peft
            if stack not in peers:
                peers[stack] = (build_mamba_ssm if stack == "mamba_ssm" else build_transformers)(
                    model, shape, device, dtype
                )
            return peers[stack]

        for stack in stacks:
            for batch in batches:
                ids = torch.randint(1, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(batch))
                ids = ids.to(device)
                for mix, names in mixes(stack, batch) if stack in OURS else [("bare", None)]:
                    yield Case(model, stack, batch, mix, names, ids, missing[stack], functools.partial(lm, stack))
        del peers, peft, lm
        free_memory(device)


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--small", action="store_true", help="tiny shape (d_model 64, 2 layers, vocab 256): a CPU test")
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--stacks", nargs="+", choices=STACKS, default=list(STACKS))
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="rows per generate (default 1 16 64)")
    ap.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 128)")
    ap.add_argument("--new-tokens", type=int, default=None, help="generated tokens (default 128)")
    ap.add_argument("--adapters", type=int, default=None, help="State-offset adapters of the mixed rows (default 16)")
    ap.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (default 1: greedy)")
    ap.add_argument(
        "--state-dtype",
        choices=tuple(STATE_DTYPES),
        default="auto",
        help="dtype of ssmtune's decode states (default auto: the model's dtype, bf16 on CUDA, as the peers keep)",
    )
    ap.add_argument(
        "--adapter-dtype",
        choices=("fp32", "model"),
        default="fp32",
        help="ssmtune's adapters in fp32 (default: as training and eval hold them) or the model's dtype (as served)",
    )
    ap.add_argument(
        "--adapter-layout",
        choices=("interleaved", "blocked", "both"),
        default="interleaved",
        help="rows of the N-adapter batches: r -> adapter r mod N (default), blocks of consecutive rows, or both",
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--eval-examples", type=int, default=0, help="also time `ssmtune eval` on N generation examples")
    ap.add_argument("--eval-beams", type=int, default=5, help="beams of the eval rows (default 5, as ssmtune eval)")


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    shape = "tiny" if args.small else "130m"
    batches = args.batches or ([1, 4] if args.small else [1, 16, 64])
    prompt_len = args.prompt_len or (8 if args.small else 128)
    new = args.new_tokens or (8 if args.small else 128)
    n_adapters = args.adapters or (4 if args.small else 16)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vocab = SHAPES[shape]["vocab_size"]
    beams = args.num_beams
    state_dtype = STATE_DTYPES[getattr(args, "state_dtype", "auto")]
    adapter_dtype = getattr(args, "adapter_dtype", "fp32")
    layout = getattr(args, "adapter_layout", "interleaved")
    rows = []
    state_name = "fp32"

    def checked(model: str, peft) -> None:  # before a model's rows: its graphed and eager decoding agree
        nonlocal state_name
        state_name = STATE_NAMES[decode_state_dtype(peft, state_dtype)]
        ids0 = torch.randint(1, vocab, (batches[0], prompt_len), generator=torch.Generator().manual_seed(0))
        mixed0 = [f"a{r % n_adapters}" for r in range(batches[0])] if batches[0] >= n_adapters else None
        check(peft, ids0.to(device), mixed0, beams, state_dtype)

    def mixes(stack: str, batch: int) -> list[tuple[str, list[str] | None]]:
        return [("1 adapter", None), *(adapter_mixes(n_adapters, batch, layout) if batch >= n_adapters > 1 else [])]

    runs = cases(args.models, args.stacks, batches, mixes, shape=shape, device=device, dtype=dtype,
                 prompt_len=prompt_len, n_adapters=n_adapters, adapter_dtype=adapter_dtype, beams=beams,
                 on_model=checked)  # fmt: skip
    for case in runs:
        model, stack, batch, mix = case.model, case.stack, case.batch, case.mix
        row = {"model": model, "stack": stack, "batch": batch, "adapters": mix, "prompt_len": prompt_len,
               "new_tokens": new, "num_beams": beams, "dtype": str(dtype).removeprefix("torch."),
               "adapter_dtype": adapter_dtype if stack in OURS else None,
               "state_dtype": state_name if stack in OURS else str(dtype).removeprefix("torch.")}  # fmt: skip
        rows.append(row)
        if case.why is not None:
            row["status"] = f"unavailable: {case.why}"
            continue
        try:
            fn = generator_fn(stack, case.lm(), case.ids, case.names, beams, state_dtype)
            t_n, t_1 = time_generate(fn, new, args.repeats, device)
            row.update(status="ok", s_new=t_n, s_one=t_1, e2e_tok_s=batch * new / t_n)
            row["decode_tok_s"] = batch * (new - 1) / (t_n - t_1) if t_n > t_1 else None
        except Exception as e:  # noqa: BLE001 - a peer's failure is a row, not the end of the run
            row["status"] = f"error: {error_text(e)}"
            row["detail"] = traceback.format_exc()[-600:]
        print(f"decode: {model} {stack} batch {batch} {mix}: {row.get('decode_tok_s') or row['status']}",
              file=sys.stderr, flush=True)  # fmt: skip
        if getattr(args, "report_partial", None) is not None:
            args.report_partial({"rows": rows})
    result = {"rows": rows, "state_dtype": state_name, "table": table(rows)}
    if getattr(args, "eval_examples", 0):
        result["eval"] = [eval_row(m, shape, device, dtype, args.eval_examples, args.eval_beams, new, prompt_len)
                          for m in args.models]  # fmt: skip
        result["table"] += "\n\n" + eval_table(result["eval"])
    return result


def eval_row(model: str, shape: str, device: torch.device, dtype: torch.dtype, n: int, beams: int, new: int,
             prompt_len: int) -> dict:  # fmt: skip
    """``ssmtune eval`` on ``n`` generation examples, graphed against eager: seconds and the ratio."""
    import json
    import random
    import tempfile

    from ssmtune.data import TaskConfig
    from ssmtune.eval.evaluate import EvalConfig, evaluate
    from ssmtune.tokenizer import ByteTokenizer

    rng = random.Random(0)
    word = lambda: "".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 8)))
    row: dict = {"model": model, "examples": n, "num_beams": beams, "new_tokens": new}
    tokenizer = ByteTokenizer()
    peft = build_ours(model, shape, 1, device, dtype, min_vocab=tokenizer.vocab_size)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            with open(f"{tmp}/validation.jsonl", "w") as f:
                for _ in range(n + 1):
                    text = " ".join(word() for _ in range(prompt_len))[:prompt_len]
                    f.write(json.dumps({"input": text, "target": " ".join(word() for _ in range(8))}) + "\n")
            task = TaskConfig(task="jsonl", data_dir=tmp)
            preds = {}
            # today's eval (eager, one prompt at a time), graphed one at a time, and the default (graphed, prompts
            # in batches of EvalConfig.batch_size)
            for name, graph, batch in (("eager", False, 1), ("graph", None, 1), ("default", None, None)):
                cfg = {"num_beams": beams, "max_new_tokens": new, "cuda_graph": graph}
                if batch is not None:
                    cfg["batch_size"] = batch
                evaluate(peft, tokenizer, task, EvalConfig(max_examples=1, **cfg))  # compile, capture
                sync(device)
                t0 = time.perf_counter()
                out = evaluate(peft, tokenizer, task, EvalConfig(max_examples=n, **cfg), num_samples=n)
                sync(device)
                row[f"s_{name}"] = time.perf_counter() - t0
                preds[name] = [x["prediction"] for x in out["samples"]]
        if preds["graph"] != preds["eager"]:
            raise CheckFailed(f"eval: graphed and eager predictions differ: {preds['graph']} vs {preds['eager']}")
        # batches may round differently (GEMMs of another shape): counted, not required
        row["same_batched"] = sum(a == b for a, b in zip(preds["default"], preds["eager"]))
        row["batch_size"] = EvalConfig().batch_size
        row.update(
            status="ok", speedup=row["s_eager"] / row["s_graph"], speedup_default=row["s_eager"] / row["s_default"]
        )
    except CheckFailed:
        raise
    except Exception as e:  # noqa: BLE001 - one model's failure is a row
        row["status"] = f"error: {error_text(e)}"
    finally:
        del peft
        free_memory(device)
    print(f"decode: eval {model}: {row.get('speedup') or row['status']}", file=sys.stderr, flush=True)
    return row


def eval_table(rows: list[dict]) -> str:
    out = [[r["model"], r["examples"], r["num_beams"], r["new_tokens"], fmt(r.get("s_eager"), ".2f"),
            fmt(r.get("s_graph"), ".2f"), fmt(r.get("s_default"), ".2f"), fmt(r.get("speedup"), ".1f"),
            fmt(r.get("speedup_default"), ".1f"), f"{r['same_batched']}/{r['examples']}" if "same_batched" in r else "",
            "" if r["status"] == "ok" else r["status"][:80]] for r in rows]  # fmt: skip
    header = ["model", "eval examples", "beams", "new tokens", "eager 1-by-1 s", "graphed 1-by-1 s",
              "default s (graphed, batched)", "x eager (1-by-1)", "x eager (default)", "same as eager", "status"]  # fmt: skip
    return markdown(header, out)


def adapter_mixes(n: int, batch: int, layout: str) -> list[tuple[str, list[str]]]:
    """The N-adapter rows' (label, adapter_names) for ``--adapter-layout``."""
    out = []
    if layout in ("interleaved", "both"):
        out.append((f"{n} adapters", [f"a{r % n}" for r in range(batch)]))
    if layout in ("blocked", "both"):
        out.append((f"{n} adapters blocked", [f"a{r * n // batch}" for r in range(batch)]))
    return out


def table(rows: list[dict]) -> str:
    """One line per (model, batch, stack, adapters): tok/s, and the graphed 1-adapter row over each (x graph)."""
    ours = {(r["model"], r["batch"]): r for r in rows if r["stack"] == "graph" and r["adapters"] == "1 adapter"}
    out = []
    for r in sorted(rows, key=lambda r: (r["model"], r["batch"], STACKS.index(r["stack"]))):
        base = ours.get((r["model"], r["batch"]))
        dec = r.get("decode_tok_s")
        ratio = fmt(base["decode_tok_s"] / dec, ".2f") if base and base.get("decode_tok_s") and dec else ""
        status = "" if r.get("status") == "ok" else r.get("status", "not run")[:80]
        out.append([r["model"], r["batch"], r["stack"], r["adapters"], fmt(dec, ",.0f"), fmt(r.get("e2e_tok_s"), ",.0f"),
                    fmt(r.get("s_new"), ".3f"), ratio, status])  # fmt: skip
    header = ["model", "batch", "stack", "adapters", "decode tok/s", "e2e tok/s", "s / generate", "x graph", "status"]
    return markdown(header, out)


register(Benchmark("decode", "decode tokens/s: graphed vs eager generate, mamba_ssm generate(cg=True), transformers",
                   add_args, run))  # fmt: skip
