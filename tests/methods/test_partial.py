"""Partial and full fine-tuning (docs/methods.md §5.6): pattern matching, counts of the ssm-peft configs, tied embedding,
adapter files holding only the trained tensors."""

from __future__ import annotations

import copy

import pytest
import torch
from _peft_cases import VOCAB, perturb, tiny_model
from safetensors.torch import load_file
from test_bitfit import meta_model, real_empty  # noqa: F401  (fixture)

from ssmtune import FullConfig, LoraConfig, PartialConfig, PeftModel, get_peft_model
from ssmtune.methods.partial import pattern_matches
from ssmtune.ops.testing import assert_close

S6_CONV = ["A_log", "D", "x_proj.weight", "dt_proj.*", "conv1d.*"]


def _ids():
    return torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))


@pytest.mark.usefixtures("real_empty")
@pytest.mark.parametrize(
    ("parameters", "count"),
    [
        (S6_CONV, 5_566_464),  # 007: 5.57M (4.31%)
        (None, 5_566_464),  # the default is 007
        (["A_log"], 589_824),  # 009
        (["x_proj.*"], 2_949_120),  # 010
        (["dt_proj.weight", "dt_proj.bias"], 1_806_336),  # 012
        (["conv1d.*"], 184_320),  # 014
        (["D", r"re:layers\.\d+\.norm\.weight", "norm_f.weight"], 56_064),  # 015
    ],
)
def test_counts_130m(parameters, count):
    model = get_peft_model(meta_model("m1", "130m"), PartialConfig(parameters=parameters))
    assert model.trainable_parameters() == count


@pytest.mark.usefixtures("real_empty")
def test_full_count_130m():
    model = get_peft_model(meta_model("m1", "130m"), FullConfig())
    n = model.trainable_parameters()
    assert n == model.num_parameters() - n  # every base tensor once (the tied embedding / lm_head too)
    assert round(n / 1e6, 1) == 129.1


def test_pattern_matching():
    name = "backbone.layers.3.mixer.conv1d.weight"
    assert pattern_matches("conv1d.*", name) and pattern_matches("conv1d.weight", name) and pattern_matches("*", name)
    assert pattern_matches(r"re:layers\.\d+\.mixer\.conv1d\.weight", name)
    assert not pattern_matches("weight.*", name) and not pattern_matches("onv1d.weight", name)
    assert not pattern_matches("norm.weight", "backbone.norm_f.weight")


def test_layers_and_errors():
    model = get_peft_model(
        tiny_model("m1"), PartialConfig(parameters=["A_log", "norm_f.weight"], layers_to_transform=[1])
    )
    assert sorted(model.adapter_modules()) == [
        "backbone.layers.1.mixer.A_log.partial",
        "backbone.norm_f.weight.partial",
    ]
    base = tiny_model("m1")
    with pytest.raises(ValueError, match=r"\['A_lgo'\] match no parameter"):
        get_peft_model(base, PartialConfig(parameters=["A_log", "A_lgo"]))
    assert not hasattr(base.backbone.layers[0].mixer, "parametrizations")  # nothing attached on failure
    with pytest.raises(ValueError, match="bad regular expression"):
        PartialConfig(parameters=["re:("])
    with pytest.raises(ValueError, match="must be None"):
        FullConfig(parameters=["A_log"])


def test_full_tied_embedding_one_delta(tmp_path):
    base = tiny_model("m1")
    clean = copy.deepcopy(base)
    assert base.lm_head.weight is base.backbone.embeddings.weight
    model = get_peft_model(base, FullConfig())
    perturb(model)
    emb_delta = model.adapter_modules()["backbone.embeddings.weight.full"].delta
    assert torch.equal(base.lm_head.weight, base.backbone.embeddings.weight)  # the head sees the same δ
    assert_close("tied", clean.lm_head.weight + emb_delta, base.lm_head.weight, 0, atol=1e-7)
    out = model(_ids()).logits
    model.save_pretrained(tmp_path)
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert len(keys) == len(list(clean.parameters()))  # one δ per base tensor, none for the tied head
    merged = model.merge_and_unload()
    assert merged.lm_head.weight is merged.backbone.embeddings.weight
    assert_close("merged", out, merged(_ids()).logits, 1e-5, atol=1e-5)


def test_saves_only_trained_tensors(tmp_path):
    base = tiny_model("m2")
    clean = copy.deepcopy(base)
    model = get_peft_model(base, PartialConfig(parameters=["A_log", "dt_bias"]))
    perturb(model)
    model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert sorted(tensors) == sorted(
        f"backbone.layers.{i}.mixer.{n}.partial.delta" for i in range(2) for n in ("A_log", "dt_bias")
    )
    loaded = PeftModel.from_pretrained(clean, tmp_path)
    assert_close("reloaded", model(_ids()).logits, loaded(_ids()).logits, 1e-6, atol=1e-6)


def test_names_under_a_lora_wrapper():
    base = tiny_model("m1")
    model = get_peft_model(
        base,
        [
            LoraConfig(r=2, target_modules=["in_proj"]),
            PartialConfig(parameters=["in_proj.weight"], layers_to_transform=[0]),
        ],
    )
    assert "backbone.layers.0.mixer.in_proj.weight.partial" in model.adapter_modules()
    assert model.trainable_parameters() == 2 * 2 * (16 + 64) + 64 * 16
