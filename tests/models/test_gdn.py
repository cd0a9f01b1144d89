"""Gated DeltaNet hybrids (Qwen3.5, Qwen3.5-MoE, Qwen3-Next, OLMo-Hybrid): parity with transformers, and state-based
PEFT over (method, family)."""

from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from _gdn import GDN_FAMILIES, MIXER_LINEARS, tiny_gdn, tiny_gdn_hf
from _hybrid import (
    check_decode_matches_forward,
    check_identity_at_init,
    check_rows_match_alone,
    check_trains_only_adapters,
    decode_logits,
    ids,
    tiny_hybrid,
)

from ssmtune import (
    InitialStateConfig,
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    StateOffsetConfig,
    from_transformers,
    get_peft_model,
    load_model,
)
from ssmtune.core.targets import iter_mixers
from ssmtune.models.gated_delta import HostedGDNMixer
from ssmtune.ops.testing import assert_close

sys.path.insert(0, str(Path(__file__).parents[1] / "methods"))
from _peft_cases import perturb


@pytest.mark.parametrize("family", GDN_FAMILIES)
def test_parity_with_transformers(family):
    hf = tiny_gdn_hf(family)
    model = from_transformers(copy.deepcopy(hf))
    mixers = [m for m in model.modules() if isinstance(m, HostedGDNMixer)]
    assert len(mixers) == 1
    assert sorted(model.state_dict()) == sorted(hf.state_dict())
    x = ids(length=21)
    with torch.no_grad():
        ref = hf(x).logits
        assert_close("forward", ref, model(x).logits, 1e-5, atol=1e-5)
        assert_close("prefill + steps", ref, decode_logits(model, x, prefill=13), 1e-5, atol=1e-5)


def test_vision_language_wrapper_swaps_the_text_tower(tmp_path):
    from _gdn import EXTRA
    from _hybrid import COMMON
    from transformers import AutoConfig, AutoModelForImageTextToText

    vision = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
              "patch_size": 4, "temporal_patch_size": 1, "spatial_merge_size": 1}  # fmt: skip
    config = AutoConfig.for_model("qwen3_5", text_config={**COMMON, **EXTRA["qwen3_5_text"]}, vision_config=vision)
    torch.manual_seed(0)
    vl = AutoModelForImageTextToText.from_config(config).eval()
    model = from_transformers(copy.deepcopy(vl))
    paths = [n for n, m in model.named_modules() if isinstance(m, HostedGDNMixer)]
    assert paths == ["model.language_model.layers.0.linear_attn"]
    x = ids(length=11)
    with torch.no_grad():
        assert_close("text logits", vl(input_ids=x).logits, model(input_ids=x).logits, 1e-5, atol=1e-5)
    assert get_peft_model(model, StateOffsetConfig()).trainable_parameters() == 4 * 8 * 6
    vl.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)  # the text model of the checkpoint, mixers swapped
    assert [type(m) for m in loaded.modules() if isinstance(m, HostedGDNMixer)] == [HostedGDNMixer]


def test_shares_parameters_with_the_host():
    hf = tiny_gdn_hf("qwen3_5_text")
    before = {id(p) for p in hf.parameters()}
    from_transformers(hf)
    assert {id(p) for p in hf.parameters()} == before
    assert from_transformers(hf) is hf  # twice is harmless


@dataclass(frozen=True)
class Case:
    id: str
    make: object  # family -> config
    per_mixer: object = None  # mixer -> trainable parameter count
    identity_at_init: bool = True


def _state(m):
    return math.prod(m.state_shape)


CASES = [
    Case("state_offset_h", lambda f: StateOffsetConfig(), _state),
    Case("state_offset_y", lambda f: StateOffsetConfig(variant="y"), lambda m: m.num_v_heads * m.head_v_dim),
    Case("initial_state", lambda f: InitialStateConfig(), _state),
    Case(
        "initial_state_conv",
        lambda f: InitialStateConfig(conv_state=True),
        lambda m: _state(m) + math.prod(m.conv_state_shape),
    ),
    Case("prefix", lambda f: PrefixTuningConfig(num_virtual_tokens=3), identity_at_init=False),
    Case("lora_mixer", lambda f: LoraConfig(r=2, target_modules=MIXER_LINEARS[f])),
    # Kimi-Linear's latent attention has no v_proj
    Case(
        "lora_attn", lambda f: LoraConfig(r=2, target_modules=["q_proj", "o_proj" if f == "kimi_linear" else "v_proj"])
    ),
]
PARAMS = [(c, f) for c in CASES for f in GDN_FAMILIES]
IDS = [f"{c.id}-{f}" for c, f in PARAMS]


def _setup(case: Case, family: str, *, perturbed: bool = True):
    base = tiny_gdn(family)
    clean = copy.deepcopy(base)
    model = get_peft_model(base, case.make(family))
    if perturbed:
        perturb(model)
    return clean, model


@pytest.mark.parametrize(("case", "family"), PARAMS, ids=IDS)
def test_identity_at_init_and_counts(case, family):
    clean, model = _setup(case, family, perturbed=False)
    check_identity_at_init(clean, model, case.identity_at_init)
    if case.per_mixer is not None:
        assert model.trainable_parameters() == sum(case.per_mixer(t.mixer) for t in iter_mixers(model.base_model))


