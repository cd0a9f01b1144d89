"""Hybrid checkpoints: load_model on folders written by transformers, supported / unsupported models, and the
contract with transformers (what the builders read; the cache API)."""

from __future__ import annotations

import copy

import pytest
import torch
from _hybrid import FAMILIES, ids, tiny_config, tiny_hf

import ssmtune
from ssmtune import from_transformers
from ssmtune.models.hybrid import (
    HYBRID_MODEL_TYPES,
    MIXER_BUILDERS,
    SSD_ATTRIBUTES,
    HostLayerCache,
    check_contract,
    hybrid_mixers,
)
from ssmtune.ops.testing import assert_close


@pytest.mark.parametrize("family", FAMILIES)
def test_load_model_from_save_pretrained(family, tmp_path):
    ref = tiny_hf(family)
    ref.save_pretrained(tmp_path)
    model = ssmtune.load_model(tmp_path)
    assert len(hybrid_mixers(model)) > 0 and not model.training
    x = ids()
    with torch.no_grad():
        assert_close("loaded", ref(x).logits, model(x).logits, 1e-5, atol=1e-5)
        assert model(x).past_key_values is None  # training forwards write no states into a cache
        out = model.generate(x, max_new_tokens=2, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
        assert out.past_key_values is not None  # generate still decodes with transformers' cache


def test_swapped_model_saves_for_transformers(tmp_path):
    """save_pretrained of a swapped model writes the host's keys: plain transformers reads it back."""
    from transformers import AutoModelForCausalLM

    model = from_transformers(tiny_hf("falcon_h1"))
    model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert not hybrid_mixers(back)
    x = ids()
    with torch.no_grad():
        assert_close("round trip", model(x).logits, back(x).logits, 1e-5, atol=1e-5)


def test_unsupported_models_list_what_is_supported(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("bamba")
    (tmp_path / "config.json").write_text(cfg.to_json_string().replace('"bamba"', '"jamba"'))
    with pytest.raises(ValueError, match=r"unknown model_type 'jamba'.*\['mamba', 'mamba2'\].*'falcon_h1'"):
        ssmtune.load_model(tmp_path)
    from transformers import LlamaConfig, Mamba2Config

    attn_only = AutoModelForCausalLM.from_config(
        LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    )
    with pytest.raises(ValueError, match=r"model type 'llama' has no supported recurrent mixer.*'bamba'.*BambaMixer"):
        from_transformers(attn_only)
    mamba2 = AutoModelForCausalLM.from_config(
        Mamba2Config(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_heads=2, head_dim=16, n_groups=1)
    )
    with pytest.raises(ValueError, match=r"unsupported recurrent mixers \['Mamba2Mixer'\].*ssmtune.load_model"):
        from_transformers(mamba2)


@pytest.mark.parametrize("family", FAMILIES)
def test_contract_with_transformers(family):
    """The attributes and the forward signature the builders read, for transformers' mixer of each family: a change
    in transformers fails here with the family and the attribute named."""
    model = tiny_hf(family)
    host = next(m for m in model.modules() if type(m).__name__ == HYBRID_MODEL_TYPES[family])
    assert type(host).__name__ in MIXER_BUILDERS
    check_contract(host)
    for name in ("A_log", "time_step_limit", "n_groups"):
        broken = copy.deepcopy(host)
        delattr(broken, name)
        with pytest.raises(
            ValueError, match=rf"{family} \({type(host).__name__}, transformers .*no attribute '{name}'"
        ):
            check_contract(broken)
    assert set(SSD_ATTRIBUTES) >= {"in_proj", "out_proj", "conv1d", "norm"}


def test_contract_names_a_changed_forward_and_cache():
    class Host(torch.nn.Module):
        def forward(self, hidden_states, cache_position=None):
            return hidden_states

    host = Host()
    for name in SSD_ATTRIBUTES:
        setattr(host, name, None)
    with pytest.raises(ValueError, match=r"forward no longer takes \['attention_mask', 'cache'\]"):
        check_contract(host)
    with pytest.raises(ValueError, match=r"lacks \['get_conv_state'.*ssmtune's hybrid mixers need transformers"):
        HostLayerCache(object(), 0, 4)


def test_pyproject_names_the_tested_range():
    from pathlib import Path

    from ssmtune.models.hybrid import TESTED_TRANSFORMERS

    text = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    assert f'"transformers{TESTED_TRANSFORMERS}"' in text


def test_version_range_check():
    from ssmtune.models.hybrid import _in_tested_range

    assert _in_tested_range("5.23.0") and _in_tested_range("5.25.1.dev0")
    assert not _in_tested_range("5.17.0") and not _in_tested_range("5.26.0") and not _in_tested_range("main")
