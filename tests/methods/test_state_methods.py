"""Maths of State-offset Tuning (h, y) and Initial State Tuning against plain sequential mixers (docs/methods.md §4.1-4.3, §8)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _oracles import mamba1_mixer, mamba2_mixer
from _peft_cases import perturb, tiny_model

from ssmtune import InitialStateConfig, StateOffsetConfig, get_peft_model
from ssmtune.ops.testing import assert_close

KINDS = {
    "h": StateOffsetConfig(),
    "y": StateOffsetConfig(variant="y"),
    "h_lowrank": StateOffsetConfig(rank=2, r_ratio=2),
    "h0": InitialStateConfig(),
    "h0_conv0": InitialStateConfig(conv_state=True),
}


def _peft(arch: str, config, scale: float = 0.3):
    model = get_peft_model(tiny_model(arch).double(), config)
    perturb(model, scale)
    return model


@pytest.mark.parametrize("backend", ["ref", "auto"])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("arch", ["m1", "m2"])
def test_state_hooks_match_sequential_oracle(arch, kind, backend):
    model = _peft(arch, KINDS[kind])
    model.backend = backend
    mixer = model.base_model.backbone.layers[1].mixer
    (hook,) = mixer.state_hooks.values()
    u = torch.randn(2, 9, 16, dtype=torch.float64)
    kw = {
        "h0": hook.initial_state(2),
        "conv0": hook.initial_conv_state(2),
        "h_off": hook.state_offset(),
        "y_off": hook.output_offset(),
    }
    assert sum(v is not None for v in kw.values()) == (2 if kind == "h0_conv0" else 1)
    with torch.no_grad():
        ref = mamba1_mixer(mixer, u, **kw)[0] if arch == "m1" else mamba2_mixer(mixer, u, **kw)
        base = mamba1_mixer(mixer, u)[0] if arch == "m1" else mamba2_mixer(mixer, u)
        out = mixer(u)
    assert (ref - base).abs().max() > 1e-3  # the adapter does something
    assert_close(f"{arch}-{kind}", ref, out, 1e-5)


def test_lowrank_offset_shape_and_count():
    model = get_peft_model(tiny_model("m1"), StateOffsetConfig(rank=2, r_ratio=2))
    hook = next(iter(model.base_model.backbone.layers[0].mixer.state_hooks.values()))
    assert hook.offset_B.shape == (16, 2) and hook.offset_A.shape == (2, 10)  # D/ρ = 32/2, N·ρ = 5·2
    assert hook.state_offset().shape == (32, 5)
    assert model.trainable_parameters() == 2 * 2 * (16 + 10)  # n_layer · r · (D/ρ + N·ρ)
    with pytest.raises(ValueError, match="r_ratio=3"):
        get_peft_model(tiny_model("m1"), StateOffsetConfig(rank=2, r_ratio=3))


def test_mamba1_h_offset_equals_dense_skip():
    """§5.3: C_tᵀh' = (h' W_C x_t), so the h-offset model is the base model with skip D_skip + h'W_C."""
    model = _peft("m1", StateOffsetConfig())
    mixer = model.base_model.backbone.layers[0].mixer
    h_off = next(iter(mixer.state_hooks.values())).h_off.detach().double()  # [D, N]
    n = mixer.A_log.shape[1]
    w_c = mixer.x_proj.weight[-n:].detach()  # [N, D], the effective x_proj_C weight
    dense = torch.diag(mixer.D.detach()) + h_off @ w_c  # [D, D], rank(h'W_C) <= N
    u = torch.randn(2, 11, 16, dtype=torch.float64)
    with torch.no_grad():
        oracle = mamba1_mixer(mixer, u, dense_skip=dense)[0]
        assert_close("oracle vs offset oracle", oracle, mamba1_mixer(mixer, u, h_off=h_off)[0], 1e-12, atol=1e-12)
        assert_close("dense skip", oracle, mixer(u), 1e-5)


def test_initial_state_decays_but_offset_does_not():
    """h0 adds C_tᵀ exp(A Λ_t) h0 (§5.2), which vanishes as Λ_t grows; h' adds C_tᵀh' at every t."""
    torch.manual_seed(0)
    base = tiny_model("m1").double()
    mixer = base.backbone.layers[0].mixer
    with torch.no_grad():
        mixer.dt_proj.weight.zero_()
        mixer.dt_proj.bias.fill_(math.log(math.expm1(0.5)))  # Δ = 0.5 everywhere
    u = torch.randn(1, 40, 16, dtype=torch.float64)
    with torch.no_grad():
        y0, pieces = mamba1_mixer(mixer, u)
    gate = torch.nn.functional.silu(pieces["z"])  # [B, L, D]
    lam = pieces["delta"].cumsum(dim=1)  # Λ_t [B, L, D]
    contrib = {}
    for name, cfg in [("h0", InitialStateConfig()), ("h_off", StateOffsetConfig())]:
        model = get_peft_model(copy.deepcopy(base), cfg)
        perturb(model, 1.0)
        m = model.base_model.backbone.layers[0].mixer
        t = next(iter(m.state_hooks.values())).parameters().__next__().detach().double()  # h0 or h' [D, N]
        with torch.no_grad():
            diff = m(u) - y0  # [B, L, d_model]
            if name == "h0":
                decay = torch.exp(pieces["A"] * lam[..., None])  # [B, L, D, N]
                expected = torch.einsum("bln,bldn,dn->bld", pieces["C"], decay, t)
            else:
                expected = torch.einsum("bln,dn->bld", pieces["C"], t)
            expected = m.out_proj(gate * expected)  # out_proj is linear without bias
        assert_close(f"{name} superposition", expected, diff, 1e-5, atol=1e-9)
        contrib[name] = diff.norm(dim=-1)[0]  # [L]
    assert contrib["h0"][-1] < 1e-6 * contrib["h0"][0]
    assert contrib["h_off"][-5:].mean() > 0.1 * contrib["h_off"][:5].mean()


@pytest.mark.parametrize("conv_state", [False, True])
def test_initial_state_acts_at_first_real_token_under_left_padding(conv_state):
    """Padded positions take a zero step and the initial conv window moves right: a left-padded row is the row alone."""
    model = get_peft_model(tiny_model("m2"), InitialStateConfig(conv_state=conv_state))
    perturb(model)
    ids = torch.randint(0, 37, (2, 7), generator=torch.Generator().manual_seed(2))
    padded = torch.cat([torch.zeros(2, 3, dtype=ids.dtype), ids], dim=1)
    mask = torch.ones_like(padded)
    mask[0, :3] = 0
    padded[1, :3] = ids[1, :3]
    with torch.no_grad():
        alone = model(ids[:1]).logits[0]
        got = model(padded, attention_mask=mask).logits
    assert_close("left padded", alone, got[0, 3:], 1e-5, atol=1e-6)
    assert_close("unpadded row", model(padded[1:]).logits[0], got[1], 1e-5, atol=1e-6)


def test_conv0_at_first_token_reference():
    from ssmtune.models.mamba2 import conv0_at_first_token

    x = torch.randn(3, 5, 6)  # [B, C, L]
    conv0 = torch.randn(5, 3)  # [C, K-1]
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]])
    out, init = conv0_at_first_token(x, conv0, mask)
    for b in range(3):
        pads = int((mask[b] == 0).sum())
        # the plain construction: zeros, then conv0 right before the first real token, then the real tokens
        seq = torch.cat([torch.zeros(5, pads), conv0, x[b, :, pads:]], dim=1)
        torch.testing.assert_close(torch.cat([init[b], out[b]], dim=1), seq)
