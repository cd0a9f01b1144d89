"""Guards on adapter state: frozen loads stay frozen, no silent merges, no Additional-scan over earlier adapters."""

import json

import pytest
import torch

from ssmtune import AdditionalScanConfig, LoraConfig, PeftModel, StateOffsetConfig, get_peft_model
from ssmtune.models import MambaConfig, MambaForCausalLM


def _base(seed: int = 0) -> MambaForCausalLM:
    torch.manual_seed(seed)
    return MambaForCausalLM(MambaConfig(d_model=16, n_layer=2, vocab_size=50, d_state=4))


def test_adapter_loaded_frozen_stays_frozen_after_set_adapter(tmp_path):
    m = get_peft_model(_base(), StateOffsetConfig())
    m.save_pretrained(tmp_path)
    m.load_adapter(tmp_path, "b", is_trainable=False)
    m.set_adapter("b")
    assert m.trainable_parameters() == 0
    m.set_adapter("default")
    assert m.trainable_parameters() > 0
    assert PeftModel.from_pretrained(_base(), tmp_path, is_trainable=True).trainable_parameters() > 0


def test_merge_inside_disable_adapter_is_refused():
    m = get_peft_model(_base(), LoraConfig(r=2, target_modules=["out_proj"]))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.requires_grad:
                p.normal_()
    with m.disable_adapter(), pytest.raises(ValueError, match="disabled"):
        m.merge_and_unload()


@pytest.mark.parametrize("first", [LoraConfig(r=2, target_modules=["x_proj.C"]), StateOffsetConfig()])
def test_additional_scan_refuses_to_extend_under_earlier_adapters(first):
    with pytest.raises(ValueError, match="attach Additional-scan first"):
        get_peft_model(_base(), [first, AdditionalScanConfig(n_states=2)])


def test_additional_scan_first_then_lora_slice_targets_the_extended_rows():
    m = get_peft_model(_base(), [AdditionalScanConfig(n_states=2), LoraConfig(r=2, target_modules=["x_proj.C"])])
    mixer = m.base_model.backbone.layers[0].mixer
    r, n = mixer.dt_proj.in_features, mixer.d_state
    lora = next(v for k, v in m.adapter_modules().items() if "lora" in k)
    assert n == 6 and tuple(lora.rows) == (r + n, r + 2 * n)


def test_corrupt_sdlora_index_is_refused_at_load(tmp_path):
    from safetensors.torch import load_file, save_file

    from ssmtune import SDLoraConfig

    m = get_peft_model(_base(), SDLoraConfig(channel_freeze=0.5, state_freeze=0.5))
    m.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("index"))
    tensors[key] = torch.full_like(tensors[key], 10**9)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    del meta["weights_sha256"]  # else the changed file is refused by its digest before the index is read
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="index out of range"):
        PeftModel.from_pretrained(_base(), tmp_path)


def test_a_second_get_peft_model_on_one_base_is_refused():
    base = _base()
    first = get_peft_model(base, StateOffsetConfig())
    with pytest.raises(ValueError, match=r"already carries the adapters of another PeftModel.*add_adapter\(name"):
        get_peft_model(base, LoraConfig(r=2, target_modules=["out_proj"]), adapter_name="second")
    # the first model is untouched: still one adapter, still trainable
    assert first.adapter_names == ["default"] and first.trainable_parameters() > 0
    # once its adapters are gone (merged), the base can be wrapped again
    lora = get_peft_model(_base(), LoraConfig(r=2, target_modules=["out_proj"]))
    assert get_peft_model(lora.merge_and_unload(), StateOffsetConfig()).trainable_parameters() > 0


@pytest.mark.parametrize("names", [["default"], ["default", None, "default"]])
def test_forward_and_generate_refuse_adapter_names_of_another_length(names):
    m = get_peft_model(_base(), StateOffsetConfig()).eval()
    ids = torch.randint(0, 50, (2, 5))
    message = rf"the batch has 2 rows but {len(names)} adapter names are routed"
    with pytest.raises(ValueError, match=message):
        m(ids, adapter_names=names)
    with pytest.raises(ValueError, match=message):
        m.generate(ids, max_new_tokens=2, adapter_names=names)
    with pytest.raises(ValueError, match=message):
        m.generate(input_ids=ids, max_new_tokens=2, num_beams=2, adapter_names=names)
    assert m.generate(ids, max_new_tokens=2, adapter_names=["default", None]).shape == (2, 7)
