"""Per-row adapters (``PeftModel.route`` / ``adapter_names=``): a mixed batch equals each row run alone."""

from __future__ import annotations

import pytest
import torch
from _peft_cases import VOCAB, tiny_model

from ssmtune import (
    BitFitConfig,
    InitialStateConfig,
    LoraConfig,
    PrefixTuningConfig,
    SDLoraConfig,
    StateOffsetConfig,
    get_peft_model,
)
from ssmtune.core.inject import AdaptedLinear
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

# LoRA adapters of different ranks and targets (row slices included), DoRA, a Prefix+LoRA adapter (its virtual-token
# pass must see its own LoRA only) and a state adapter, side by side with None rows
LORA_ADAPTERS = {
    "m1": {
        "la": LoraConfig(r=2, target_modules=["x_proj.dt", "x_proj.B", "x_proj.C", "dt_proj"]),
        "lb": LoraConfig(r=4, lora_alpha=16, target_modules=["in_proj", "out_proj"]),
        "dora": LoraConfig(r=3, target_modules=["in_proj.x", "x_proj", "out_proj"], use_dora=True),
        "prefix_lora": [PrefixTuningConfig(num_virtual_tokens=2), LoraConfig(r=2, target_modules=["in_proj.z"])],
        "h": StateOffsetConfig(),
    },
    "m2": {
        "la": LoraConfig(r=2, target_modules=["in_proj.B", "in_proj.C", "in_proj.dt"]),
        "lb": LoraConfig(r=4, lora_alpha=16, target_modules=["in_proj", "out_proj"]),
        "dora": LoraConfig(r=3, target_modules=["in_proj.z", "out_proj"], use_dora=True),
        "prefix_lora": [PrefixTuningConfig(num_virtual_tokens=2), LoraConfig(r=2, target_modules=["in_proj.x"])],
        "h": StateOffsetConfig(),
    },
}
LORA_ROWS = ["la", "lb", None, "h", "dora", "prefix_lora", "la", "lb"]


def _model(arch: str, dtype=torch.float64, adapters=None):
    """A PeftModel holding every adapter of ``adapters`` (default ADAPTERS), each moved away from its identity init."""
    adapters = ADAPTERS if adapters is None else adapters
    names = list(adapters)
    peft = get_peft_model(tiny_model(arch).to(dtype), adapters[names[0]], adapter_name=names[0])
    for n in names[1:]:
        peft.add_adapter(n, adapters[n])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n in names:
            for m in peft.adapter_modules(n).values():
                for p in m.parameters():
                    p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p) * 0.3)
    return peft


def _case(kind: str, arch: str, dtype=torch.float64):
    """(model, adapter_names): the state adapters (kind "state") or the LoRA set (kind "lora")."""
    if kind == "state":
        return _model(arch, dtype), ROWS
    return _model(arch, dtype, LORA_ADAPTERS[arch]), LORA_ROWS


def _alone(peft, name, fn, *args, **kwargs):
    """fn(*args, **kwargs) with only ``name`` active (None: the bare base model)."""
    if name is None:
        with peft.disable_adapter():
            return fn(*args, **kwargs)
    peft.set_adapter(name)
    return fn(*args, **kwargs)


@pytest.mark.parametrize("kind", ["state", "lora"])
@pytest.mark.parametrize("backend", ["ref", "auto"])
@pytest.mark.parametrize("arch", ["m1", "m2"])
def test_mixed_forward_equals_rows_alone(arch, backend, kind):
    # the LoRA set in fp32, as it is served: row-subset matmuls may round differently from the full batch
    peft, rows = _case(kind, arch, torch.float64 if kind == "state" else torch.float32)
    tol = {"state": (1e-10, 1e-6), "lora": (1e-5, 1e-5)}[kind]
    peft.backend = backend
    ids = torch.randint(0, VOCAB, (len(rows), 7))
    mixed = peft(ids, adapter_names=rows).logits  # [B, L, V]
    with peft.disable_adapter():
        base = peft(ids).logits
    for i, name in enumerate(rows):
        ref = _alone(peft, name, peft, ids[i : i + 1]).logits[0]
        assert_close(f"row {i} ({name})", ref, mixed[i], *tol)
        if name is not None:
            # the adapter really acts, so the equality above is not the base model's twice
            assert (ref - base[i]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["state", "lora"])
