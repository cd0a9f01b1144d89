"""Per-row adapters (``PeftModel.route`` / ``adapter_names=``): a mixed batch equals each row run alone."""

from __future__ import annotations

import pytest
import torch
from _peft_cases import VOCAB, tiny_model

from ssmtune import InitialStateConfig, LoraConfig, PrefixTuningConfig, StateOffsetConfig, get_peft_model
from ssmtune.core.routing import ROUTING_ATTR
from ssmtune.models import InferenceCache
from ssmtune.ops.testing import assert_close

ADAPTERS = {
    "h": StateOffsetConfig(),
    "y": StateOffsetConfig(variant="y"),
    "h_lowrank": StateOffsetConfig(rank=2, r_ratio=2),
    "h0": InitialStateConfig(conv_state=True),
    "prefix": PrefixTuningConfig(num_virtual_tokens=3),
    "combo": [StateOffsetConfig(variant="y"), InitialStateConfig()],
}
ROWS = ["h", "y", None, "h0", "prefix", "combo", "h_lowrank", "h"]


def _model(arch: str, dtype=torch.float64):
    """A PeftModel holding every adapter of ADAPTERS, each moved away from its (identity) init."""
    names = list(ADAPTERS)
    peft = get_peft_model(tiny_model(arch).to(dtype), ADAPTERS[names[0]], adapter_name=names[0])
    for n in names[1:]:
        peft.add_adapter(n, ADAPTERS[n])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n in names:
            for m in peft.adapter_modules(n).values():
                for p in m.parameters():
                    p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p) * 0.3)
    return peft


def _alone(peft, name, fn, *args, **kwargs):
    """fn(*args, **kwargs) with only ``name`` active (None: the bare base model)."""
    if name is None:
        with peft.disable_adapters():
            return fn(*args, **kwargs)
    peft.set_adapter(name)
    return fn(*args, **kwargs)


@pytest.mark.parametrize("backend", ["ref", "auto"])
@pytest.mark.parametrize("arch", ["m1", "m2"])
def test_mixed_forward_equals_rows_alone(arch, backend):
    peft = _model(arch)
    peft.backend = backend
    ids = torch.randint(0, VOCAB, (len(ROWS), 7))
    mixed = peft(ids, adapter_names=ROWS).logits  # [B, L, V]
    with peft.disable_adapters():
        base = peft(ids).logits
    for i, name in enumerate(ROWS):
        ref = _alone(peft, name, peft, ids[i : i + 1]).logits[0]
        assert_close(f"row {i} ({name})", ref, mixed[i], 1e-10)
        if name is not None:
            # the adapter really acts, so the equality above is not the base model's twice
            assert (ref - base[i]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["m1", "m2"])
def test_mixed_decode_with_cache_equals_full_forward(arch):
    peft = _model(arch)
    ids = torch.randint(0, VOCAB, (len(ROWS), 8))
    full = peft(ids, adapter_names=ROWS).logits
    cache = InferenceCache(peft.config.n_layer)
    steps = [peft(ids[:, :5], cache=cache, adapter_names=ROWS).logits]
    for t in range(5, 8):
        steps.append(peft(ids[:, t : t + 1], cache=cache, adapter_names=ROWS).logits)
    assert_close("decode", full, torch.cat(steps, 1), 1e-10)


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("arch", ["m1", "m2"])
def test_mixed_generate_equals_rows_alone(arch, num_beams):
    peft = _model(arch)
    ids = torch.randint(1, VOCAB, (len(ROWS), 6))
    # left padding of different lengths: generate prefills row by row, the routing must follow
    mask = torch.ones_like(ids)
    for i in range(len(ROWS)):
        mask[i, : i % 3] = 0
    kw = {"max_new_tokens": 5, "num_beams": num_beams, "pad_token_id": 0}
    out = peft.generate(ids, attention_mask=mask, adapter_names=ROWS, **kw)
    for i, name in enumerate(ROWS):
        row = ids[i : i + 1, mask[i].bool()]
        ref = _alone(peft, name, peft.generate, row, **kw)
        assert torch.equal(out[i, -5:], ref[0, -5:]), (i, name, out[i], ref[0])
    # the rows' adapters change what is generated
    with peft.disable_adapters():
        base = peft.generate(ids, attention_mask=mask, **kw)
    assert not torch.equal(out[:, -5:], base[:, -5:])


