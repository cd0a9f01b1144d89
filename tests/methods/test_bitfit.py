"""BitFit (docs/methods.md §5.3): bias deltas on conv1d / dt_proj (Mamba-2: dt_bias), counts, merge, validation."""

from __future__ import annotations

import copy

import pytest
import torch
from _peft_cases import VOCAB, perturb, tiny_model

from ssmtune import BitFitConfig, get_peft_model
from ssmtune.models import Mamba2Config, MambaConfig, causal_lm_for
from ssmtune.ops.testing import assert_close

SIZES = {"130m": (768, 24), "1.4b": (2048, 48), "2.8b": (2560, 64)}


@pytest.fixture
def real_empty(_poison_empty, monkeypatch):
    """The NaN-poisoning wrapper of tests/conftest.py defeats torch.device("meta"); unwrap it."""
    for name in ("empty", "empty_like"):
        monkeypatch.setattr(torch, name, getattr(getattr(torch, name), "__wrapped__", getattr(torch, name)))


def meta_model(arch: str, size: str):
    d_model, n_layer = SIZES[size]
    cls = MambaConfig if arch == "m1" else Mamba2Config
    with torch.device("meta"):
        return causal_lm_for(cls(d_model=d_model, n_layer=n_layer), init=False)


@pytest.mark.usefixtures("real_empty")
@pytest.mark.parametrize(
    ("arch", "size", "count"),
    [
        ("m1", "130m", 2 * 24 * 1536),  # 73,728 = 0.06% (docs/methods.md §6)
        ("m1", "1.4b", 2 * 48 * 4096),
        ("m1", "2.8b", 2 * 64 * 5120),
        ("m2", "130m", 24 * ((1536 + 2 * 128) + 1536 // 64)),  # conv1d.bias [D+2GN] + dt_bias [H]
    ],
)
def test_count(arch, size, count):
    model = get_peft_model(meta_model(arch, size), BitFitConfig())
    assert model.trainable_parameters() == count


@pytest.mark.parametrize("arch", ["m1", "m2"])
def test_bias_plus_delta_and_merge(arch):
    base = tiny_model(arch)
    clean = copy.deepcopy(base)
    model = get_peft_model(base, BitFitConfig())
    perturb(model)
    adapters = model.adapter_modules()
    dt_name = "dt_proj.bias" if arch == "m1" else "dt_bias"
    assert sorted({k.split("mixer.")[1] for k in adapters}) == sorted({"conv1d.bias.bitfit", f"{dt_name}.bitfit"})
    mixer, ref_mixer = base.backbone.layers[1].mixer, clean.backbone.layers[1].mixer
    conv_delta = adapters["backbone.layers.1.mixer.conv1d.bias.bitfit"].delta
    # every reader sees b + δ
    assert_close("conv bias", ref_mixer.conv1d.bias + conv_delta, mixer.conv1d.bias, 0, atol=0)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    out = model(ids).logits
    merged = model.merge_and_unload()
    assert_close("merged", out, merged(ids).logits, 1e-6, atol=1e-6)
    changed = {n for (n, p), q in zip(merged.named_parameters(), clean.parameters()) if not torch.equal(p, q)}
    assert changed == {f"backbone.layers.{i}.mixer.{b}" for i in range(2) for b in ("conv1d.bias", dt_name)}


def test_bf16_base_accumulates_in_fp32_delta():
    base = tiny_model("m1", dtype=torch.bfloat16)
    model = get_peft_model(base, BitFitConfig(layers_to_transform=[0]))
    delta = model.adapter_modules()["backbone.layers.0.mixer.dt_proj.bias.bitfit"].delta
    assert delta.dtype == torch.float32
    assert base.backbone.layers[0].mixer.dt_proj.bias.dtype == torch.bfloat16


def test_needs_conv_bias():
    base = tiny_model("m1", conv_bias=False)
    with pytest.raises(ValueError, match="conv_bias=False"):
        get_peft_model(base, BitFitConfig())
    assert not hasattr(base.backbone.layers[0].mixer.conv1d, "parametrizations")
