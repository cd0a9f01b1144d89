"""State-based PEFT on transformers' hybrid models: the generic checks over (method, family)."""

from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from _hybrid import (
    FAMILIES,
    check_decode_matches_forward,
    check_identity_at_init,
    check_rows_match_alone,
    check_trains_only_adapters,
    ids,
    tiny_hf,
    tiny_hybrid,
)

from ssmtune import (
    BitFitConfig,
    FullConfig,
    InitialStateConfig,
    LoraConfig,
    PartialConfig,
    PrefixTuningConfig,
    StateOffsetConfig,
    get_peft_model,
    load_adapter,
)
from ssmtune.core.targets import iter_mixers
from ssmtune.ops.testing import assert_close

sys.path.insert(0, str(Path(__file__).parents[1] / "methods"))
from _peft_cases import perturb


def _mlp_out(family: str) -> str:
    return "output_linear" if family == "granitemoehybrid" else "down_proj"


@dataclass(frozen=True)
class Case:
    id: str
    make: object  # family -> config(s)
    identity_at_init: bool = True
    state_count: bool = False  # one parameter per element of the recurrent state


CASES = [
    Case("state_offset_h", lambda f: StateOffsetConfig(), state_count=True),
    Case("state_offset_y", lambda f: StateOffsetConfig(variant="y")),
    Case("initial_state", lambda f: InitialStateConfig(), state_count=True),
    Case("initial_state_conv", lambda f: InitialStateConfig(conv_state=True)),
    Case("prefix", lambda f: PrefixTuningConfig(num_virtual_tokens=3), identity_at_init=False),
    Case("lora_mixer", lambda f: LoraConfig(r=2, target_modules=["in_proj.x", "in_proj.B", "in_proj.dt", "out_proj"])),
    Case("lora_attn_mlp", lambda f: LoraConfig(r=2, target_modules=["q_proj", "v_proj", _mlp_out(f)])),
    Case("dora", lambda f: LoraConfig(r=2, use_dora=True, target_modules=["in_proj.z", "out_proj", "o_proj"])),
    Case("bitfit", lambda f: BitFitConfig()),
    Case("partial", lambda f: PartialConfig()),
    Case("full", lambda f: FullConfig()),
]
PARAMS = [(c, f) for c in CASES for f in FAMILIES]
IDS = [f"{c.id}-{f}" for c, f in PARAMS]


def _setup(case: Case, family: str, *, perturbed: bool = True):
    base = tiny_hybrid(family)
    clean = copy.deepcopy(base)
    model = get_peft_model(base, case.make(family))
    if perturbed:
        perturb(model)
    return clean, model


@pytest.mark.parametrize(("case", "family"), PARAMS, ids=IDS)
def test_identity_at_init_and_counts(case, family):
    clean, model = _setup(case, family, perturbed=False)
    check_identity_at_init(clean, model, case.identity_at_init)
    if case.state_count:
        states = sum(math.prod(t.mixer.state_shape) for t in iter_mixers(model.base_model))
        assert model.trainable_parameters() == states


@pytest.mark.parametrize(("case", "family"), PARAMS, ids=IDS)
def test_trains_only_adapters_and_changes_output(case, family):
    check_trains_only_adapters(*_setup(case, family, perturbed=False))


@pytest.mark.parametrize(("case", "family"), PARAMS, ids=IDS)
def test_decode_matches_forward(case, family):
    check_decode_matches_forward(_setup(case, family)[1])


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip_and_other_base(family, tmp_path):
    case = CASES[0]
    clean, model = _setup(case, family)
    model.add_adapter("lora", LoraConfig(r=2, target_modules=["out_proj", "q_proj"]))
    x = ids()
    with torch.no_grad():
        out = model(x).logits
    model.save_adapter(tmp_path / "h")
    loaded = load_adapter(copy.deepcopy(clean), tmp_path / "h")
    with torch.no_grad():
        assert_close("reloaded", out, loaded(x).logits, 1e-6, atol=1e-6)
    assert loaded.trainable_parameters() == 0
    other = "bamba" if family != "bamba" else "zamba2"
    with pytest.raises(ValueError, match="different base model"):
        load_adapter(tiny_hybrid(other), tmp_path / "h")
    with pytest.raises(ValueError, match="different base model.*mamba_d_state|ssm_state_size|mamba_d_state"):
        load_adapter(tiny_hybrid(family, **_bigger_state(family)), tmp_path / "h")


