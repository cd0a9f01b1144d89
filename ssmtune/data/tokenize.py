"""Tokenised datasets, padding collate and a resumable, deterministic batch sampler.

Sequences are `input ⧺ target` (+ EOS for generation tasks). `labels` are aligned with `input_ids` (not shifted):
the loss shifts by one, as HF causal LMs do, so the logits at position t - 1 predict `labels[t]`. Input positions
(the prompt) are -100. Batches are right-padded with the pad id (labels with -100) and carry an attention mask.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ssmtune.tokenizer import Tokenizer

IGNORE_INDEX = -100
logger = logging.getLogger(__name__)


@dataclass
class TokenizeStats:
    """What tokenisation did to a split; `summary()` is a one-line report."""

    num_examples: int = 0
    """Examples given."""
    num_kept: int = 0
    """Examples in the dataset."""
    num_truncated: int = 0
    """Kept examples whose input was cut from the left to fit `max_length`."""
    num_dropped_filter: int = 0
    """Examples removed by the reference-style `length_filter`."""
    num_dropped_too_long: int = 0
    """Examples whose target alone does not fit `max_length` (targets are never cut)."""

    def summary(self) -> str:
        return (
            f"{self.num_kept}/{self.num_examples} examples kept; {self.num_truncated} truncated (left), "
            f"{self.num_dropped_filter} dropped by the length filter, "
            f"{self.num_dropped_too_long} dropped because the target does not fit"
        )


class TokenizedDataset(Dataset):
    """Token ids of a list of examples.

    Each item: `input_ids` and `labels` (lists of the same length), `prompt_length` (number of input tokens; the
    generation prompt is `input_ids[:prompt_length]`) and `example_index` (position in `examples`).
    """

    def __init__(self, items: list[dict], examples: list[dict], *, pad_token_id: int, stats: TokenizeStats) -> None:
        self.items = items
        self.examples = examples
        self.pad_token_id = pad_token_id
        self.stats = stats

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx: int) -> dict:
        return self.items[idx]

    def example(self, idx: int) -> dict:
        """The source example of item `idx` (references, label, db_id, ...)."""
        return self.examples[self.items[idx]["example_index"]]


def tokenize_examples(
    examples: list[dict],
    tokenizer: Tokenizer,
    *,
    add_eos: bool,
    max_length: int | None = None,
    length_filter: int | None = None,
    keep_prefix: bool = False,
    encode_prefix_separately: bool = True,
) -> TokenizedDataset:
    """Tokenise examples into `input ⧺ target (+ EOS)` with labels masked on the input.

    Args:
        examples: dicts with `input`, `target` and optionally `prefix` (see `ssmtune.data.tasks`).
        tokenizer: any ssmtune tokenizer.
        add_eos: append EOS to the target (generation tasks); GLUE's digit labels take none.
        max_length: longest sequence in tokens. A longer example has its input cut from the left (the target is
            never cut); an example whose target (+ EOS) alone needs `max_length` tokens or more is dropped.
        length_filter: drop examples whose input without its prefix + target (+ EOS) exceed this many tokens, as
            the reference does for Spider (`max_seqlen=1536`; its count leaves the instruction prefix out).
        keep_prefix: when truncating, cut just after the instruction prefix instead of at the very start.
        encode_prefix_separately: tokenise `prefix` and the rest of the input separately and concatenate, as the
            reference code does (BPE merges never cross the boundary); a no-op for the byte tokenizer.
    """
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length!r}")
    stats = TokenizeStats(num_examples=len(examples))
    eos = [tokenizer.eos_token_id] if add_eos else []
    prefix_cache: dict[str, list[int]] = {}
    items = []
    for i, ex in enumerate(examples):
        for key in ("input", "target"):
            if key not in ex:
                raise ValueError(f"example {i} has no {key!r} field; its fields are {sorted(ex)}")
        text, prefix = ex["input"], ex.get("prefix") or ""
        if not (encode_prefix_separately and prefix and text.startswith(prefix)):
            prefix = ""
        if prefix not in prefix_cache:
            prefix_cache[prefix] = tokenizer.encode(prefix) if prefix else []
        prefix_ids = prefix_cache[prefix]
        body_ids = tokenizer.encode(text[len(prefix) :])
        target_ids = tokenizer.encode(ex["target"]) + eos
        if not target_ids:
            raise ValueError(f"example {i} has an empty target and no EOS, so it has nothing to learn")
        if length_filter is not None and len(body_ids) + len(target_ids) > length_filter:
            stats.num_dropped_filter += 1
            continue
        input_ids = prefix_ids + body_ids
        if max_length is not None and len(input_ids) + len(target_ids) > max_length:
            keep = max_length - len(target_ids)
            if keep < 1:
                stats.num_dropped_too_long += 1
                continue
            if keep_prefix and len(prefix_ids) < keep:
                input_ids = prefix_ids + body_ids[len(body_ids) - (keep - len(prefix_ids)) :]
            else:
                input_ids = input_ids[-keep:]
            stats.num_truncated += 1
        items.append(
            {
                "input_ids": input_ids + target_ids,
                "labels": [IGNORE_INDEX] * len(input_ids) + target_ids,
                "prompt_length": len(input_ids),
                "example_index": i,
            }
        )
    stats.num_kept = len(items)
    if stats.num_kept < stats.num_examples or stats.num_truncated:
        logger.warning("tokenisation: %s", stats.summary())
    return TokenizedDataset(items, examples, pad_token_id=tokenizer.pad_token_id, stats=stats)


class Collator:
    """Right-pads a list of items into `input_ids`, `labels`, `attention_mask` `[B, L]` plus per-row metadata."""

    def __init__(self, pad_token_id: int, *, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(it["input_ids"]) for it in items)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(items)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)  # [B, L]
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)  # [B, L]
        attention_mask = torch.zeros((batch, length), dtype=torch.long)  # [B, L]
        for b, it in enumerate(items):
            n = len(it["input_ids"])
            input_ids[b, :n] = torch.tensor(it["input_ids"], dtype=torch.long)
            labels[b, :n] = torch.tensor(it["labels"], dtype=torch.long)
            attention_mask[b, :n] = 1
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "prompt_lengths": torch.tensor([it["prompt_length"] for it in items], dtype=torch.long),  # [B]
            "example_index": torch.tensor([it["example_index"] for it in items], dtype=torch.long),  # [B]
        }


class PackingCollator:
    """Packs a list of items end to end into one ``[1, total]`` batch with ``cu_seqlens`` (int32 ``[n_seq + 1]``), for
    ``model(input_ids, cu_seqlens=...)``.

    Labels keep each example's mask, and each sequence's first label is ignored (no position predicts it; the model
    does the same for packed batches given to it directly), so the summed loss equals the unpacked one. An item longer than ``max_length`` is refused: tokenise with the same
    ``max_length`` (training inputs are cut from the left to fit it). ``token_mask`` [1, total] marks real tokens;
    ``prompt_lengths`` and ``example_index`` follow the items' order, not the packed one.

    ``pad_rows=True`` lays the items into rows of ``max_length`` tokens instead (first fit: each item into the first
    row with room for it), the rest of each row one padding sequence with ignored labels: a whole number of rows, the
    shape static kernels would need. Without such kernels the padding only costs: its tokens run through every layer.
    """

    def __init__(self, pad_token_id: int, max_length: int, *, pad_rows: bool = False) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 for packing, got {max_length!r}")
        self.pad_token_id = pad_token_id
        self.max_length = max_length
        self.pad_rows = pad_rows

    def rows(self, lengths: list[int]) -> list[list[int]]:
        """Item indices per row: first fit, each item into the first row with room for it (a new row when none)."""
        rows: list[list[int]] = []
        free: list[int] = []
        for i, n in enumerate(lengths):
            if n > self.max_length:
                raise ValueError(
                    f"packing: an example of {n} tokens does not fit a row of max_length={self.max_length}"
                )
            r = next((r for r, room in enumerate(free) if room >= n), len(rows))
            if r == len(rows):
                rows.append([])
                free.append(self.max_length)
            rows[r].append(i)
            free[r] -= n
        return rows

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        lengths = [len(it["input_ids"]) for it in items]
        rows = self.rows(lengths) if self.pad_rows else [list(range(len(items)))]
        if not self.pad_rows and max(lengths) > self.max_length:
            self.rows(lengths)  # the same refusal
        total = len(rows) * self.max_length if self.pad_rows else sum(lengths)
        input_ids = torch.full((1, total), self.pad_token_id, dtype=torch.long)
        labels = torch.full((1, total), IGNORE_INDEX, dtype=torch.long)
        token_mask = torch.zeros((1, total), dtype=torch.long)
        bounds, pos = [0], 0
        for r, row in enumerate(rows):
            for i in row:
                ids = items[i]["input_ids"]
                input_ids[0, pos : pos + len(ids)] = torch.tensor(ids, dtype=torch.long)
                labels[0, pos : pos + len(ids)] = torch.tensor(items[i]["labels"], dtype=torch.long)
                token_mask[0, pos : pos + len(ids)] = 1
                pos += len(ids)
                bounds.append(pos)
            end = (r + 1) * self.max_length
            if self.pad_rows and pos < end:  # the row's padding: a sequence of its own
                pos = end
                bounds.append(pos)
        # no position predicts a sequence's first token (the previous sequence's last one must not): as unpacked
        labels[0, bounds[:-1]] = IGNORE_INDEX
        return {
            "input_ids": input_ids,
            "labels": labels,
            "cu_seqlens": torch.tensor(bounds, dtype=torch.int32),
            "token_mask": token_mask,
            "prompt_lengths": torch.tensor([it["prompt_length"] for it in items], dtype=torch.long),  # [B]
            "example_index": torch.tensor([it["example_index"] for it in items], dtype=torch.long),  # [B]
        }


class PackedRowsCollator:
    """Lays a batch's items into ``rows`` packed rows of ``width`` tokens, the static-shape layout of ``resets``
    (``ssmtune.ops.RESET_ALIGN``, docs/training.md "Packed sequences").

    Each item sits in a *slot* that starts at a multiple of ``RESET_ALIGN`` (64) positions in its row: ``lead`` pad
    positions, the item's tokens, then pads up to the next slot start. Slots are placed first fit (each item into the
    first row with room for its slot, in the items' order). ``width`` is ``max_length + lead`` rounded up to 64, so an
    item of ``max_length`` tokens fills a row; a longer one is refused. ``lead`` (>= 1, default 3) must be at least
    the model's ``d_conv - 1``: the zeroed lead pads keep every conv window inside its sequence, and an initial conv
    state goes into the ``d_conv - 1`` of them right before the sequence.

    Returns ``input_ids``, ``attention_mask`` (0 at pads), ``labels`` (-100 at pads and at each item's first token:
    nothing before it may predict it, as in a separate run) [rows, width], ``resets`` (bool [rows, width / 64], True
    at each slot start) and the per-item ``prompt_lengths`` and ``example_index`` in the items' order. Items that need
    more than ``rows`` rows are refused: ``plan`` cuts a stream of items into batches that fit.
    """

    def __init__(self, pad_token_id: int, max_length: int, *, rows: int, lead: int = 3) -> None:
        from ssmtune.ops.varlen import RESET_ALIGN

        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 for packing, got {max_length!r}")
        if rows < 1:
            raise ValueError(f"rows must be >= 1, got {rows!r}")
        if lead < 1:
            raise ValueError(f"lead must be >= 1 (a pad before each sequence), got {lead!r}")
        self.pad_token_id, self.max_length, self.rows, self.lead = pad_token_id, max_length, rows, lead
        self.align = RESET_ALIGN
        self.width = self.slot(max_length)

    def slot(self, n: int) -> int:
        """Positions a slot of an ``n``-token item takes: lead pads + the tokens, rounded up to ``RESET_ALIGN``."""
        return -(-(self.lead + n) // self.align) * self.align

    def _fits(self, free: list[int], n: int) -> int | None:
        """The first row (an index into ``free``, a new one when there is room for it) that takes an ``n``-token
        item, or None when none does."""
        if n > self.max_length:
            raise ValueError(f"packing: an example of {n} tokens does not fit a row of max_length={self.max_length}")
        need = self.slot(n)
        r = next((r for r, room in enumerate(free) if room >= need), None)
        if r is None and len(free) < self.rows:
            free.append(self.width)
            r = len(free) - 1
        return r

    def plan(self, lengths: Sequence[int]) -> list[list[int]]:
        """A stream of item lengths cut into batches, each a list of positions into ``lengths``: items are taken in
        order, each into the first of the batch's ``rows`` rows with room for its slot; one that fits none closes
        the batch and opens the next. So each batch is the next run of consecutive positions (``loop.RowsSampler``
        keeps only where they start); the last batch may be less full."""
        batches: list[list[int]] = []
        cur: list[int] = []
        free: list[int] = []
        for i, n in enumerate(lengths):
            r = self._fits(free, n)
            if r is None:
                batches.append(cur)
                cur, free = [], []
                r = self._fits(free, n)
            free[r] -= self.slot(n)
            cur.append(i)
        if cur:
            batches.append(cur)
        return batches

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        rows, width = self.rows, self.width
        input_ids = torch.full((rows, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((rows, width), dtype=torch.long)
        resets = torch.zeros((rows, width // self.align), dtype=torch.bool)
        free: list[int] = []
        for it in items:
            n = len(it["input_ids"])
            r = self._fits(free, n)
            if r is None:
                tokens = sum(len(i["input_ids"]) for i in items)
                raise ValueError(f"packing: {len(items)} examples of {tokens} tokens do not fit {rows} rows of "
                                 f"{width} (plan() cuts a stream into batches)")  # fmt: skip
            start = width - free[r]
            free[r] -= self.slot(n)
            first = start + self.lead
            input_ids[r, first : first + n] = torch.tensor(it["input_ids"], dtype=torch.long)
            labels[r, first + 1 : first + n] = torch.tensor(it["labels"][1:], dtype=torch.long)
            attention_mask[r, first : first + n] = 1
            resets[r, start // self.align] = True
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "resets": resets,
            "prompt_lengths": torch.tensor([it["prompt_length"] for it in items], dtype=torch.long),  # [n_items]
            "example_index": torch.tensor([it["example_index"] for it in items], dtype=torch.long),  # [n_items]
        }


class ResumableBatchSampler(Sampler[list[int]]):
    """Batches of indices in an order fixed by (seed, epoch), resumable from any (epoch, index) position.

    Epoch e's order is `torch.randperm(n)` from a Generator seeded with `seed * 1_000_003 + e` (identity order
    when `shuffle=False`). `index` counts the samples of the current epoch already handed out; iterating to the
    end of an epoch advances `epoch` and resets `index`. `state_dict()` is exact for `num_workers=0` DataLoaders
    (batches are drawn one at a time); with workers that prefetch, save `{"epoch": e, "index": steps * batch_size}`
    from the training loop's own count instead.
    """

    def __init__(
        self, num_examples: int, batch_size: int, *, shuffle: bool = True, seed: int = 0, drop_last: bool = True
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        if num_examples < 1:
            raise ValueError(f"num_examples must be >= 1, got {num_examples!r}")
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.index = 0

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_examples))
        gen = torch.Generator()
        gen.manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
        return torch.randperm(self.num_examples, generator=gen).tolist()

    def _end(self) -> int:
        if self.drop_last:
            return self.num_examples - self.num_examples % self.batch_size
        return self.num_examples

    def __iter__(self):
        order = self.order(self.epoch)
        end = self._end()
        while self.index < end:
            batch = order[self.index : min(self.index + self.batch_size, end)]
            self.index += len(batch)
            yield batch
        self.epoch += 1
        self.index = 0

    def __len__(self) -> int:
        """Batches in a full epoch."""
        if self.drop_last:
            return self.num_examples // self.batch_size
        return (self.num_examples + self.batch_size - 1) // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.index = epoch, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, index = int(state["epoch"]), int(state["index"])
        if not 0 <= index <= self.num_examples:
            raise ValueError(f"sampler index must lie in [0, {self.num_examples}], got {index!r}")
        self.epoch, self.index = epoch, index


def make_dataloader(
    tokenized: TokenizedDataset,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = True,
    num_workers: int = 0,
    pad_to_multiple_of: int | None = None,
) -> DataLoader:
    """A DataLoader over a tokenised dataset; its `batch_sampler` is a `ResumableBatchSampler`.

    Training follows the reference (shuffled, last incomplete batch dropped); for evaluation pass
    `shuffle=False, drop_last=False`.
    """
    sampler = ResumableBatchSampler(len(tokenized), batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last)
    collate = Collator(tokenized.pad_token_id, pad_to_multiple_of=pad_to_multiple_of)
    return DataLoader(tokenized, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers)
