"""Packed rows (``resets``) through whole models: for every adapter method, a batch of packed rows gives each example
the loss of its separate run, and the same trainable gradients (tiny models, CPU, fp32)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "methods"))
from _peft_cases import CASES, perturb, tiny_model

from ssmtune import InitialStateConfig, PromptTuningConfig, StateOffsetConfig, get_peft_model, ops
from ssmtune.data import PackedRowsCollator
from ssmtune.models.lm import IGNORE_INDEX, token_loss
from ssmtune.ops.testing import assert_close

# one example spans two alignment blocks, short ones share a row; lead 3 = d_conv - 1 of the tiny models
LENS = [1, 7, 70, 12, 5, 60, 33]
ROWABLE = [(c, a) for c in CASES for a in c.arches if c.id != "prompt"]


def _items(lens: list[int], seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lens):
        ids = torch.randint(1, 37, (n,), generator=g).tolist()
        labels = [IGNORE_INDEX] * (n // 3) + ids[n // 3 :]  # a prompt, then targets
        out.append({"input_ids": ids, "labels": labels, "prompt_length": n // 3, "example_index": i})
    return out


def rows_vs_separate(model, lens, *, backend="ref", ratio=1e-4, rows=4, max_length=80):
    """Per-example losses and the gradients of the batch loss (token sum / target count) of one batch of packed rows
    against each example run alone."""
    model.backend = backend
    items = _items(lens)
    batch = PackedRowsCollator(0, max_length, rows=rows)(items)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "the method trains nothing"
    out = model(batch["input_ids"], attention_mask=batch["attention_mask"], resets=batch["resets"])
    loss_sum, count = token_loss(out.logits, batch["labels"])
    model.zero_grad()
    (loss_sum / count).backward()
    grads = [p.grad.clone() for p in params]

    total, n_sep, per_rows, per_sep = 0.0, 0, [], []
    mask = batch["attention_mask"].bool()
    first = mask & ~torch.nn.functional.pad(mask, (1, 0))[:, :-1]
    starts = first.nonzero().tolist()  # (row, position) of each example's first token, in row-major order
    for it in items:
        x = torch.tensor(it["input_ids"])[None]
        y = torch.tensor(it["labels"])[None]
        o = model(x)
        s, c = token_loss(o.logits, y)
        total, n_sep = total + s, n_sep + c
        per_sep.append(s.detach())
        r, t = next((r, t) for r, t in starts if batch["input_ids"][r, t : t + x.shape[1]].tolist() == x[0].tolist())
        per_rows.append(token_loss(out.logits[r : r + 1, t : t + x.shape[1]], y)[0].detach())
    assert n_sep == count
    model.zero_grad()
    (total / n_sep).backward()
    assert_close("per-example losses", torch.stack(per_sep), torch.stack(per_rows), ratio)
    for p, g in zip(params, grads, strict=True):
        assert_close("grad", p.grad, g, ratio, atol=1e-7)


@pytest.mark.parametrize(("case", "arch"), ROWABLE, ids=[f"{c.id}-{a}" for c, a in ROWABLE])
def test_rows_equal_separate(case, arch):
    model = get_peft_model(tiny_model(arch), case.make())
    perturb(model, 0.3)
    rows_vs_separate(model, LENS)


@pytest.mark.parametrize("arch", ["m1", "m2"])
def test_in_proj_bias(arch):
    """With a bias in in_proj the pads' conv inputs are not zero by themselves: the mixers zero them."""
    model = get_peft_model(tiny_model(arch, bias=True), InitialStateConfig(conv_state=True))
    perturb(model, 0.3)
    rows_vs_separate(model, LENS)


def test_chunk_size_that_does_not_divide_64():
    """A chunked scan restarts between chunks: a config chunk of 256 (Mamba-2's default) scans packed rows at 64."""
    model = get_peft_model(tiny_model("m2", chunk_size=256), InitialStateConfig(conv_state=True))
    perturb(model, 0.3)
    mixer = model.base_model.backbone.layers[0].mixer
    assert mixer.scan_chunk(None) == 256 and mixer.scan_chunk(torch.ones(1, 1, dtype=torch.bool)) == 64
    rows_vs_separate(model, LENS, backend="auto")


@pytest.mark.parametrize("arch", ["m1", "m2"])
@pytest.mark.parametrize("method", ["state_offset_h", "initial_state"])
def test_triton_interpreted(arch, method):
    """The Triton scans under the interpreter, where they take resets (skipped until they do)."""
    op = "ssd_scan" if arch == "m2" else "selective_scan"
    if "triton" not in ops.RESETS_BACKENDS[op]:
        pytest.skip(f"ops.RESETS_BACKENDS[{op!r}] = {ops.RESETS_BACKENDS[op]}: the Triton {op} takes no resets yet")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 set before the kernels are imported")
    config = StateOffsetConfig() if method == "state_offset_h" else InitialStateConfig(conv_state=True)
    # the Triton SSD's chunks: a power of two >= 16 that divides 64 under resets
    model = get_peft_model(tiny_model(arch, **({"chunk_size": 16} if arch == "m2" else {})), config)
    perturb(model, 0.3)
    rows_vs_separate(model, [1, 7, 70, 12], backend="triton", ratio=1e-3)


def test_refusals():
    batch = PackedRowsCollator(0, 20, rows=2)(_items([5, 9]))
    ids, mask, resets = batch["input_ids"], batch["attention_mask"], batch["resets"]
    model = get_peft_model(tiny_model("m2"), PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="Prompt Tuning"):
        model(ids, attention_mask=mask, resets=resets)
    base = tiny_model("m1")
    with pytest.raises(ValueError, match="cache"):
        base(ids, attention_mask=mask, resets=resets, cache=base.allocate_cache(2))
    with pytest.raises(ValueError, match="attention_mask"):
        base(ids, resets=resets)
    mixer = base.backbone.layers[0].mixer
    h = torch.zeros(1, 64, 16)
    cu = torch.tensor([0, 64], dtype=torch.int32)
    with pytest.raises(ValueError, match="two layouts"):
        mixer(h, attention_mask=torch.ones(1, 64), cu_seqlens=cu, resets=torch.ones(1, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="resets must be a bool tensor of shape"):
        base(ids, attention_mask=mask, resets=resets[:1])
