"""The generic parts of the framework that the built-in methods do not all use: parameter deltas through
``parametrize_param`` (plain and shape-extending), registration of a new method, merging of parameter deltas."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from _peft_cases import VOCAB, decode_logits, perturb, tiny_model
from torch import nn

from ssmtune import AdapterConfig, PeftModel, get_peft_model, register_method
from ssmtune.core.inject import ParamDelta, parametrize_param
from ssmtune.core.targets import iter_mixers
from ssmtune.ops.testing import assert_close


@dataclass(kw_only=True)
class _BiasDeltaConfig(AdapterConfig):
    """Test method: b' = b + δ on conv1d.bias and dt_proj.bias (BitFit-like)."""

    method: ClassVar[str] = "_test_bias_delta"


class _AddDelta(ParamDelta):
    def __init__(self, like: torch.Tensor) -> None:
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(like.shape, device=like.device))

    def transform(self, X: torch.Tensor) -> torch.Tensor:
        return X + self.delta.to(X.dtype)


def _inject_bias(model, config, *, adapter_name):
    out = {}
    for t in iter_mixers(model, config.layers_to_transform):
        for mod in ("conv1d", "dt_proj"):
            module = getattr(t.mixer, mod)
            out[f"{t.path}.{mod}.bias_delta"] = parametrize_param(module, "bias", _AddDelta(module.bias))
    return out


@dataclass(kw_only=True)
class _ExtraStatesConfig(AdapterConfig):
    """Test method: one extra state column appended to A_log and matching x_proj B/C rows (shape-extending)."""

    method: ClassVar[str] = "_test_extra_states"


class _AppendColumns(ParamDelta):
    """A_log [D, N] -> [D, N+1]."""

    mergeable = False

    def __init__(self, like: torch.Tensor) -> None:
        super().__init__()
        self.extra = nn.Parameter(torch.zeros(like.shape[0], 1, device=like.device))

    def transform(self, X: torch.Tensor) -> torch.Tensor:
        return torch.cat([X, self.extra.to(X.dtype)], dim=1)


class _InsertRows(ParamDelta):
    """x_proj.weight [R+2N, D] -> [R+2(N+1), D]: new B row (random) and new C row (zero: identity at init)."""

    mergeable = False

    def __init__(self, like: torch.Tensor, n: int) -> None:
        super().__init__()
        self.n = n
        self.w_b = nn.Parameter(torch.randn(1, like.shape[1], device=like.device) * 0.1)
        self.w_c = nn.Parameter(torch.zeros(1, like.shape[1], device=like.device))

    def transform(self, X: torch.Tensor) -> torch.Tensor:
        r = X.shape[0] - 2 * self.n
        b_end = r + self.n
        return torch.cat([X[:b_end], self.w_b.to(X.dtype), X[b_end:], self.w_c.to(X.dtype)], dim=0)


def _inject_extra(model, config, *, adapter_name):
    out = {}
    for t in iter_mixers(model, config.layers_to_transform):
        n = t.mixer.A_log.shape[1]
        out[f"{t.path}.A_log.extra"] = parametrize_param(t.mixer, "A_log", _AppendColumns(t.mixer.A_log))
        lin = t.mixer.x_proj
        out[f"{t.path}.x_proj.extra"] = parametrize_param(lin, "weight", _InsertRows(lin.weight, n))
    return out


register_method(_BiasDeltaConfig, _inject_bias)
register_method(_ExtraStatesConfig, _inject_extra)


def _ids():
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))


def test_param_delta_trains_saves_and_merges(tmp_path):
    base = tiny_model("m1")
    clean = copy.deepcopy(base)
    model = get_peft_model(base, _BiasDeltaConfig())
    ids = _ids()
    assert_close("identity", clean(ids).logits, model(ids).logits, 0, atol=1e-6)
    assert model.trainable_parameters() == 2 * (32 + 32)
    perturb(model)
    out = model(ids).logits
    assert (out - clean(ids).logits).abs().max() > 1e-3
    with model.disable_adapter():
        assert_close("disabled", clean(ids).logits, model(ids).logits, 0, atol=1e-6)
    assert_close("decode", out, decode_logits(model, ids, prefill=4), 1e-4, atol=1e-5)
    model.save_pretrained(tmp_path)
    assert_close("reload", out, PeftModel.from_pretrained(copy.deepcopy(clean), tmp_path)(ids).logits, 1e-6, atol=1e-6)
    merged = model.merge_and_unload()
    assert [n for n, _ in merged.named_parameters()] == [n for n, _ in clean.named_parameters()]
    assert_close("merged", out, merged(ids).logits, 1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["ref", "auto"])
def test_shape_extending_parametrization(backend):
    base = tiny_model("m1")
    clean = copy.deepcopy(base)
    model = get_peft_model(base, [_ExtraStatesConfig(), _BiasDeltaConfig(layers_to_transform=[0])])
    model.backend = backend
    mixer = model.base_model.backbone.layers[0].mixer
    assert mixer.A_log.shape == (32, 6) and mixer.x_proj.weight.shape == (3 + 12, 32)
    ids = _ids()
    # W_C⁺ = 0: the extra state is invisible at init
    assert_close("identity", clean(ids).logits, model(ids).logits, 1e-6, atol=1e-6)
    perturb(model)
    out = model(ids).logits
    assert (out - clean(ids).logits).abs().max() > 1e-3
    assert_close("decode", out, decode_logits(model, ids, prefill=4), 1e-4, atol=1e-5)
    with model.disable_adapter():
        assert mixer.A_log.shape == (32, 5)
        assert_close("disabled", clean(ids).logits, model(ids).logits, 0, atol=1e-6)
    with pytest.raises(ValueError, match=r"methods \['_test_extra_states'\] cannot be merged"):
        model.merge_and_unload()
    model.delete_adapter("default")
    assert not hasattr(mixer, "parametrizations")
    assert_close("deleted", clean(ids).logits, model(ids).logits, 0, atol=1e-6)


def test_peft_model_backend_reaches_the_mixers():
    """``peft.backend = ...`` sets every mixer's backend (a plain attribute on the wrapper would reach none)."""
    model = get_peft_model(tiny_model("m1"), _BiasDeltaConfig(layers_to_transform=[0]))
    model.backend = "ref"
    assert model.backend == "ref" and {m.backend for _, m in model.base_model.mixers()} == {"ref"}
    with pytest.raises(ValueError, match="cuda-magic"):
        model.backend = "cuda-magic"
