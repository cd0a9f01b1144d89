"""Additional-scan (docs/methods.md §5.4): init values, placement of the new rows, equality with an N + n' model,
decode with an N + n' cache, counts, Mamba-2 refusal."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _peft_cases import VOCAB, decode_logits, perturb, tiny_config, tiny_model
from test_bitfit import meta_model, real_empty  # noqa: F401  (fixture)

from ssmtune import AdditionalScanConfig, get_peft_model
from ssmtune.models import InferenceCache, causal_lm_for
from ssmtune.ops.testing import assert_close

N, R, D, EXTRA = 5, 3, 32, 3  # the tiny Mamba-1 of _peft_cases


def _ids(length: int = 8):
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(0))


def _extras(model, layer: int = 0):
    mods = model.adapter_modules()
    prefix = f"backbone.layers.{layer}.mixer"
    return mods[f"{prefix}.A_log.additional_scan"], mods[f"{prefix}.x_proj.weight.additional_scan"]


@pytest.mark.parametrize(
    ("init", "expected"),
    [
        ("s4d", [math.log(N + j) for j in range(1, EXTRA + 1)]),  # S4D-real continued: log 6, log 7, log 8
        ("reference", [float(N)] * EXTRA),  # the reference's raw value N (pitfall 4)
    ],
)
def test_init_values(init, expected):
    base = tiny_model("m1")
    model = get_peft_model(base, AdditionalScanConfig(n_states=EXTRA, init=init))
    cols, rows = _extras(model)
    assert_close("A_log+", torch.tensor(expected).expand(D, EXTRA), cols.A_log_extra, 0, atol=1e-6)
    assert torch.equal(rows.W_C_extra, torch.zeros(EXTRA, D))
    bound = 1 / math.sqrt(D)  # Kaiming-uniform(a=√5), nn.Linear's default
    assert rows.W_B_extra.abs().max() <= bound and rows.W_B_extra.abs().min() > 0


def test_copy_last_init():
    base = tiny_model("m1")
    last = base.backbone.layers[0].mixer.A_log[:, -1:].detach().clone()
    model = get_peft_model(base, AdditionalScanConfig(n_states=EXTRA, init="copy_last"))
    assert torch.equal(_extras(model)[0].A_log_extra, last.expand(D, EXTRA))


def test_layout_and_equality_with_a_larger_model():
    base = tiny_model("m1")
    clean = copy.deepcopy(base)
    model = get_peft_model(base, AdditionalScanConfig(n_states=EXTRA))
    perturb(model)
    mixer, ref_mixer = base.backbone.layers[1].mixer, clean.backbone.layers[1].mixer
    cols, rows = _extras(model, 1)
    w, w0 = mixer.x_proj.weight, ref_mixer.x_proj.weight  # [R + 2(N+n'), D], [R + 2N, D]
    assert mixer.A_log.shape == (D, N + EXTRA) and w.shape == (R + 2 * (N + EXTRA), D)
    assert torch.equal(mixer.A_log[:, :N], ref_mixer.A_log) and torch.equal(mixer.A_log[:, N:], cols.A_log_extra)
    assert torch.equal(w[: R + N], w0[: R + N]) and torch.equal(w[R + N : R + N + EXTRA], rows.W_B_extra)
    assert torch.equal(w[R + N + EXTRA : R + 2 * N + EXTRA], w0[R + N :]) and torch.equal(w[-EXTRA:], rows.W_C_extra)
    # oracle: a plain model with d_state = N + n' holding the concatenated weights computes the same logits
    big = causal_lm_for(tiny_config("m1", d_state=N + EXTRA)).eval()
    state = {k: v for k, v in clean.state_dict().items()}
    for i in range(2):
        m = base.backbone.layers[i].mixer
        state[f"backbone.layers.{i}.mixer.A_log"] = m.A_log.detach()
        state[f"backbone.layers.{i}.mixer.x_proj.weight"] = m.x_proj.weight.detach()
    big.load_state_dict(state)
    assert_close("N + n' model", big(_ids()).logits, model(_ids()).logits, 1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["ref", "auto"])
def test_decode_with_extended_cache(backend):
    base = tiny_model("m1")
    model = get_peft_model(base, AdditionalScanConfig(n_states=EXTRA))
    model.backend = backend
    perturb(model)
    ids = _ids(9)
    full = model(ids).logits
    cache = InferenceCache.allocate([m for _, m in base.mixers()], batch_size=2)
    assert cache[0].ssm_state.shape == (2, D, N + EXTRA)
    outs = [model(ids[:, :5], cache=cache).logits]
    outs += [model(ids[:, t : t + 1], cache=cache).logits for t in range(5, 9)]
    assert cache[1].ssm_state.shape == (2, D, N + EXTRA)
    assert_close("decode (allocated cache)", full, torch.cat(outs, 1), 1e-4, atol=1e-5)
    assert_close("decode (lazy cache)", full, decode_logits(model, ids, prefill=4), 1e-4, atol=1e-5)


def test_reference_init_freezes_the_extra_states():
    """Pitfall 4 at the paper's N = 16: A⁺ = −e^16, so the extra state forgets at once and A_log⁺ gets no gradient."""
    base = tiny_model("m1", d_state=16)
    model = get_peft_model(base, AdditionalScanConfig(n_states=2, init="reference"))
    perturb(model)  # a non-zero W_C⁺ makes the extra states visible
    with torch.no_grad():
        for m in model.adapter_modules().values():
            if hasattr(m, "A_log_extra"):
                m.A_log_extra.fill_(16.0)
    model(_ids(), labels=_ids()).loss.backward()
    cols = _extras(model)[0]
    assert cols.A_log_extra.grad.abs().max() == 0
    assert _extras(model)[1].W_C_extra.grad.abs().max() > 0


@pytest.mark.usefixtures("real_empty")
@pytest.mark.parametrize(("size", "count"), [("130m", 884_736), ("1.4b", 4_718_592), ("2.8b", 7_864_320)])
def test_count(size, count):
    assert get_peft_model(meta_model("m1", size), AdditionalScanConfig()).trainable_parameters() == count


def test_mamba2_and_bad_config_raise():
    base = tiny_model("m2")
    with pytest.raises(ValueError, match="Mamba-2 is not supported"):
        get_peft_model(base, AdditionalScanConfig())
    assert not hasattr(base.backbone.layers[0].mixer, "parametrizations")
    with pytest.raises(ValueError, match="n_states must be a positive int, got 0"):
        AdditionalScanConfig(n_states=0)
    with pytest.raises(ValueError, match="'log'"):
        AdditionalScanConfig(init="log")