@pytest.mark.parametrize("arch", ["m1", "m2"])
def test_mixed_decode_with_cache_equals_full_forward(arch, kind):
    peft, rows = _case(kind, arch)
    ids = torch.randint(0, VOCAB, (len(rows), 8))
    full = peft(ids, adapter_names=rows).logits
    cache = InferenceCache(peft.config.n_layer)
    steps = [peft(ids[:, :5], cache=cache, adapter_names=rows).logits]
    for t in range(5, 8):
        steps.append(peft(ids[:, t : t + 1], cache=cache, adapter_names=rows).logits)
    assert_close("decode", full, torch.cat(steps, 1), 1e-10)


@pytest.mark.parametrize("kind", ["state", "lora"])
@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("arch", ["m1", "m2"])
def test_mixed_generate_equals_rows_alone(arch, num_beams, kind):
    peft, rows = _case(kind, arch)
    ids = torch.randint(1, VOCAB, (len(rows), 6))
    # left padding of different lengths: generate prefills row by row, the routing (LoRA deltas too) must follow
    mask = torch.ones_like(ids)
    for i in range(len(rows)):
        mask[i, : i % 3] = 0
    kw = {"max_new_tokens": 5, "num_beams": num_beams, "pad_token_id": 0}
    out = peft.generate(ids, attention_mask=mask, adapter_names=rows, **kw)
    for i, name in enumerate(rows):
        row = ids[i : i + 1, mask[i].bool()]
        ref = _alone(peft, name, peft.generate, row, **kw)
        assert torch.equal(out[i, -5:], ref[0, -5:]), (i, name, out[i], ref[0])
    # the rows' adapters change what is generated
    with peft.disable_adapter():
        base = peft.generate(ids, attention_mask=mask, **kw)
    assert not torch.equal(out[:, -5:], base[:, -5:])


@pytest.mark.parametrize(("kind", "mine", "other"), [("state", "h", "y"), ("lora", "la", "lb")])
def test_mixed_gradients_stay_in_their_rows(kind, mine, other):
    peft, _ = _case(kind, "m1", torch.float32)
    peft.set_adapter([mine, other])  # both trainable
    ids = torch.randint(0, VOCAB, (3, 5))
    # row 0 only: the adapter of row 1 gets no gradient
    peft(ids, adapter_names=[mine, other, None]).logits[0].sum().backward()
    grads = {n: [p.grad for m in peft.adapter_modules(n).values() for p in m.parameters()] for n in (mine, other)}
    assert all(g is not None and g.abs().sum() > 0 for g in grads[mine])
    assert all(g is None or g.abs().sum() == 0 for g in grads[other])
    assert any(g is not None for g in grads[other])  # it took part in the forward (zero gradients, not none)


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
    # disable_adapter wins over the routing: every row is the base model
    with peft.disable_adapter():
        routed = peft(ids, adapter_names=["h", "prefix"]).logits
        base = peft(ids).logits
    assert_close("disabled", base, routed, 1e-12)


def test_load_adapters_then_route(tmp_path):
    src = _model("m2")
    dirs = {}
    for n in ("h", "prefix", "combo"):
        dirs[n] = tmp_path / n
        src.save_pretrained(dirs[n], adapter_name=n)
    ids = torch.randint(0, VOCAB, (3, 6))
    names = ["combo", "h", "prefix"]
    want = src(ids, adapter_names=names).logits
    fresh = get_peft_model(tiny_model("m2").double(), StateOffsetConfig(variant="y"), adapter_name="unused")
    fresh.load_adapters(dirs)
    assert fresh.active_adapters == ["unused"]
    assert set(fresh.adapter_names) == {"unused", "h", "prefix", "combo"}
    assert fresh.routable("combo")
    assert_close("loaded", want, fresh(ids, adapter_names=names).logits, 1e-12)


