"""Prefix states kept across forwards while gradients are off: equal to a fresh pass, never stale, never in training."""

from __future__ import annotations

import pytest
import torch
from _peft_cases import VOCAB, tiny_model

from ssmtune import LoraConfig, PrefixTuningConfig, get_peft_model
from ssmtune.methods.prefix import PrefixStates

M1_LORA = ["in_proj.z", "out_proj"]


def _model(arch: str = "m1"):
    """Adapters "p" (Prefix), "q" (Prefix), "pl" (Prefix + LoRA) and "l" (LoRA), moved away from their init."""
    lora = M1_LORA if arch == "m1" else ["in_proj.x", "out_proj"]
    peft = get_peft_model(tiny_model(arch), PrefixTuningConfig(num_virtual_tokens=3, init_std=0.5), adapter_name="p")
    peft.add_adapter("q", PrefixTuningConfig(num_virtual_tokens=2, init_std=0.5))
    peft.add_adapter(
        "pl", [PrefixTuningConfig(num_virtual_tokens=2, init_std=0.5), LoraConfig(r=2, target_modules=lora)]
    )
    peft.add_adapter("l", LoraConfig(r=2, target_modules=lora))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n in peft.adapter_names:
            for p in peft.adapter_state_dict(n).values():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return peft


def _ids(batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, 7), generator=torch.Generator().manual_seed(5))


@pytest.fixture
def passes(monkeypatch) -> list[int]:
    """Counts the prefix passes (one per hook and computation)."""
    calls = [0]
    run = PrefixStates.prefix_states

    def counted(self):
        calls[0] += 1
        return run(self)

    monkeypatch.setattr(PrefixStates, "prefix_states", counted)
    return calls


def _fresh(peft, ids, **kw) -> torch.Tensor:
    """Logits with gradients on: the prefix pass always runs."""
    with torch.enable_grad():
        return peft(ids, **kw).logits.detach()


@pytest.mark.parametrize("arch", ["m1", "m2"])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_cached_forward_equals_fresh_pass(arch, mode, passes):
    peft = _model(arch)
    ids = _ids()
    ref, ref1 = _fresh(peft, ids), _fresh(peft, ids[:1])
    n_layer = peft.config.n_layer
    passes[0] = 0
    ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with ctx():
        first = peft(ids).logits
        assert passes[0] == n_layer
        second = peft(ids[:1]).logits  # another batch size reuses the same unbatched pair
        third = peft(ids).logits
    assert passes[0] == n_layer
    assert torch.equal(first, ref) and torch.equal(third, ref) and torch.equal(second, ref1)
    # the kept pair serves a later no_grad forward outside inference mode too
    with torch.no_grad():
        assert torch.equal(peft(ids).logits, ref)


def _check(peft, ids, passes, expected: int, label: str) -> torch.Tensor:
    """A no_grad forward after a change runs ``expected`` prefix passes and equals a fresh pass; the pairs are kept
    again afterwards (a forward with gradients drops them), so the next change meets a full cache."""
    passes[0] = 0
    with torch.no_grad():
        got = peft(ids).logits
    assert passes[0] == expected, label
    assert torch.equal(got, _fresh(peft, ids)), label
    with torch.no_grad():
        peft(ids)
    return got


