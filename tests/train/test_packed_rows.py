"""Packed rows (``resets``): the collator's layout and batch plan, the training loop's batches and graph decision."""

from __future__ import annotations

import pytest

from ssmtune.data import PackedRowsCollator
from ssmtune.models.lm import IGNORE_INDEX


def _items(lengths: list[int]) -> list[dict]:
    return [{"input_ids": [10 + i] * n, "labels": [IGNORE_INDEX] + [20 + i] * (n - 1), "prompt_length": 1,
             "example_index": i} for i, n in enumerate(lengths)]  # fmt: skip


def test_collator_layout():
    col = PackedRowsCollator(0, 100, rows=2, lead=3)
    assert col.width == 128 and col.slot(61) == 64 and col.slot(62) == 128
    out = col(_items([61, 10, 100]))
    # first fit: row 0 = [61 in 0..63, 10 in 64..127], row 1 = [100 in 0..127]
    assert out["input_ids"].shape == (2, 128) and out["resets"].shape == (2, 2)
    assert out["resets"].tolist() == [[True, True], [True, False]]
    assert out["input_ids"].shape == out["labels"].shape == out["attention_mask"].shape
    mask = out["attention_mask"]
    assert mask[0, :3].sum() == 0 and mask[0, 3:64].all() and mask[0, 64:67].sum() == 0 and mask[0, 67:77].all()
    assert mask[0, 77:].sum() == 0 and mask[1, 3:103].all() and int(mask.sum()) == 171
    assert (out["input_ids"][0, 67:77] == 11).all() and (out["input_ids"][mask == 0] == 0).all()
    labels = out["labels"]
    assert (labels[mask == 0] == IGNORE_INDEX).all()
    # no position predicts an item's first token (the previous item's pad, or its last token, must not)
    assert labels[0, 3] == labels[0, 67] == labels[1, 3] == IGNORE_INDEX
    assert (labels[0, 68:77] == 21).all() and (labels[1, 4:103] == 22).all()
    assert out["example_index"].tolist() == [0, 1, 2] and out["prompt_lengths"].tolist() == [1, 1, 1]


def test_collator_refusals():
    col = PackedRowsCollator(0, 100, rows=2)
    with pytest.raises(ValueError, match="example of 101 tokens does not fit a row of max_length=100"):
        col(_items([101]))
    with pytest.raises(ValueError, match="do not fit 2 rows of 128"):
        col(_items([100, 100, 100]))
    with pytest.raises(ValueError, match="example of 101 tokens"):
        col.plan([3, 101])
    for kw in ({"rows": 0}, {"rows": 1, "lead": 0}):
        with pytest.raises(ValueError, match="must be >= 1"):
            PackedRowsCollator(0, 100, **kw)


def test_plan_covers_the_stream_in_order():
    col = PackedRowsCollator(0, 100, rows=2)
    lengths = [61, 10, 100, 5, 100, 100, 3, 40]
    plan = col.plan(lengths)
    assert plan == [[0, 1, 2], [3, 4], [5, 6, 7]]
    assert [i for b in plan for i in b] == list(range(len(lengths)))
    for batch in plan:  # every planned batch collates
        col(_items([lengths[i] for i in batch]))
