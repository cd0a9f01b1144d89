"""Generic checks run over every (method, architecture) case of ``_peft_cases.CASES``."""

from __future__ import annotations

import copy

import pytest
import torch
from _peft_cases import IDS, PARAMS, VOCAB, decode_logits, perturb, tiny_model

from ssmtune import PeftModel, get_peft_model
from ssmtune.ops.testing import assert_close


def _ids(batch: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(3))


def _setup(case, arch, *, perturbed: bool = True):
    base = tiny_model(arch)
    clean = copy.deepcopy(base)
    model = get_peft_model(base, case.make())
    if perturbed:
        perturb(model)
    return clean, model


@pytest.mark.parametrize(("case", "arch"), PARAMS, ids=IDS)
def test_identity_at_init(case, arch):
    clean, model = _setup(case, arch, perturbed=False)
    ids = _ids()
    out, ref = model(ids).logits, clean(ids).logits
    if case.identity_at_init:
        assert_close("identity", ref, out, 0, atol=1e-6)
    else:
        # Prefix and prompt tuning change the output from the start (documented in their configs).
        assert (out - ref).abs().max() > 1e-4


@pytest.mark.parametrize(("case", "arch"), PARAMS, ids=IDS)
def test_adapter_acts_on_every_backend(case, arch):
    clean, model = _setup(case, arch)
    ids = _ids()
    ref = clean(ids).logits
    outs = {}
    for backend in ("ref", "auto"):
        model.backend = backend
        outs[backend] = model(ids).logits
        # a bypassed adapter would reproduce the base model exactly
        assert (outs[backend] - ref).abs().max() > 1e-3, backend
        with model.disable_adapter():
            assert_close(f"disabled[{backend}]", ref, model(ids).logits, 0, atol=1e-5)
    assert_close("ref vs auto", outs["ref"], outs["auto"], 1e-4)


@pytest.mark.parametrize(("case", "arch"), PARAMS, ids=IDS)
def test_only_adapter_parameters_train(case, arch):
    _, model = _setup(case, arch)
    model.train()
    adapter = {id(p) for m in model.adapter_modules().values() for p in m.parameters()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == adapter
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = _ids()
    loss = model(ids, labels=ids).loss
    loss.backward()
    for n, p in model.named_parameters():
        if id(p) in adapter:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
            assert p.dtype == torch.float32, n
        else:
            assert p.grad is None, n
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    opt.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        assert changed == (id(p) in adapter), n


@pytest.mark.parametrize(("case", "arch"), PARAMS, ids=IDS)
def test_save_load_round_trip(case, arch, tmp_path):
    clean, model = _setup(case, arch)
    ids = _ids()
    out = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(clean), tmp_path)
    assert_close("reloaded", out, loaded(ids).logits, 1e-6, atol=1e-6)
    assert loaded.peft_config["default"] == model.peft_config["default"]
    assert loaded.trainable_parameters() == 0  # inference mode unless is_trainable
    trainable = PeftModel.from_pretrained(copy.deepcopy(clean), tmp_path, is_trainable=True)
    assert trainable.trainable_parameters() == model.trainable_parameters()


@pytest.mark.parametrize(("case", "arch"), PARAMS, ids=IDS)
def test_merge(case, arch):
    clean, model = _setup(case, arch)
    ids = _ids()
    out = model(ids).logits
    if not case.mergeable:
        with pytest.raises(ValueError, match="cannot be merged"):
            model.merge_and_unload()
        return
    merged = model.merge_and_unload()
    assert type(merged) is type(clean)
    assert [n for n, _ in merged.named_parameters()] == [n for n, _ in clean.named_parameters()]
    assert_close("merged", out, merged(ids).logits, 1e-5, atol=1e-5)
    assert (merged(ids).logits - clean(ids).logits).abs().max() > 1e-3


@pytest.mark.parametrize(("case", "arch"), PARAMS, ids=IDS)
def test_decode_matches_forward(case, arch):
    _, model = _setup(case, arch)
    ids = _ids(length=8)
    full = model(ids).logits
    # the ref and auto backends agree on the full forward (test above), so one backend suffices here
    assert_close("decode", full, decode_logits(model, ids, prefill=5), 1e-4, atol=1e-5)


@pytest.mark.parametrize(("case", "arch"), PARAMS[:1], ids=IDS[:1])
def test_two_named_adapters(case, arch):
    clean, model = _setup(case, arch)
    ids = _ids()
    first = model(ids).logits
    model.add_adapter("other", case.make())
    assert torch.equal(model(ids).logits, first)  # a new adapter starts inactive
    model.set_adapter("other")
    assert_close("other at init", clean(ids).logits, model(ids).logits, 0, atol=1e-6)
    other = model.adapter_modules("other").values()
    assert model.trainable_parameters() == sum(p.numel() for m in other for p in m.parameters())
    model.set_adapter("default")
    assert torch.equal(model(ids).logits, first)
    model.delete_adapter("other")
    assert model.adapter_names == ["default"]
