"""Training on packed batches (``--data.packing true``) against padded batches of the same, length-skewed data.

Data: ``--examples`` random token sequences whose lengths are log-uniform in [``--min-len``, ``--max-len``] (32..2048;
``--small``: 8..128), the last quarter of each a target. The cu_seqlens stacks train on the same batches of
``--batch-size`` examples in the same order: ``padded`` right-pads each batch to its longest example (``Collator``,
attention mask), ``packed`` lays the batch end to end (``PackingCollator``, ``cu_seqlens``, what
``--data.packing_layout cu_seqlens`` does), ``packed rows`` into rows of ``--max-len`` tokens whose padding is a
sequence of its own (``pad_rows=True``). Their ops scan the sequences in buckets of similar lengths
(``ssmtune/ops/varlen.py``), chosen at a cost of ``BUCKET_OVERHEAD_TOKENS`` row-tokens of padding per bucket;
``--bucket-tokens N [N ...]`` times both at each value (default: the library's), as ``packed (bucket N)`` and
``packed rows (bucket N)``, beside the one padded stack.

``rows (resets)`` is what ``--data.packing true`` does now (``PackedRowsCollator``): each step is ``--batch-size``
rows of ``--max-len`` + 3 tokens (rounded up to 64) filled first fit from the same example stream, each example in a
slot that restarts the scan (``resets``), so a step holds as many examples as fit. ``rows (resets, graphed)`` replays
the same step from a CUDA graph through the loop's ``GraphedTrainStep`` (CUDA only; skipped with a note on the CPU).
The rows stacks run the scans' backends that take ``resets`` (``ops.RESETS_BACKENDS``).

One step = forward (bf16 autocast on CUDA) + summed target-token cross-entropy over the batch's targets + backward +
AdamW step on a State-offset (h) adapter of a random Mamba-2 (``--arch mamba`` for Mamba-1): d_model 768, 24 layers
(130m shape), or d_model 64, 2 layers with ``--small``. Reported: real (unpadded) tokens per second over ``--steps``
timed steps after ``--warmup`` untimed ones (the stacks take turns per batch; each step's fastest of ``--repeats``
passes counts), the real tokens over those computed (the projections' work) and over those scanned (Σ rows ×
width of the scans' buckets), and each packed stack's rate over padded. Check first: the fp32 losses on the first
batch, padded and packed at each ``--bucket-tokens`` value, agree, and so do the first rows batch's and its examples'
padded.

GPU:  ssmtune bench packing
Bucket sweep:  ssmtune bench packing --bucket-tokens 0 2048 8192 32768
CPU smoke test:  ssmtune bench packing --device cpu --small
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time

import torch

from ssmtune.bench.common import check_close, markdown, sync
from ssmtune.bench.registry import Benchmark, register
from ssmtune.ops import varlen

SHAPES = {"full": {"d_model": 768, "n_layer": 24, "vocab_size": 50280}, "small": {"d_model": 64, "n_layer": 2,
                                                                                  "vocab_size": 264}}  # fmt: skip
TARGET = 2.0  # packed tokens/s over padded, on the full-size data


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--small", action="store_true", help="tiny model, lengths 8..128 (CPU smoke test)")
    ap.add_argument("--arch", choices=["mamba", "mamba2"], default="mamba2")
    ap.add_argument("--examples", type=int, default=None, help="default 256 (small: 32)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--min-len", type=int, default=None, help="default 32 (small: 8)")
    ap.add_argument("--max-len", type=int, default=None, help="default 2048 (small: 128); also the packed row length")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per stack (default 8, small 3)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed passes; each step's fastest is kept")
    ap.add_argument("--bucket-tokens", type=int, nargs="+", default=None, metavar="N",
                    help="ssmtune.ops.varlen.BUCKET_OVERHEAD_TOKENS values to time the packed stacks at, one pair of "
                    f"rows each (default: the library's, {varlen.BUCKET_OVERHEAD_TOKENS}); 0: one bucket per length, "
                    "huge: one bucket")  # fmt: skip


def skewed_items(n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> list[dict]:
    """Tokenised examples with log-uniform lengths in [lo, hi] (many short, few long)."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        length = int(math.exp(math.log(lo) + torch.rand(1, generator=g).item() * (math.log(hi) - math.log(lo))))
        ids = torch.randint(0, vocab, (length,), generator=g).tolist()
        n_target = max(1, length // 4)
        labels = [-100] * (length - n_target) + ids[length - n_target :]
        items.append({"input_ids": ids, "labels": labels, "prompt_length": length - n_target, "example_index": i})
    return items


def build(args: argparse.Namespace, shape: dict):
    from ssmtune.core.peft_model import get_peft_model
    from ssmtune.methods import StateOffsetConfig
    from ssmtune.models import Mamba2Config, MambaConfig, causal_lm_for

    torch.manual_seed(0)
    config = (Mamba2Config if args.arch == "mamba2" else MambaConfig)(**shape)
    return get_peft_model(causal_lm_for(config).to(args.device), StateOffsetConfig())


def loss_of(model, batch: dict, device, autocast: bool) -> torch.Tensor:
    from ssmtune.models.lm import count_targets, token_loss_sum

    ids = batch["input_ids"].to(device)
    kw = {k: batch[k].to(device) for k in ("cu_seqlens", "resets") if k in batch}
    mask = batch.get("attention_mask")
    labels = batch["labels"].to(device)
    if "cu_seqlens" in batch:  # the model's own labels: each sequence's first label ignored, as unpacked
        from ssmtune.models.lm import packed_labels

        labels = packed_labels(labels, kw["cu_seqlens"], model.base_model.input_hooks)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(ids, attention_mask=None if mask is None else mask.to(device), **kw).logits
    return token_loss_sum(logits, labels) / count_targets(batch["labels"])


def scanned_tokens(batch: dict, value: int | None) -> int:
    """Row-tokens each scan runs on: the padded batch, or a packed batch's buckets at ``value``."""
    if "cu_seqlens" not in batch:
        return batch["input_ids"].numel()
    lens = batch["cu_seqlens"].diff().tolist()
    return sum(len(g) * lens[g[0]] for g in varlen._groups(lens, value))  # a group's longest comes first


@contextlib.contextmanager
def bucket_tokens(value: int | None):
    """``varlen.BUCKET_OVERHEAD_TOKENS`` set to ``value`` (None: left as it is) inside the block; the ops read it at
    call time."""
    old = varlen.BUCKET_OVERHEAD_TOKENS
    varlen.BUCKET_OVERHEAD_TOKENS = old if value is None else value
    try:
        yield
    finally:
        varlen.BUCKET_OVERHEAD_TOKENS = old


def graphed_step(model, opt, rows: int, width: int):
    """The training loop's captured step (``GraphedTrainStep``, as ``fit`` builds it, without clipping):
    ``step(batch)`` replays forward, loss, backward and AdamW on a batch of packed rows."""
    from ssmtune.models.lm import IGNORE_INDEX, count_targets, token_loss_sum
    from ssmtune.train.graphs import GraphedTrainStep
    from ssmtune.train.optim import set_capturable

    set_capturable(opt, True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    graphed = GraphedTrainStep(model, opt, trainable, rows=rows, length=width, clip=math.inf,
                               autocast_dtype=torch.bfloat16, loss_fn=token_loss_sum,
                               ignore_index=IGNORE_INDEX)  # fmt: skip

    def step(batch: dict) -> None:
        tensors = {k: batch[k] for k in ("input_ids", "labels", "attention_mask", "resets")}
        graphed(tensors, count_targets(batch["labels"]))

    return step


def run(args: argparse.Namespace) -> dict:
    from ssmtune.data import Collator, PackedRowsCollator, PackingCollator
    from ssmtune.train.optim import build_optimizer

    device = torch.device(args.device)
    small = args.small
    shape = SHAPES["small" if small else "full"]
    lo = args.min_len or (8 if small else 32)
    hi = args.max_len or (128 if small else 2048)
    n = args.examples or (32 if small else 256)
    steps = args.steps or (3 if small else 8)
    items = skewed_items(n, lo, hi, shape["vocab_size"])
    batches = [items[i : i + args.batch_size] for i in range(0, n - args.batch_size + 1, args.batch_size)]
    values = args.bucket_tokens or [varlen.BUCKET_OVERHEAD_TOKENS]
    if min(values) < 0:
        raise ValueError(f"--bucket-tokens must be >= 0, got {min(values)}")
    # packed rows: --batch-size rows a step, as many examples as fit (the training loop's batches)
    by_rows = PackedRowsCollator(0, hi, rows=args.batch_size)
    row_batches = [[items[i] for i in b] for b in by_rows.plan([len(it["input_ids"]) for it in items])]
    # stack name -> (collator, bucket overhead or None, its batches of items); the packed stacks of every bucket value
    # share two collators
    packed, rows = PackingCollator(0, hi), PackingCollator(0, hi, pad_rows=True)
    collators = {"padded": (Collator(0), None, batches)}
    for v in dict.fromkeys(values):
        collators[f"packed (bucket {v})"] = (packed, v, batches)
        collators[f"packed rows (bucket {v})"] = (rows, v, batches)
    collators["rows (resets)"] = (by_rows, None, row_batches)
    notes = []
    if device.type == "cuda":
        collators["rows (resets, graphed)"] = (by_rows, None, row_batches)
    else:
        notes.append("rows (resets, graphed): skipped, CUDA graphs need a CUDA device")
    if device.type == "cuda" and args.repeats < 2:
        # padded and bucketed batches change shape from batch to batch: a first pass over them compiles kernels (the
        # SSD kernels once per chunk count), which only a later pass leaves out of the fastest time
        notes.append(f"--repeats {args.repeats}: the padded and bucketed stacks' times include Triton compilations; "
                     "use 2 or more")  # fmt: skip
    model = build(args, shape)

    errs = []
    with torch.no_grad():  # the check: the first batch's fp32 loss, padded and packed at each bucket value
        ref = loss_of(model, collators["padded"][0](batches[0]), device, autocast=False)
        for name, (collate, v, _) in collators.items():
            if v is not None and not name.startswith("packed rows"):
                with bucket_tokens(v):
                    out = loss_of(model, collate(batches[0]), device, autocast=False)
                errs.append(check_close(f"{name} loss", [ref.reshape(1)], [out.reshape(1)], 1e-4))
        # packed rows: the first rows batch against its examples padded
        ref = loss_of(model, Collator(0)(row_batches[0]), device, autocast=False)
        out = loss_of(model, by_rows(row_batches[0]), device, autocast=False)
        errs.append(check_close("rows (resets) loss", [ref.reshape(1)], [out.reshape(1)], 1e-4))

    autocast = device.type == "cuda"
    stacks, collated = {}, {}  # each collator's batches, collated once
    for name, (collate, v, items_of) in collators.items():
        model = build(args, shape)
        opt = build_optimizer(model, lr=1e-4, weight_decay=0.0)
        if id(collate) not in collated:
            collated[id(collate)] = [collate(b) for b in items_of]
        graphed = graphed_step(model, opt, args.batch_size, by_rows.width) if name.endswith("graphed)") else None
        stacks[name] = (model, opt, collated[id(collate)], v, graphed, items_of)

    def step(name: str, i: int) -> float:
        model, opt, collated, v, graphed, _ = stacks[name]
        batch = collated[i % len(collated)]
        with bucket_tokens(v):
            sync(device)
            t0 = time.perf_counter()
            if graphed is not None:
                graphed(batch)
            else:
                loss_of(model, batch, device, autocast).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            sync(device)
            return time.perf_counter() - t0

    for i in range(args.warmup):
        for name in stacks:
            step(name, i)
    # the stacks take turns on each batch, and each (stack, batch) keeps its fastest of --repeats: on a shared host
    # the load then hits every stack alike
    best = {name: [math.inf] * steps for name in stacks}
    for _ in range(args.repeats):
        for j in range(steps):
            for name in stacks:
                best[name][j] = min(best[name][j], step(name, args.warmup + j))
    rows, table, rate = [], [], {}
    for name, (_, _, collated, v, _, items_of) in stacks.items():
        idx = [i % len(items_of) for i in range(args.warmup, args.warmup + steps)]
        real = sum(sum(len(it["input_ids"]) for it in items_of[i]) for i in idx)
        seconds = sum(best[name])
        done = sum(collated[i]["input_ids"].numel() for i in idx)
        scanned = sum(scanned_tokens(collated[i], v) for i in idx)
        rate[name] = real / seconds
        rows.append({"stack": name, "bucket_tokens": v, "tokens_per_s": rate[name], "ms_step": seconds / steps * 1e3,
                     "real_tokens": real, "computed_tokens": done, "scanned_tokens": scanned})  # fmt: skip
        table.append([name, f"{rate[name]:.0f}", f"{seconds / steps * 1e3:.1f}", f"{real / done:.2f}",
                      f"{real / scanned:.2f}"])  # fmt: skip
    ratios = {}
    for name in stacks:
        if name != "padded":
            ratios[name] = rate[name] / rate["padded"]
            table.append([f"{name} / padded", f"{ratios[name]:.2f}", "", "", ""])
    header = ["stack", "real tokens/s", "ms/step", "real / computed tokens", "real / scanned tokens"]
    text = markdown(header, table) + "".join(f"\n{note}" for note in notes)
    return {"rows": rows, "over_padded": ratios, "target": TARGET, "check_rel_err": max(errs), "notes": notes,
            "lengths": [lo, hi], "table": text}  # fmt: skip


register(Benchmark("packing", "training on packed batches (cu_seqlens, packed rows with resets) against padded "
                   "batches, lengths 32..2048", add_args, run))  # fmt: skip