def test_one_lora_adapter_batch_takes_the_plain_path():
    peft, _ = _case("lora", "m2", torch.float32)
    ids = torch.randint(0, VOCAB, (3, 5))
    with peft.route(["lb"] * 3) as routing:
        assert routing.rows_of("lb", 3, ids.device) is None
        out = peft(ids).logits
    assert_close("all lb", _alone(peft, "lb", peft, ids).logits, out, 1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "config", "method"),
    [
        ("bias", BitFitConfig(), "bitfit"),
        ("sd", SDLoraConfig(state_freeze=0.6, channel_freeze=0.85, r=2), "sdlora"),
    ],
)
def test_weight_changing_adapters_mix_only_with_themselves(name, config, method):
    peft, _ = _case("lora", "m1", torch.float32)
    peft.add_adapter(name, config)
    ids = torch.randint(0, VOCAB, (2, 5))
    for other in ("la", "h", None):
        with pytest.raises(ValueError, match=rf"\{{'{name}': \['{method}'\]\}} cannot be mixed"):
            peft(ids, adapter_names=[other, name])
    assert not peft.routable(name) and peft.routable("la") and peft.routable("prefix_lora")
    out = peft(ids, adapter_names=[name, name]).logits
    assert_close("all one adapter", _alone(peft, name, peft, ids).logits, out, 1e-5, atol=1e-5)


def test_merged_lora_weights_cannot_be_routed():
    peft, _ = _case("lora", "m2", torch.float32)
    ids = torch.randint(0, VOCAB, (2, 5))
    want = _alone(peft, "la", peft, ids).logits
    deltas = set(peft.adapter_modules("la").values())
    for lin in [c for c in peft.modules() if isinstance(c, AdaptedLinear)]:
        for d in lin.adapters.values():
            if d in deltas:
                d.merge(lin.base_layer)
    assert not peft.routable("la")
    with pytest.raises(ValueError, match=r"\['la'\] have weights merged"):
        peft(ids, adapter_names=["la", "lb"])
    # every row on the merged adapter: its weights are the base weights now, the delta is skipped
    assert_close("merged", want, peft(ids, adapter_names=["la", "la"]).logits, 1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["state", "lora"])
@pytest.mark.parametrize("arch", ["m1", "m2"])
def test_routed_prefill_of_mixed_lengths_is_one_forward_equal_to_row_by_row(arch, kind, monkeypatch):
    from ssmtune.core.routing import RoutedLM
    from ssmtune.models import generate as gen

    peft, rows = _case(kind, arch, torch.float32)
    ids = torch.randint(1, VOCAB, (len(rows), 9))
    mask = torch.ones_like(ids)
    for i in range(len(rows)):
        mask[i, : (3 * i) % 8] = 0  # lengths 9, 6, 3, 8, 5, 2, 7, 4: several chunks of the Mamba-2 scan
    lm, packable = peft.base_model, gen._packable
    calls = []
    forward = type(lm).forward
    monkeypatch.setattr(type(lm), "forward", lambda self, *a, **k: calls.append(a[0].shape) or forward(self, *a, **k))
    with torch.no_grad(), peft.route(rows) as routing:
        cache, logits = gen.prefill(RoutedLM(lm, routing), ids, mask)
        assert calls == [torch.Size([1, int(mask.sum())])]  # one packed forward for all rows
        monkeypatch.setattr(gen, "_packable", lambda m: False)
        ref_cache, ref_logits = gen.prefill(RoutedLM(lm, routing), ids, mask)
        assert len(calls) == 1 + len(rows)
    assert_close("logits", ref_logits, logits, 1e-5)
    for a, b in zip(ref_cache.layers, cache.layers, strict=True):
        assert_close("ssm state", a.ssm_state, b.ssm_state, 1e-5)
        assert_close("conv state", a.conv_state, b.conv_state, 1e-6)
    # generate's tokens, greedy and beams, are those of the row-by-row prefill
    kw = {"max_new_tokens": 5, "pad_token_id": 0}
    for beams in (1, 3):
        monkeypatch.setattr(gen, "_packable", packable)
        out = peft.generate(ids, attention_mask=mask, adapter_names=rows, num_beams=beams, **kw)
        monkeypatch.setattr(gen, "_packable", lambda m: False)
        ref = peft.generate(ids, attention_mask=mask, adapter_names=rows, num_beams=beams, **kw)
        assert torch.equal(out, ref), (beams, out, ref)
