"""Trainable-parameter counts at the papers' model sizes, from configs only (meta device, no weights):
docs/methods.md §6."""

from __future__ import annotations

import pytest
import torch

from ssmtune import (
    InitialStateConfig,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    StateOffsetConfig,
    get_peft_model,
)
from ssmtune.models import Mamba2Config, MambaConfig, causal_lm_for


@pytest.fixture(autouse=True)
def _real_empty(_poison_empty, monkeypatch):
    """The NaN-poisoning wrapper of tests/conftest.py defeats torch.device("meta"); unwrap it here."""
    for name in ("empty", "empty_like"):
        monkeypatch.setattr(torch, name, getattr(getattr(torch, name), "__wrapped__", getattr(torch, name)))


def _meta_only(model) -> None:
    assert {p.device.type for p in model.parameters()} == {"meta"}


SIZES = {"130m": (768, 24), "1.4b": (2048, 48), "2.8b": (2560, 64)}


def _meta_model(arch: str, size: str):
    d_model, n_layer = SIZES[size]
    cfg = (
        MambaConfig(d_model=d_model, n_layer=n_layer)
        if arch == "m1"
        else Mamba2Config(d_model=d_model, n_layer=n_layer)
    )
    with torch.device("meta"):
        return causal_lm_for(cfg, init=False)


@pytest.mark.parametrize(
    ("arch", "size", "config", "count"),
    [
        ("m1", "130m", StateOffsetConfig(), 589_824),
        ("m1", "1.4b", StateOffsetConfig(), 3_145_728),
        ("m1", "2.8b", StateOffsetConfig(), 5_242_880),
        ("m1", "130m", StateOffsetConfig(variant="y"), 36_864),
        ("m1", "1.4b", StateOffsetConfig(variant="y"), 196_608),
        ("m1", "2.8b", StateOffsetConfig(variant="y"), 327_680),
        ("m2", "130m", StateOffsetConfig(), 4_718_592),
        ("m2", "130m", StateOffsetConfig(variant="y"), 36_864),
        ("m1", "130m", InitialStateConfig(), 589_824),
        ("m1", "130m", InitialStateConfig(conv_state=True), 700_416),
        ("m1", "130m", StateOffsetConfig(rank=4, r_ratio=2), 24 * 4 * (1536 // 2 + 16 * 2)),
        ("m1", "130m", LoraConfig(r=8, target_modules=["x_proj.dt", "x_proj.B", "x_proj.C", "dt_proj"]), 1_204_224),
        ("m1", "1.4b", LoraConfig(r=8, target_modules=["x_proj.dt", "x_proj.B", "x_proj.C", "dt_proj"]), 6_402_048),
        ("m1", "2.8b", LoraConfig(r=8, target_modules=["x_proj.dt", "x_proj.B", "x_proj.C", "dt_proj"]), 10_665_984),
        ("m1", "130m", LoraConfig(r=8, target_modules=["in_proj.x", "in_proj.z", "out_proj"]), 1_327_104),
        ("m1", "130m", LoraConfig(r=8, target_modules=["out_proj"], use_dora=True), 24 * (8 * (1536 + 768) + 768)),
        ("m1", "130m", PrefixTuningConfig(num_virtual_tokens=10), 24 * 10 * 768),
        ("m1", "130m", PromptTuningConfig(num_virtual_tokens=10), 10 * 768),
    ],
    ids=lambda v: v.method if hasattr(v, "method") else str(v),
)
def test_trainable_count(arch, size, config, count):
    model = get_peft_model(_meta_model(arch, size), config)
    _meta_only(model)
    assert model.trainable_parameters() == count


def test_share_of_130m():
    model = get_peft_model(_meta_model("m1", "130m"), StateOffsetConfig())
    base = model.num_parameters() - model.trainable_parameters()
    assert round(base / 1e6, 1) == 129.1  # docs/methods.md §1.1
    assert round(100 * model.trainable_parameters() / base, 3) == 0.457
