"""Adapter folders: config round trip, refusal of a different base or a damaged file, peft LoRA export."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent / "methods"))
from _peft_cases import CASES, perturb, tiny_model

import ssmtune
from ssmtune import AdapterConfig, LoraConfig, PeftModel, StateOffsetConfig, get_peft_model
from ssmtune.core.registry import get_method


def _saved(tmp_path: Path, arch: str = "m1", config=None) -> Path:
    model = get_peft_model(tiny_model(arch), config or StateOffsetConfig())
    perturb(model)
    model.save_pretrained(tmp_path)
    return tmp_path


def _drop_digest(folder: Path) -> None:
    """Make the folder an older ssmtune's (no weights digest), so a test can change the weights file on purpose."""
    path = folder / "adapter_config.json"
    meta = json.loads(path.read_text())
    del meta["weights_sha256"]
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_config_json_round_trip(case):
    configs = case.make()
    for cfg in configs if isinstance(configs, list) else [configs]:
        data = json.loads(json.dumps(cfg.to_dict()))
        assert AdapterConfig.from_dict(data) == cfg
        assert type(cfg).from_dict(data) == cfg


def test_files_and_metadata(tmp_path):
    _saved(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["base_model"]["model_type"] == "mamba"
    assert meta["methods"] == [
        {"method": "state_offset", "layers_to_transform": None, "variant": "h", "rank": None, "r_ratio": 1,
         "scale": 1.0, "scale_in_training": False}
    ]  # fmt: skip
    keys = sorted(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == [f"backbone.layers.{i}.mixer.state_offset_h.h_off" for i in range(2)]


@pytest.mark.parametrize(
    ("arch", "kw"),
    [("m2", {}), ("m1", {"d_model": 24}), ("m1", {"n_layer": 3}), ("m1", {"d_state": 6})],
    ids=["architecture", "d_model", "n_layer", "d_state"],
)
def test_wrong_base_refused(tmp_path, arch, kw):
    _saved(tmp_path)
    with pytest.raises(ValueError, match="different base model"):
        PeftModel.from_pretrained(tiny_model(arch, **kw), tmp_path)


def test_corrupt_or_missing_weights_refused(tmp_path):
    path = _saved(tmp_path) / "adapter_model.safetensors"
    _drop_digest(tmp_path)  # the reader's own checks (a recorded digest refuses any changed file first)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt adapter weights"):
        PeftModel.from_pretrained(tiny_model("m1"), tmp_path)
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="corrupt adapter weights"):
        PeftModel.from_pretrained(tiny_model("m1"), tmp_path)
    path.unlink()
    with pytest.raises(ValueError, match="missing adapter weights"):
        PeftModel.from_pretrained(tiny_model("m1"), tmp_path)
    with pytest.raises(ValueError, match="no adapter_config.json"):
        PeftModel.from_pretrained(tiny_model("m1"), tmp_path / "nowhere")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_refused_with_the_tensor_name(tmp_path, bad):
    from safetensors.torch import save_file

    path = _saved(tmp_path) / "adapter_model.safetensors"
    _drop_digest(tmp_path)
    tensors = load_file(str(path))
    name = max(tensors)
    tensors[name].view(-1)[0] = bad
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=rf"tensor '{name}' holds NaN or infinite values"):
        PeftModel.from_pretrained(tiny_model("m1"), tmp_path)


def test_mismatching_tensors_refused(tmp_path):
    from safetensors.torch import save_file

    path = _saved(tmp_path) / "adapter_model.safetensors"
    _drop_digest(tmp_path)
    tensors = load_file(path)
    tensors["backbone.layers.0.mixer.state_offset_h.h_off"] = torch.zeros(3, 3)
    save_file(tensors, path)
    with pytest.raises(ValueError, match="shapes do not match"):
        PeftModel.from_pretrained(tiny_model("m1"), tmp_path)
    del tensors["backbone.layers.0.mixer.state_offset_h.h_off"]
    save_file(tensors, path)
    base = tiny_model("m1")
    with pytest.raises(ValueError, match="missing"):
        PeftModel.from_pretrained(base, tmp_path)
    assert not any(len(m.state_hooks) for _, m in base.mixers())  # a failed load leaves the model clean


def test_load_into_existing_peft_model(tmp_path):
    _saved(tmp_path)
    model = get_peft_model(tiny_model("m1"), LoraConfig(r=2, target_modules=["out_proj"]))
    model.load_adapter(tmp_path, adapter_name="offset")  # as in peft: added, the active adapter stays
    assert model.adapter_names == ["default", "offset"] and model.active_adapters == ["default"]
    with pytest.raises(TypeError, match="load_adapter"):
        PeftModel.from_pretrained(model, tmp_path, adapter_name="again")