def _bigger_state(family: str) -> dict:
    key = {"nemotron_h": "ssm_state_size"}.get(family, "mamba_d_state")
    return {key: 8}


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_on_out_proj_acts(family):
    """LoRA on the mixer's out_proj changes the output: no fused path bypasses it."""
    clean, model = _setup(Case("lora", lambda f: LoraConfig(r=2, target_modules=["out_proj"])), family)
    model.train()
    x = ids()
    assert (model(x).logits - clean.train()(x).logits).abs().max() > 1e-3  # training mode: the host's fused branch


ROW_ADAPTERS = {
    "h": StateOffsetConfig(),
    "y": StateOffsetConfig(variant="y"),
    "h0": InitialStateConfig(conv_state=True),
    "prefix": PrefixTuningConfig(num_virtual_tokens=2),
    "lora": LoraConfig(r=2, target_modules=["in_proj.x", "out_proj", "q_proj"]),
}
ROWS = ["h", None, "y", "h0", "prefix", "lora", "h"]


def _routed(family: str):
    peft = get_peft_model(tiny_hybrid(family), ROW_ADAPTERS["h"], adapter_name="h")
    for name, cfg in list(ROW_ADAPTERS.items())[1:]:
        peft.add_adapter(name, cfg)
    for name in ROW_ADAPTERS:
        peft.set_adapter(name)
        perturb(peft)
    return peft


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_adapters_per_row(family):
    check_rows_match_alone(_routed(family), ROWS)


def test_layer_selection_and_errors():
    model = tiny_hybrid("nemotron_h", hybrid_override_pattern="M*M-")
    assert [t.layer for t in iter_mixers(model)] == [0, 2]
    peft = get_peft_model(model, StateOffsetConfig(layers=[2]))
    assert list(peft.adapter_modules()) == ["model.layers.2.mixer.state_offset_h"]
    with pytest.raises(ValueError, match=r"layer indices \[1\] hold no recurrent mixer"):
        get_peft_model(tiny_hybrid("bamba"), StateOffsetConfig(layers=[1]))
    with pytest.raises(ValueError, match=r"\['gate_proj'\] match no Linear"):
        get_peft_model(tiny_hybrid("granitemoehybrid"), LoraConfig(target_modules=["gate_proj"]))
    # transformers' own model: get_peft_model swaps the mixers in first
    raw = tiny_hf("bamba")
    assert get_peft_model(raw, StateOffsetConfig()).trainable_parameters() == 8 * 16 * 16
    assert len(iter_mixers(raw)) == 1
    from transformers import AutoModelForCausalLM, LlamaConfig

    llama = AutoModelForCausalLM.from_config(
        LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    )
    with pytest.raises(ValueError, match="LlamaForCausalLM has no mixers"):
        get_peft_model(llama, StateOffsetConfig())


@pytest.mark.parametrize("family", ["falcon_h1", "zamba2"])
def test_merge_and_unload(family):
    clean = tiny_hybrid(family)
    configs = [LoraConfig(r=2, target_modules=["in_proj.x", "out_proj", "q_proj"], use_dora=True), BitFitConfig()]
    model = get_peft_model(copy.deepcopy(clean), configs)
    perturb(model)
    x = ids()
    with torch.no_grad():
        out = model(x).logits
        merged = model.merge_and_unload()
        assert type(merged) is type(clean) and sorted(merged.state_dict()) == sorted(clean.state_dict())
        assert_close("merged", out, merged(x).logits, 1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cannot be merged"):
        get_peft_model(tiny_hybrid(family), StateOffsetConfig()).merge_and_unload()


def test_prompt_tuning_refuses_hybrids():
    from ssmtune import PromptTuningConfig

    with pytest.raises(ValueError, match="PromptTuningConfig needs an ssmtune Mamba / Mamba-2 model"):
        get_peft_model(tiny_hybrid("bamba"), PromptTuningConfig(num_virtual_tokens=2))
