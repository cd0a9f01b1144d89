"""transformers' generate on hybrid models with ssmtune adapters active: greedy and beam search through the cache
equal full forwards; per-row adapters; left padding leaves initial states at each row's first real token."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from _gdn import GDN_FAMILIES, MIXER_LINEARS
from _hybrid import FAMILIES, argmax_continuation, ids, tiny_hybrid

from ssmtune import InitialStateConfig, LoraConfig, PrefixTuningConfig, StateOffsetConfig, get_peft_model
from ssmtune.ops.testing import assert_close

sys.path.insert(0, str(Path(__file__).parents[1] / "methods"))
from _peft_cases import perturb

NEW = 6
GEN = {"max_new_tokens": NEW, "min_new_tokens": NEW, "pad_token_id": 0}


def _mixer_lora(family: str) -> list[str]:
    """A Linear of the recurrent mixer (the Gated DeltaNets name theirs)."""
    return MIXER_LINEARS[family][-1:] if family in MIXER_LINEARS else ["out_proj"]


def _adapted(family: str):
    configs = [
        StateOffsetConfig(),
        InitialStateConfig(conv_state=True),
        LoraConfig(r=2, target_modules=_mixer_lora(family)),
    ]
    model = get_peft_model(tiny_hybrid(family), configs)
    perturb(model)
    return model.eval()


@pytest.mark.parametrize("family", FAMILIES + GDN_FAMILIES)
def test_greedy_and_beam_generate(family):
    model = _adapted(family)
    x = ids(batch=2, length=7)
    with torch.no_grad():
        greedy = model.generate(x, do_sample=False, **GEN)
        assert torch.equal(greedy, argmax_continuation(model, x, NEW))
        beams = model.generate(x, do_sample=False, num_beams=3, **GEN)
        assert torch.equal(beams, model.generate(x, do_sample=False, num_beams=3, use_cache=False, **GEN))
        with model.disable_adapters():
            base = model.generate(x, do_sample=False, **GEN)
    assert not torch.equal(base, greedy)  # the adapters act during generate


@pytest.mark.parametrize("family", ["bamba", "falcon_h1", "qwen3_5_text", "kimi_linear"])
def test_generate_with_adapters_per_row(family):
    model = get_peft_model(tiny_hybrid(family), StateOffsetConfig(), adapter_name="h")
    model.add_adapter("h0", InitialStateConfig(conv_state=True))
    model.add_adapter("prefix", PrefixTuningConfig(num_virtual_tokens=2))
    lora = ["in_proj.x", "out_proj"] if family in FAMILIES else MIXER_LINEARS[family][:2]
    model.add_adapter("lora", LoraConfig(r=2, target_modules=[*lora, "q_proj"]))
    names = ["h", "h0", "prefix", "lora"]
    for n in names:
        model.set_adapter(n)
        perturb(model)
    rows = ["h0", None, "lora", "h", "prefix"]
    x = ids(batch=len(rows), length=7)
    with torch.no_grad():
        for beams in (1, 2):
            mixed = model.generate(x, adapter_names=rows, do_sample=False, num_beams=beams, **GEN)
            for b, name in enumerate(rows):
                alone = model.generate(x[b : b + 1], adapter_names=[name], do_sample=False, num_beams=beams, **GEN)
                assert torch.equal(mixed[b], alone[0]), (beams, b, name)


@pytest.mark.parametrize("family", FAMILIES + GDN_FAMILIES)
def test_left_padding_keeps_initial_state(family):
    """A left-padded row gives the logits and the continuation of the same row without padding."""
    model = _adapted(family)
    x = ids(batch=2, length=7)
    padded = torch.cat([torch.zeros(2, 4, dtype=x.dtype), x], dim=1)
    padded[1, :4] = x[1, :4]  # row 1: 11 real tokens
    padded[1, 4:] = ids(batch=1, length=7, seed=9)[0]
    mask = torch.ones_like(padded)
    mask[0, :4] = 0
    with torch.no_grad():
        alone = model(x[:1]).logits[0]
        got = model(padded, attention_mask=mask).logits[0, 4:]
        assert_close("left padded row", alone, got, 1e-5, atol=1e-5)
        gen = model.generate(padded, attention_mask=mask, do_sample=False, **GEN)
        assert torch.equal(gen[0, 4:], model.generate(x[:1], do_sample=False, **GEN)[0])
        assert torch.equal(gen[1], model.generate(padded[1:], do_sample=False, **GEN)[0])


@pytest.mark.parametrize("family", ["bamba", "falcon_h1"])
def test_state_offset_never_enters_the_cache(family):
    """h' acts on the read-out only: the first mixer's cached states are the base model's."""
    model = get_peft_model(tiny_hybrid(family), StateOffsetConfig())
    perturb(model)
    x = ids(length=9)
    with torch.no_grad():
        adapted = model(x, use_cache=True).past_key_values
        with model.disable_adapters():
            base = model(x, use_cache=True).past_key_values
            plain = model(x).logits
        assert (model(x).logits - plain).abs().max() > 1e-3
    assert torch.equal(adapted.get_recurrent_state(0), base.get_recurrent_state(0))
    assert torch.equal(adapted.get_conv_state(0), base.get_conv_state(0))
