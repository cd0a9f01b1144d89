"""Checkpoint I/O: parity with HF transformers tiny random models, mamba_ssm layout, save round trip, errors."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from ssmtune.models import Mamba2Config, MambaConfig, causal_lm_for, load_model
from ssmtune.models.convert import config_from_mamba_ssm
from ssmtune.models.hooks import StateHook


def hf_model(arch: str, vocab: int = 72):
    """A tiny random transformers model, with every parameter perturbed so no weight is trivially 0 or 1."""
    if arch == "mamba":
        cfg = transformers.MambaConfig(hidden_size=24, num_hidden_layers=2, vocab_size=vocab, state_size=16)
        model = transformers.MambaForCausalLM(cfg)
    else:
        cfg = transformers.Mamba2Config(
            hidden_size=24, num_hidden_layers=2, vocab_size=vocab, state_size=16, head_dim=8, num_heads=6,
            n_groups=2, chunk_size=8, expand=2,
        )  # fmt: skip
        model = transformers.Mamba2ForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(ids).logits


@pytest.mark.parametrize("arch", ["mamba", "mamba2"])
def test_hf_checkpoint_parity(arch: str, tmp_path: Path) -> None:
    hf = hf_model(arch)
    # Mamba-1 sharded (model.safetensors.index.json), Mamba-2 a single model.safetensors
    hf.save_pretrained(tmp_path, max_shard_size="20KB" if arch == "mamba" else "50GB")
    assert (tmp_path / "model.safetensors.index.json").is_file() == (arch == "mamba")
    model = load_model(tmp_path)
    assert model.config.model_type == arch and model.tokenizer is None
    ids = torch.randint(0, 72, (2, 13))
    torch.testing.assert_close(model(ids).logits, hf_logits(hf, ids), rtol=1e-4, atol=1e-4)


def _mamba_ssm_folder(hf, arch: str, folder: Path) -> None:
    """Write ``hf``'s weights as a mamba_ssm MambaLMHeadModel checkpoint (vocab 70 padded to 72)."""
    ssm_cfg = {} if arch == "mamba" else {"layer": "Mamba2", "d_state": 16, "headdim": 8, "ngroups": 2, "chunk_size": 8}
    cfg = {
        "d_model": 24, "d_intermediate": 0, "n_layer": 2, "vocab_size": 70, "ssm_cfg": ssm_cfg, "attn_layer_idx": [],
        "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
        "pad_vocab_size_multiple": 8, "tie_embeddings": arch == "mamba",
    }  # fmt: skip
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    sd = {k.replace("backbone.embeddings.", "backbone.embedding."): v.clone() for k, v in hf.state_dict().items()}
    torch.save(sd, folder / "pytorch_model.bin")


@pytest.mark.parametrize("arch", ["mamba", "mamba2"])
def test_mamba_ssm_layout_parity(arch: str, tmp_path: Path) -> None:
    hf = hf_model(arch)
    _mamba_ssm_folder(hf, arch, tmp_path / "ckpt")
    model = load_model(tmp_path / "ckpt")
    assert model.config.vocab_size == 70 and model.config.padded_vocab_size == 72
    ids = torch.randint(0, 70, (2, 11))
    torch.testing.assert_close(model(ids).logits, hf_logits(hf, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["mamba", "mamba2"])
def test_save_pretrained_opens_in_transformers(arch: str, tmp_path: Path) -> None:
    cfg = (
        MambaConfig(d_model=24, n_layer=2, vocab_size=70)
        if arch == "mamba"
        else Mamba2Config(d_model=24, n_layer=2, vocab_size=70, headdim=8, d_state=16, ngroups=2, chunk_size=8)
    )
    model = causal_lm_for(cfg).eval()
    for _, mixer in model.mixers():
        mixer.state_hooks["skipped"] = StateHook()  # hooks are not part of the base checkpoint
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]  # no temp files left
    cls = transformers.MambaForCausalLM if arch == "mamba" else transformers.Mamba2ForCausalLM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = cls.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 70, (2, 10))
    ref = model(ids).logits
    torch.testing.assert_close(hf_logits(hf, ids), ref, rtol=1e-4, atol=1e-4)
    again = load_model(tmp_path)
    torch.testing.assert_close(again(ids).logits, ref, rtol=1e-5, atol=1e-5)