def test_mixed_gradients_stay_in_their_rows():
    peft = _model("m1", torch.float32)
    ids = torch.randint(0, VOCAB, (3, 5))
    for n in ("h", "y"):
        for p in peft.adapter_state_dict(n).values():
            p.requires_grad_(True)
    # row 0 only: the adapter of row 1 gets no gradient
    peft(ids, adapter_names=["h", "y", None]).logits[0].sum().backward()
    h_grads = [m.h_off.grad for m in peft.adapter_modules("h").values()]
    y_grads = [m.y_off.grad for m in peft.adapter_modules("y").values()]
    assert all(g is not None and g.abs().sum() > 0 for g in h_grads)
    assert all(g is None or g.abs().sum() == 0 for g in y_grads)


def test_lora_mixes_only_with_itself():
    peft = _model("m2")
    peft.add_adapter("lora", LoraConfig(r=2, target_modules=["out_proj"]))
    with torch.no_grad():
        for m in peft.adapter_modules("lora").values():
            m.lora_B.normal_()
    ids = torch.randint(0, VOCAB, (2, 5))
    with pytest.raises(ValueError, match=r"'lora'.*cannot be mixed"):
        peft(ids, adapter_names=["lora", "h"])
    with pytest.raises(ValueError, match=r"'lora'.*cannot be mixed"):
        peft(ids, adapter_names=["lora", None])
    # a batch that is all one LoRA adapter is fine
    out = peft(ids, adapter_names=["lora", "lora"]).logits
    ref = _alone(peft, "lora", peft, ids).logits
    assert_close("lora batch", ref, out, 1e-12)


def test_route_errors_and_restores_state():
    peft = _model("m1")
    peft.set_adapter("y")
    before = {(n, p): m.active for n in peft.adapter_names for p, m in peft.adapter_modules(n).items()}
    ids = torch.randint(0, VOCAB, (2, 4))
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        peft(ids, adapter_names=["h", "nope"])
    with pytest.raises(ValueError, match="3 rows but 2 adapter names"):
        peft(torch.randint(0, VOCAB, (3, 4)), adapter_names=["h", "y"])
    with pytest.raises(ValueError, match="already inside a route"), peft.route(["h", "y"]):
        peft(ids, adapter_names=["h", "y"])
    after = {(n, p): m.active for n in peft.adapter_names for p, m in peft.adapter_modules(n).items()}
    assert after == before
    hooks = [m for n in peft.adapter_names for m in peft.adapter_modules(n).values()]
    assert all(getattr(m, ROUTING_ATTR, None) is None for m in hooks)
    # disable_adapters wins over the routing: every row is the base model
    with peft.disable_adapters():
        routed = peft(ids, adapter_names=["h", "prefix"]).logits
        base = peft(ids).logits
    assert_close("disabled", base, routed, 1e-12)


def test_load_adapters_then_route(tmp_path):
    src = _model("m2")
    dirs = {}
    for n in ("h", "prefix", "combo"):
        dirs[n] = tmp_path / n
        src.save_adapter(dirs[n], adapter_name=n)
    ids = torch.randint(0, VOCAB, (3, 6))
    names = ["combo", "h", "prefix"]
    want = src(ids, adapter_names=names).logits
    fresh = get_peft_model(tiny_model("m2").double(), StateOffsetConfig(variant="y"), adapter_name="unused")
    fresh.load_adapters(dirs)
    assert fresh.active_adapters == ["unused"]
    assert set(fresh.adapter_names) == {"unused", "h", "prefix", "combo"}
    assert fresh.routable("combo")
    assert_close("loaded", want, fresh(ids, adapter_names=names).logits, 1e-12)
