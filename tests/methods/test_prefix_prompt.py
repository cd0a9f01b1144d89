"""Prefix-Tuning is real per-layer virtual tokens and equals Initial State (+ conv state) Tuning (docs/methods.md §4.4);
Prompt Tuning prepends k embeddings and extends mask and labels (§4.5)."""

from __future__ import annotations

import copy

import pytest
import torch
from _peft_cases import VOCAB, decode_logits, tiny_model

from ssmtune import InitialStateConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from ssmtune.ops.testing import assert_close


def _ids(length: int = 9) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("num_tokens", [1, 5])
@pytest.mark.parametrize("arch", ["m1", "m2"])
def test_prefix_is_virtual_tokens_at_every_layer(arch, num_tokens):
    """Run every block on [P^l ; real activations] by hand and keep the real positions: same logits as the hook."""
    model = get_peft_model(tiny_model(arch), PrefixTuningConfig(num_virtual_tokens=num_tokens, init_std=0.5))
    ids = _ids()
    out = model(ids).logits
    lm = model.base_model
    prefixes = [h.prefix for _, m in lm.mixers() for h in m.state_hooks.values()]
    with model.disable_adapter(), torch.no_grad():
        hidden = lm.backbone.embeddings(ids)
        for block, prefix in zip(lm.backbone.layers, prefixes):
            full = torch.cat([prefix.to(hidden.dtype).expand(2, -1, -1), hidden], dim=1)  # [B, M+L, d_model]
            hidden = block(full)[:, num_tokens:]
        ref = lm.lm_head(lm.backbone.norm_f(hidden)).float()
        base = lm(ids).logits
    assert (ref - base).abs().max() > 1e-3
    assert_close("prefix", ref, out, 1e-5)


@pytest.mark.parametrize("arch", ["m1", "m2"])
def test_prefix_equals_initial_state_with_conv(arch):
    base = tiny_model(arch)
    clean = copy.deepcopy(base)
    prefix = get_peft_model(base, PrefixTuningConfig(num_virtual_tokens=4, init_std=0.5))
    init = get_peft_model(clean, InitialStateConfig(conv_state=True))
    for (_, mp), (_, mi) in zip(prefix.base_model.mixers(), init.base_model.mixers()):
        (hp,), (hi,) = mp.state_hooks.values(), mi.state_hooks.values()
        h0, conv0 = hp.prefix_states()
        with torch.no_grad():
            hi.h0.copy_(h0)
            hi.conv0.copy_(conv0)
    ids = _ids()
    assert_close("prefix == (h0, conv0)", init(ids).logits, prefix(ids).logits, 1e-5)
    # conv0 matters: without it the two differ
    with torch.no_grad():
        for _, mi in init.base_model.mixers():
            next(iter(mi.state_hooks.values())).conv0.zero_()
    assert (init(ids).logits - prefix(ids).logits).abs().max() > 1e-4


def test_prefix_of_zero_activations_is_not_identity():
    """norm(0) = 0, but SiLU(conv bias) ≠ 0 enters the scan, so a zero prefix still moves the state."""
    model = get_peft_model(tiny_model("m1"), PrefixTuningConfig(num_virtual_tokens=2, init_std=0.0))
    ids = _ids()
    with model.disable_adapter():
        base = model(ids).logits
    assert (model(ids).logits - base).abs().max() > 1e-4


@pytest.mark.parametrize("arch", ["m1", "m2"])
def test_prompt_prepends_embeddings(arch):
    model = get_peft_model(tiny_model(arch), PromptTuningConfig(num_virtual_tokens=3))
    lm = model.base_model
    ids = _ids()
    mask = torch.ones_like(ids)
    out = model(ids, attention_mask=mask, labels=ids)
    (hook,) = lm.input_hooks.values()
    embeds = torch.cat([hook.prompt.expand(2, -1, -1), lm.backbone.embeddings(ids)], dim=1)
    with model.disable_adapter():
        ref = lm(inputs_embeds=embeds, labels=torch.cat([torch.full((2, 3), -100), ids], dim=1))
    assert out.logits.shape == (2, ids.shape[1], lm.config.vocab_size)
    assert_close("prompt logits", ref.logits[:, 3:], out.logits, 1e-6)
    assert_close("prompt loss", ref.loss, out.loss, 1e-6)
    assert_close("prompt decode", out.logits, decode_logits(model, ids, prefill=4), 1e-5)


def test_prompt_vocab_init_copies_embeddings():
    model = get_peft_model(tiny_model("m1"), PromptTuningConfig(num_virtual_tokens=4, init="vocab"))
    lm = model.base_model
    (hook,) = lm.input_hooks.values()
    emb = lm.backbone.embeddings.weight
    for row in hook.prompt:
        assert (emb - row).abs().sum(-1).min() == 0
    with pytest.raises(ValueError, match="layers_to_transform must be None"):
        PromptTuningConfig(num_virtual_tokens=2, layers_to_transform=[0])