def test_dtype_keeps_A_log_and_D_fp32(tmp_path: Path) -> None:
    hf_model("mamba2").save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype=torch.bfloat16)
    mixer = model.backbone.layers[0].mixer
    assert model.backbone.embeddings.weight.dtype == torch.bfloat16 and mixer.in_proj.weight.dtype == torch.bfloat16
    assert mixer.A_log.dtype == torch.float32 and mixer.D.dtype == torch.float32
    assert model(torch.randint(0, 72, (1, 5))).logits.isfinite().all()


def test_tokenizer_is_attached(tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    hf_model("mamba").save_pretrained(tmp_path)
    vocab = {"<|endoftext|>": 0, "hello": 1, "world": 2, "[UNK]": 3}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    model = load_model(tmp_path)
    assert model.tokenizer is not None
    ids = model.tokenizer.encode("hello world")
    assert list(getattr(ids, "ids", ids)) == [1, 2]  # ssmtune's wrapper gives a list, raw tokenizers an Encoding
    hf_model("mamba").save_pretrained(tmp_path / "bare")
    assert load_model(tmp_path / "bare").tokenizer is None


def _edit_weights(folder: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(str(folder / "model.safetensors"))
    edit(sd)
    save_file(sd, str(folder / "model.safetensors"))


def test_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_model(tmp_path / "does-not-exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_model(tmp_path / "empty")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        load_model(tmp_path / "file.txt")
    (tmp_path / "rwkv").mkdir()
    (tmp_path / "rwkv" / "config.json").write_text(json.dumps({"model_type": "rwkv", "hidden_size": 8}))
    with pytest.raises(ValueError, match="'rwkv'"):
        load_model(tmp_path / "rwkv")
    with pytest.raises(ValueError, match="'Mamba3'"):
        config_from_mamba_ssm({"d_model": 8, "n_layer": 1, "vocab_size": 8, "ssm_cfg": {"layer": "Mamba3"}})

    good = tmp_path / "good"
    hf_model("mamba").save_pretrained(good)
    (good / "model.safetensors").rename(tmp_path / "weights.bak")
    with pytest.raises(ValueError, match="none of"):
        load_model(good)
    (tmp_path / "weights.bak").rename(good / "model.safetensors")

    _edit_weights(good, lambda sd: sd.pop("backbone.layers.1.mixer.A_log"))
    with pytest.raises(ValueError, match=r"missing.*backbone\.layers\.1\.mixer\.A_log"):
        load_model(good)
    _edit_weights(
        good, lambda sd: sd.update({"backbone.layers.1.mixer.A_log": torch.zeros(48, 16), "extra.w": torch.zeros(2)})
    )
    with pytest.raises(ValueError, match=r"unexpected.*extra\.w"):
        load_model(good)
    _edit_weights(good, lambda sd: sd.pop("extra.w"))
    load_model(good)
    _edit_weights(good, lambda sd: sd.update({"backbone.layers.1.mixer.A_log": torch.zeros(48, 17)}))
    with pytest.raises(ValueError, match=r"shape.*A_log: expected \(48, 16\), got \(48, 17\)"):
        load_model(good)

    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="state-spaces/mamba-nonexistent"):
        load_model("state-spaces/mamba-nonexistent")


def test_save_refuses_unrepresentable_models(tmp_path: Path) -> None:
    model = causal_lm_for(Mamba2Config(d_model=16, n_layer=1, vocab_size=64, headdim=8, d_state=8, D_has_hdim=True))
    with pytest.raises(ValueError, match="D_has_hdim"):
        model.save_pretrained(tmp_path)
    lm = causal_lm_for(MambaConfig(d_model=16, n_layer=1, vocab_size=64))
    lm.backbone.layers[0].mixer.out_proj = nn.Sequential(lm.backbone.layers[0].mixer.out_proj)
    with pytest.raises(ValueError, match=r"missing.*out_proj\.weight.*unexpected.*out_proj\.0\.weight"):
        lm.save_pretrained(tmp_path / "wrapped")