def test_deprecated_top_level_functions(tmp_path):
    model = get_peft_model(tiny_model("m1"), StateOffsetConfig())
    with pytest.warns(DeprecationWarning, match="PeftModel.save_pretrained"):
        ssmtune.save_adapter(model, tmp_path)
    peft = get_peft_model(tiny_model("m1"), LoraConfig(r=2, target_modules=["out_proj"]))
    with pytest.warns(DeprecationWarning, match="PeftModel.from_pretrained"):
        peft = ssmtune.load_adapter(peft, tmp_path, adapter_name="offset")
    assert peft.adapter_names == ["default", "offset"] and peft.active_adapters == ["offset"]


def test_deprecated_methods_warn_and_work(tmp_path):
    model = get_peft_model(tiny_model("m1"), StateOffsetConfig())
    perturb(model)
    with pytest.warns(DeprecationWarning, match="save_pretrained"):
        model.save_adapter(tmp_path / "old")
    model.save_pretrained(tmp_path / "new")
    for f in ("adapter_model.safetensors",):
        assert load_file(tmp_path / "old" / f).keys() == load_file(tmp_path / "new" / f).keys()
    ids = torch.randint(0, 37, (1, 5))
    with model.disable_adapter():
        base = model(ids).logits
    with pytest.warns(DeprecationWarning, match="disable_adapter\\(\\)"), model.disable_adapters():
        assert torch.equal(model(ids).logits, base)
    assert not torch.equal(model(ids).logits, base)


def test_lora_peft_field_names_and_old_aliases(tmp_path):
    cfg = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.1, layers_to_transform=[1])
    with pytest.warns(DeprecationWarning) as record:
        old = LoraConfig(r=2, alpha=4, dropout=0.1, layers=[1])
    assert [str(w.message) for w in record] == [
        f"LoraConfig.{a} is deprecated; use {b}"
        for a, b in [("layers", "layers_to_transform"), ("alpha", "lora_alpha"), ("dropout", "lora_dropout")]
    ]
    assert all(w.filename == __file__ for w in record)  # the warning points at the caller
    assert old == cfg and cfg.to_dict()["lora_alpha"] == 4 and "alpha" not in cfg.to_dict()
    with pytest.warns(DeprecationWarning, match="lora_dropout"):
        assert cfg.dropout == 0.1
    with pytest.raises(ValueError, match="not both"):
        LoraConfig(alpha=4, lora_alpha=4)
    with pytest.warns(DeprecationWarning, match="layers_to_transform"):
        assert AdapterConfig.from_dict({"method": "state_offset", "layers": [0]}).layers_to_transform == [0]


def test_old_adapter_config_with_alpha_loads(tmp_path):
    model = get_peft_model(tiny_model("m1"), LoraConfig(r=2, lora_alpha=4, target_modules=["in_proj"]))
    perturb(model)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    meta = json.loads(path.read_text())
    (m,) = meta["methods"]
    m["alpha"], m["dropout"], m["layers"] = m.pop("lora_alpha"), m.pop("lora_dropout"), m.pop("layers_to_transform")
    path.write_text(json.dumps(meta))  # the file an older ssmtune wrote
    ids = torch.randint(0, 37, (1, 5))
    with pytest.warns(DeprecationWarning) as record:
        loaded = PeftModel.from_pretrained(tiny_model("m1"), tmp_path)
    assert len(record) == 3 and "lora_alpha" in str(record[1].message)
    assert loaded.peft_config["default"][0].lora_alpha == 4
    assert torch.allclose(loaded(ids).logits, model(ids).logits)