def test_in_place_updates_invalidate(passes, tmp_path):
    peft = _model()
    ids = _ids()
    n_layer = peft.config.n_layer
    before = _check(peft, ids, passes, n_layer, "first")
    _check(peft, ids, passes, 0, "unchanged")
    hooks = list(peft.adapter_modules("p").values())
    # 1. through .data: no version counter moves, the values are compared
    hooks[0].prefix.data.add_(0.5)
    after = _check(peft, ids, passes, 1, ".data")
    assert (after - before).abs().max() > 1e-4
    # 2. an optimizer step
    opt = torch.optim.SGD(peft.parameters(), lr=1.0)
    peft(ids).logits.square().mean().backward()
    with torch.no_grad():
        peft(ids)
    opt.step()
    _check(peft, ids, passes, n_layer, "optimizer step")
    # 3. loading other values, from a file
    saved = {k: v.clone() for k, v in peft.adapter_state_dict("p").items()}
    peft.save_pretrained(tmp_path / "p")
    with torch.no_grad():
        for p in peft.adapter_state_dict("p").values():
            p.add_(1.0)
    moved = _check(peft, ids, passes, n_layer, "add_")
    peft.load_adapter_state_dict(saved, "p")
    restored = _check(peft, ids, passes, n_layer, "load_adapter_state_dict")
    assert not torch.equal(moved, restored)
    peft.load_adapter(tmp_path / "p", "p2")
    peft.set_adapter("p2")
    assert torch.equal(_check(peft, ids, passes, n_layer, "load_adapter"), restored)
    peft.set_adapter("p")
    _check(peft, ids, passes, 0, "set_adapter back")  # p kept its pairs
    # 4. a base weight the pass reads (version counter), its dtype, the backend
    with torch.no_grad():
        next(iter(peft.base_model.mixers()))[1].in_proj.weight.mul_(1.1)
    _check(peft, ids, passes, 1, "base weight")
    peft.double()
    _check(peft, ids, passes, n_layer, "dtype")
    peft.base_model.backend = "ref"
    _check(peft, ids, passes, n_layer, "backend")


def test_own_lora_and_active_adapters_are_part_of_the_key(passes):
    """Without a routing the pass sees every active LoRA delta; their values are compared (writes through .data)."""
    peft = _model()
    ids = _ids()
    n_layer = peft.config.n_layer
    for names in (["p"], ["p", "l"], ["p"], ["pl"], ["pl", "l"]):
        peft.set_adapter(names)
        _check(peft, ids, passes, n_layer, str(names))
    _check(peft, ids, passes, 0, "unchanged")
    for name in ("pl", "l"):
        lora = next(m for k, m in peft.adapter_modules(name).items() if k.endswith(".lora"))
        lora.lora_B.data.add_(0.5)
        _check(peft, ids, passes, 1, f"LoRA of {name} through .data")


def test_training_after_inference_builds_a_graph(passes):
    peft, twin = _model(), _model()
    ids = _ids()
    with torch.inference_mode():
        peft(ids)
    with torch.no_grad():
        peft(ids)
    passes[0] = 0
    peft(ids).logits.square().mean().backward()
    twin(ids).logits.square().mean().backward()
    assert passes[0] == 2 * peft.config.n_layer  # both models ran their pass
    for (name, p), (_, q) in zip(peft.named_parameters(), twin.named_parameters()):
        if p.requires_grad and "prefix" in name:
            assert p.grad is not None and p.grad.abs().max() > 0, name
            assert torch.equal(p.grad, q.grad), name


@pytest.mark.parametrize("arch", ["m1", "m2"])
def test_routed_rows_equal_rows_alone(arch, passes):
    peft = _model(arch)
    rows = ["p", None, "q", "pl", "p", "l", None, "pl"]
    ids = torch.randint(0, VOCAB, (len(rows), 7), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        mixed = [peft(ids, adapter_names=rows).logits for _ in range(2)]
        # a batch of other adapters (LoRA "l" absent) must give the Prefix+LoRA rows the same states
        pl_rows = peft(ids[3:4], adapter_names=["pl"]).logits
    assert passes[0] == 3 * peft.config.n_layer  # p, q and pl once each
    assert torch.equal(mixed[0], mixed[1])
    for i, name in enumerate(rows):
        if name is None:
            with peft.disable_adapter():
                ref = _fresh(peft, ids[i : i + 1])
        else:
            peft.set_adapter(name)
            ref = _fresh(peft, ids[i : i + 1])
        torch.testing.assert_close(mixed[0][i], ref[0], rtol=1e-5, atol=1e-5, msg=f"row {i} ({name})")
    torch.testing.assert_close(pl_rows[0], mixed[0][3], rtol=1e-6, atol=1e-6)
