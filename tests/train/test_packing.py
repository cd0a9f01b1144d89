"""``--data.packing``: the packing collator, and packed training steps equal padded ones (losses and weights)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "methods"))
from _peft_cases import tiny_model

from ssmtune import InitialStateConfig, StateOffsetConfig, get_peft_model
from ssmtune.data import Collator, PackingCollator
from ssmtune.models.lm import IGNORE_INDEX
from ssmtune.train import TrainConfig, fit


def items(n: int = 12, seed: int = 0, max_len: int = 20) -> list[dict]:
    """Tokenised examples of 2..max_len tokens (the TokenizedDataset item format); the last 1-3 tokens are targets."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(2, max_len + 1, (1,), generator=g))
        ids = torch.randint(1, 37, (length,), generator=g).tolist()
        n_target = min(length - 1, 1 + i % 3)
        labels = [IGNORE_INDEX] * (length - n_target) + ids[length - n_target :]
        out.append({"input_ids": ids, "labels": labels, "prompt_length": length - n_target, "example_index": i})
    return out


def test_rows_and_cu_seqlens():
    batch = [{"input_ids": [1] * n, "labels": [5] * n, "prompt_length": 0, "example_index": i}
             for i, n in enumerate([3, 4, 2, 6, 1])]  # fmt: skip
    out = PackingCollator(0, 8, pad_rows=True)(batch)
    # first fit: rows [3, 4, 1] [2, 6]
    assert out["input_ids"].shape == (1, 16)
    assert out["cu_seqlens"].tolist() == [0, 3, 7, 8, 10, 16]
    assert out["cu_seqlens"].dtype == torch.int32
    assert int(out["token_mask"].sum()) == 16
    out = PackingCollator(0, 8, pad_rows=True)(batch[:2] + batch[3:])  # [3, 4, 1] [6, pad 2]
    assert out["cu_seqlens"].tolist() == [0, 3, 7, 8, 14, 16]
    assert int(out["token_mask"].sum()) == 14 and (out["labels"][0, 14:] == IGNORE_INDEX).all()
    tight = PackingCollator(0, 8)(batch[:2] + batch[3:])  # end to end, in order
    assert tight["cu_seqlens"].tolist() == [0, 3, 7, 13, 14] and tight["input_ids"].shape == (1, 14)
    for pad_rows in (True, False):
        with pytest.raises(ValueError, match="does not fit a row of max_length=4"):
            PackingCollator(0, 4, pad_rows=pad_rows)(batch)
    # each sequence's first label is ignored: the previous sequence's last token must not be trained to predict it
    assert (tight["labels"][0, [0, 3, 7, 13]] == IGNORE_INDEX).all() and (tight["labels"][0, [1, 4, 8]] == 5).all()


@pytest.mark.parametrize(("arch", "config"), [("m1", StateOffsetConfig()), ("m2", InitialStateConfig(conv_state=True))])
def test_packed_training_equals_padded(tmp_path, arch, config):
    data = items(12)
    runs = {}
    collators = {"padded": Collator(0), "packed": PackingCollator(0, 24), "rows": PackingCollator(0, 24, pad_rows=True)}
    for name, collate in collators.items():
        model = get_peft_model(tiny_model(arch), config)
        cfg = TrainConfig(max_steps=3, batch_size=4, micro_batch_size=2, lr=3e-2, save_steps=0, progress=False,
                          log_steps=1, seed=3)  # fmt: skip
        fit(model, data, collate, config=cfg, out_dir=tmp_path / name, save_fn=None)
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        losses = [r["loss"] for r in map(json.loads, lines) if r["type"] == "train"]
        weights = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        runs[name] = losses, weights
    lp, wp = runs["padded"]
    assert len(lp) == 3
    for name in ("packed", "rows"):
        lq, wq = runs[name]
        assert lq == pytest.approx(lp, rel=1e-5), name
        for a, b in zip(wp, wq, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