def test_save_is_atomic(tmp_path, monkeypatch):
    _saved(tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    import safetensors.torch

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    model = get_peft_model(tiny_model("m1"), StateOffsetConfig())
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_config_records_the_digest_of_its_weights(tmp_path):
    import hashlib

    _saved(tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["weights_sha256"] == hashlib.sha256((tmp_path / "adapter_model.safetensors").read_bytes()).hexdigest()


def _other_adapter() -> PeftModel:
    model = get_peft_model(tiny_model("m1"), StateOffsetConfig())
    perturb(model, scale=0.7)  # the same shapes as _saved's adapter, other values
    return model


def _logits(model) -> torch.Tensor:
    return model(torch.arange(6).view(1, 6)).logits


def test_save_interrupted_before_its_renames_keeps_the_old_adapter(tmp_path, monkeypatch):
    import ssmtune.core.io as adapter_io

    _saved(tmp_path)
    expected = _logits(PeftModel.from_pretrained(tiny_model("m1"), tmp_path))
    (tmp_path / "README.md").write_text("mine")
    (tmp_path / "other").mkdir()  # peft's layout for a second adapter name
    (tmp_path / "other" / "adapter_config.json").write_text("{}")
    staged = []
    real_sha256 = adapter_io.file_sha256

    def sha256_spy(path):
        staged.append(path)
        return real_sha256(path)

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    # the new weights are staged, then Ctrl-C while the config is written
    monkeypatch.setattr(adapter_io, "file_sha256", sha256_spy)
    monkeypatch.setattr(Path, "write_text", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        _other_adapter().save_pretrained(tmp_path)
    monkeypatch.undo()
    assert len(staged) == 1
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["README.md", "adapter_config.json", "adapter_model.safetensors", "other"]  # no temp files
    assert torch.equal(_logits(PeftModel.from_pretrained(tiny_model("m1"), tmp_path)), expected)
    assert (tmp_path / "README.md").read_text() == "mine" and (tmp_path / "other" / "adapter_config.json").is_file()


def test_crash_between_the_two_renames_is_refused(tmp_path, monkeypatch):
    import ssmtune.utils.io as io_utils

    _saved(tmp_path)
    real = os.replace
    calls = []

    def dies_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process ends after the weights were renamed, before the config was
        real(src, dst)

    monkeypatch.setattr(io_utils.os, "replace", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        _other_adapter().save_pretrained(tmp_path)
    monkeypatch.undo()
    assert [Path(c).name for c in calls] == ["adapter_model.safetensors", "adapter_config.json"]
    with pytest.raises(ValueError, match=rf"in '{tmp_path}' is not the file adapter_config.json was saved with.*"
                       "a save was interrupted") as err:  # fmt: skip
        PeftModel.from_pretrained(tiny_model("m1"), tmp_path)
    assert "\n" not in str(err.value)
    _other_adapter().save_pretrained(tmp_path)  # saving again repairs the folder
    assert torch.equal(_logits(PeftModel.from_pretrained(tiny_model("m1"), tmp_path)), _logits(_other_adapter()))


def test_files_a_killed_save_staged_are_ignored_then_removed(tmp_path, monkeypatch):
    """A save killed between staging and its renames leaves ``.<name>.<random>.tmp`` files: loading reads fixed names
    and ignores them, the next process's save of the folder removes them (other files stay)."""
    from ssmtune.models.loading import load_model, save_pretrained
    from ssmtune.utils import io

    def later_process() -> None:
        monkeypatch.setattr(io, "_swept", set())  # a process sweeps a name's leftovers at its first write of it

    model = get_peft_model(tiny_model("m1"), StateOffsetConfig())
    perturb(model)
    model.save_pretrained(tmp_path)
    stale = [tmp_path / ".adapter_model.safetensors.k3x9a0_q.tmp", tmp_path / ".adapter_config.json.0_zz91ab.tmp"]
    stale[0].write_bytes(b"half a safetensors file")
    stale[1].write_text("{")
    (tmp_path / "notes.txt").write_text("the user's")
    loaded = PeftModel.from_pretrained(tiny_model("m1"), tmp_path).adapter_state_dict()
    assert all(torch.equal(loaded[k], t) for k, t in model.adapter_state_dict().items())
    later_process()
    model.save_pretrained(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["adapter_config.json", "adapter_model.safetensors", "notes.txt"]
    # a model folder likewise
    base = tmp_path / "base"
    save_pretrained(tiny_model("m1"), base)
    staged = base / ".model.safetensors.k3x9a0_q.tmp"
    staged.write_bytes(b"half")
    load_model(base)
    later_process()
    save_pretrained(tiny_model("m1"), base)
    assert sorted(p.name for p in base.iterdir()) == ["config.json", "model.safetensors"]


def test_changed_weights_refused_unless_the_digest_is_removed(tmp_path):
    _saved(tmp_path / "a")
    _other_adapter().save_pretrained(tmp_path / "b")
    # same keys and shapes: without the digest this would silently load b's adapter under a's config
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(
        (tmp_path / "b" / "adapter_model.safetensors").read_bytes()
    )
    with pytest.raises(ValueError, match="changed or damaged since.*delete 'weights_sha256'"):
        PeftModel.from_pretrained(tiny_model("m1"), tmp_path / "a")
    _drop_digest(tmp_path / "a")  # as an older ssmtune wrote it, or a change made on purpose: loads unchecked
    loaded = PeftModel.from_pretrained(tiny_model("m1"), tmp_path / "a")
    assert torch.equal(_logits(loaded), _logits(_other_adapter()))


def test_export_peft_lora(tmp_path):
    model = get_peft_model(
        tiny_model("m1"), LoraConfig(r=2, lora_alpha=4, target_modules=["in_proj", "x_proj"], layers_to_transform=[1])
    )
    perturb(model)
    model.export_peft_lora(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 2 and cfg["lora_alpha"] == 4
    assert cfg["target_modules"] == ["in_proj", "x_proj"] and cfg["layers_to_transform"] == [1]
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(tensors) == [
        f"base_model.model.backbone.layers.1.mixer.{m}.lora_{ab}.weight" for m in ("in_proj", "x_proj") for ab in "AB"
    ]
    lora = model.base_model.backbone.layers[1].mixer.in_proj.adapters["default__lora"]
    assert torch.equal(tensors["base_model.model.backbone.layers.1.mixer.in_proj.lora_B.weight"], lora.lora_B)
    assert tensors["base_model.model.backbone.layers.1.mixer.in_proj.lora_A.weight"].shape == (2, 16)


def test_export_refuses_what_peft_cannot_express(tmp_path):
    configs = (LoraConfig(target_modules=["x_proj.B"]), LoraConfig(use_dora=True), StateOffsetConfig(),
               LoraConfig(target_modules=["in_proj", "out_proj"]))  # fmt: skip
    for config in configs:
        with pytest.raises(ValueError, match="export_peft_lora"):
            get_peft_model(tiny_model("m1"), config).export_peft_lora(tmp_path)


def test_unknown_names_are_listed():
    with pytest.raises(ValueError, match=r"unknown PEFT method 'bogus'; known methods: \[.*'state_offset'"):
        get_method("bogus")
    with pytest.raises(ValueError, match=r"unknown targets \['bogus'\].*x_proj.B"):
        LoraConfig(target_modules=["bogus"])
    with pytest.raises(ValueError, match=r"\['q_proj'\] are not Mamba-1 targets"):
        get_peft_model(tiny_model("m1"), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"\['x_proj.B'\] are not Mamba-2 targets"):
        get_peft_model(tiny_model("m2"), LoraConfig(target_modules=["x_proj.B"]))
    with pytest.raises(ValueError, match=r"layer indices \[5\] out of range"):
        get_peft_model(tiny_model("m1"), StateOffsetConfig(layers_to_transform=[5]))
    with pytest.raises(ValueError, match="variant must be 'h' or 'y', got 'z'"):
        StateOffsetConfig(variant="z")


def _hf_tiny(arch: str):
    transformers = pytest.importorskip("transformers")
    if arch == "m1":
        return transformers.MambaForCausalLM(
            transformers.MambaConfig(hidden_size=24, num_hidden_layers=2, vocab_size=72, state_size=16)
        ).eval()
    cfg = transformers.Mamba2Config(hidden_size=24, num_hidden_layers=2, vocab_size=72, state_size=16, head_dim=8,
                                    num_heads=6, n_groups=2, chunk_size=8, expand=2)  # fmt: skip
    return transformers.Mamba2ForCausalLM(cfg).eval()


@pytest.mark.parametrize(("arch", "targets"), [("m1", ["in_proj", "x_proj"]), ("m2", ["in_proj"]), ("m1", ["dt_proj"])])
def test_export_loads_in_real_peft(tmp_path, arch, targets):
    """The exported adapter, loaded by Hugging Face peft onto the same transformers model, gives our logits; on
    transformers' Mamba-1, a dt_proj LoRA has no effect (its forward reads dt_proj.weight), which export warns about."""
    import warnings

    peft = pytest.importorskip("peft")
    from ssmtune.models import load_model

    torch.manual_seed(0)
    hf = _hf_tiny(arch)
    hf.save_pretrained(tmp_path / "base")
    ours = get_peft_model(load_model(tmp_path / "base"), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    perturb(ours, scale=1.0)
    if targets == ["dt_proj"]:
        with pytest.warns(UserWarning, match="dt_proj"):
            ours.export_peft_lora(tmp_path / "adapter")
    else:
        ours.export_peft_lora(tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter")
    ids = torch.randint(0, 72, (2, 9))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = ours(ids).logits, theirs(ids).logits
        with ours.disable_adapter():
            bare = ours(ids).logits
    effect = (a - bare).abs().max().item()
    assert effect > 1e-3, effect  # the adapter changes our output, well above the tolerances below
    if targets == ["dt_proj"]:
        torch.testing.assert_close(b, bare, rtol=0, atol=1e-5)
    else:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