@pytest.mark.parametrize(("case", "family"), PARAMS, ids=IDS)
def test_trains_only_adapters_and_changes_output(case, family):
    check_trains_only_adapters(*_setup(case, family, perturbed=False))


@pytest.mark.parametrize(("case", "family"), PARAMS, ids=IDS)
def test_decode_matches_forward(case, family):
    check_decode_matches_forward(_setup(case, family)[1])


def test_state_offset_never_enters_the_recurrence():
    """S' changes the read-out, not the state the cache carries: the cached recurrent state is the base model's."""
    peft = get_peft_model(tiny_gdn("qwen3_5_text"), StateOffsetConfig())
    perturb(peft)
    layer = next(t.layer for t in iter_mixers(peft.base_model))
    x = ids(length=9)
    with torch.no_grad():
        on = peft(x, use_cache=True)
        with peft.disable_adapter():
            off = peft(x, use_cache=True)
    assert (on.logits - off.logits).abs().max() > 1e-4
    states = [o.past_key_values.get_recurrent_state(layer) for o in (on, off)]
    assert_close("cached state", states[1], states[0], 0, atol=0)


@pytest.mark.parametrize("family", GDN_FAMILIES)
def test_mixed_adapters_per_row(family):
    adapters = {
        "h": StateOffsetConfig(),
        "y": StateOffsetConfig(variant="y"),
        "h0": InitialStateConfig(conv_state=True),
        "lora": LoraConfig(r=2, target_modules=[MIXER_LINEARS[family][0], "q_proj"]),
    }
    peft = get_peft_model(tiny_gdn(family), adapters["h"], adapter_name="h")
    for name, cfg in list(adapters.items())[1:]:
        peft.add_adapter(name, cfg)
    for name in adapters:
        peft.set_adapter(name)
        perturb(peft)
    check_rows_match_alone(peft, ["h", None, "y", "h0", "lora", "h"])


def test_save_load_round_trip(tmp_path):
    clean, model = _setup(CASES[0], "qwen3_next")
    x = ids()
    with torch.no_grad():
        out = model(x).logits
    model.save_pretrained(tmp_path / "h")
    loaded = PeftModel.from_pretrained(copy.deepcopy(clean), tmp_path / "h")
    with torch.no_grad():
        assert_close("reloaded", out, loaded(x).logits, 1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("config", "family"),
    [
        (StateOffsetConfig(scale=0.07), "qwen3_5_text"),
        (InitialStateConfig(scale=0.07), "qwen3_5_text"),
        (StateOffsetConfig(variant="y", scale=0.5), "olmo_hybrid"),
        (InitialStateConfig(scale=0.65), "bamba"),  # the SSD mixers take it too
    ],
)
def test_scale_applies_at_inference_only(config, family):
    clean = tiny_gdn(family) if family in GDN_FAMILIES else tiny_hybrid(family)
    model = get_peft_model(copy.deepcopy(clean), config)
    perturb(model)
    hook = next(iter(model.adapter_modules().values()))
    x = ids(length=9)
    with torch.no_grad():
        model.eval()
        scaled = model(x).logits
        alpha, hook.scale = hook.scale, 1.0
        full = model(x).logits
        hook.scale = alpha
        model.train()
        trained = model(x).logits  # no dropout in these models: only the scale differs
    assert_close("training is unscaled", full, trained, 1e-6, atol=1e-6)
    assert (scaled - full).abs().max() > 1e-4
    hook.scale_in_training = True
    with torch.no_grad():
        assert_close("scale in training", scaled, model(x).logits, 1e-6, atol=1e-6)


def test_scale_must_be_positive():
    with pytest.raises(ValueError, match="StateOffsetConfig.scale must be a positive number"):
        StateOffsetConfig(scale=0)
    with pytest.raises(ValueError, match="InitialStateConfig.scale_in_training must be a bool"):
        InitialStateConfig(scale_in_training="yes")


@pytest.mark.parametrize("family", GDN_FAMILIES)
def test_contract_names_the_missing_attribute(family):
    from ssmtune.models.hybrid import MIXER_BUILDERS

    host = next(m for m in tiny_gdn_hf(family).modules() if type(m).__name__ in MIXER_BUILDERS)
    builder = MIXER_BUILDERS[type(host).__name__]
    del host.conv1d
    with pytest.raises(ValueError, match=rf"{family}.*transformers .*no attribute 'conv1d'"):
        builder(host)


def test_bf16_forward_follows_fp32():
    hf = tiny_gdn_hf("qwen3_5_text")
    model = get_peft_model(from_transformers(copy.deepcopy(hf)), StateOffsetConfig())
    perturb(model)
    x = ids(length=21)
    with torch.no_grad():
        ref = model(x).logits
        out = model.to(torch.bfloat16)(x).logits
    assert out.dtype == torch.bfloat16
    assert_close("bf16", ref, out.float(), 3e-2)


def test_saved_adapter_keeps_its_scale(tmp_path):
    clean = tiny_gdn("qwen3_5_text")
    model = get_peft_model(copy.deepcopy(clean), InitialStateConfig(scale=0.07))
    perturb(model)
    x = ids()
    with torch.no_grad():
        out = model.eval()(x).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(clean, tmp_path)
    with torch.no_grad():
        assert_close("reloaded with its scale", out, loaded.eval()(x).logits, 1e-6, atol=1e-6)
