"""Adapter folders: ``adapter_config.json`` + ``adapter_model.safetensors`` (adapter tensors only).

``adapter_config.json``::

    {"format": "ssmtune-adapter", "ssmtune_version": "...", "adapter_name": "default",
     "base_model": {"model_type": "mamba", "fingerprint": "<sha256[:16]>", "shape": {"d_model": 768, ...}},
     "methods": [{"method": "state_offset", ...}, ...], "weights_sha256": "<sha256 of adapter_model.safetensors>"}

Both files are written to temporary files first and then renamed into place, weights first; the config records the
digest of the weights it belongs to, so a folder that a crash left with new weights beside an old config (or a weights
file changed since) is refused, not loaded as the wrong adapter. Files without ``weights_sha256`` (older ssmtune) load
unchecked. Other files in the folder are left alone.

Loading refuses a base whose shape fingerprint differs, and missing, corrupt or mismatching tensors, with a ValueError.
``export_peft_lora`` writes pure-LoRA adapters in Hugging Face peft's layout.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..utils.io import atomic_write_files, file_sha256
from .config import AdapterConfig
from .peft_model import PeftModel, get_peft_model

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "ssmtune-adapter"

# Config fields that fix parameter shapes (others, such as eps or init ranges, do not change what an adapter fits).
SHAPE_FIELDS = (
    "d_model", "n_layer", "d_state", "d_conv", "expand", "dt_rank", "headdim", "ngroups", "D_has_hdim",
    "conv_bias", "bias", "padded_vocab_size", "tie_embeddings",
)  # fmt: skip
# The same for transformers' hybrid models (``ssmtune.from_transformers``), in their config names
HF_SHAPE_FIELDS = (
    "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size", "num_attention_heads",
    "num_key_value_heads", "head_dim", "tie_word_embeddings", "mamba_n_heads", "mamba_d_head", "mamba_d_state",
    "mamba_n_groups", "mamba_d_conv", "mamba_expand", "mamba_d_ssm", "mamba_num_heads", "mamba_head_dim",
    "ssm_state_size", "n_groups", "conv_kernel", "n_mamba_heads", "mamba_headdim", "mamba_ngroups",
    "layers_block_type", "hybrid_override_pattern", "num_local_experts", "shared_intermediate_size",
)  # fmt: skip


def _version() -> str:
    import ssmtune

    return getattr(ssmtune, "__version__", "unknown")


def base_signature(model: nn.Module) -> dict[str, Any]:
    """model_type, shape fields and their hash for the base model's config."""
    cfg = model.config
    model_type = getattr(cfg, "model_type", "") or type(model).__name__
    shape = {}
    for key in SHAPE_FIELDS if hasattr(model, "mixers") else HF_SHAPE_FIELDS:
        if hasattr(cfg, key):
            value = getattr(cfg, key)
            shape[key] = value if isinstance(value, (int, bool, str)) else str(value)
    blob = json.dumps({"model_type": model_type, **shape}, sort_keys=True).encode()
    return {"model_type": model_type, "fingerprint": hashlib.sha256(blob).hexdigest()[:16], "shape": shape}


def save_adapter(model: PeftModel, directory: str | os.PathLike, adapter_name: str | None = None) -> None:
    """Save one adapter of ``model`` (default: the single active one) to ``directory``."""
    from safetensors.torch import save_file

    if not isinstance(model, PeftModel):
        raise TypeError(f"save_adapter needs a PeftModel, got {type(model).__name__}")
    name = model._one_name(adapter_name)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: t.detach().to("cpu").contiguous().clone() for k, t in model.adapter_state_dict(name).items()}
    meta = {
        "format": FORMAT,
        "ssmtune_version": _version(),
        "adapter_name": name,
        "base_model": base_signature(model.base_model),
        "methods": [cfg.to_dict() for cfg in model.peft_config[name]],
    }

    def write_weights(path: str) -> None:
        save_file(tensors, path, metadata={"format": "pt"})
        meta["weights_sha256"] = file_sha256(path)

    # both files are staged before either replaces the old pair; the digest ties the config to these weights
    atomic_write_files(
        {
            out / WEIGHTS_NAME: write_weights,
            out / CONFIG_NAME: lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n"),
        }
    )


def read_adapter_config(directory: str | os.PathLike) -> tuple[dict[str, Any], list[AdapterConfig]]:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"no {CONFIG_NAME} in {str(directory)!r}")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path)!r} is not valid JSON: {e}") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not an ssmtune adapter config (format={meta.get('format')!r})")
    check_weights_digest(meta, directory)  # before anything else in the config is trusted
    return meta, [AdapterConfig.from_dict(d) for d in meta["methods"]]


def check_weights_digest(meta: dict[str, Any], directory: str | os.PathLike) -> None:
    """Refuse weights that are not the file the config was saved with (a save cut short between its two renames, or
    a file changed since); configs without ``weights_sha256`` (older ssmtune) are not checked."""
    want, path = meta.get("weights_sha256"), Path(directory) / WEIGHTS_NAME
    if want is None or not path.is_file():  # a missing file is named by the weights reader
        return
    got = file_sha256(path)
    if got != want:
        raise ValueError(
            f"{WEIGHTS_NAME} in {str(directory)!r} is not the file {CONFIG_NAME} was saved with (sha256 {got[:12]}..., "
            f"recorded {str(want)[:12]}...): a save was interrupted, or the file was changed or damaged since; save the "
            f"adapter again (or delete 'weights_sha256' from {CONFIG_NAME} to load a file changed on purpose)"
        )


def check_base(meta: dict[str, Any], model: nn.Module, where: str) -> None:
    """Refuse an adapter saved for a different architecture or size."""
    saved, here = meta["base_model"], base_signature(model)
    if saved["model_type"] != here["model_type"] or saved["fingerprint"] != here["fingerprint"]:
        diff = {
            k: (saved["shape"].get(k), here["shape"].get(k))
            for k in sorted(set(saved["shape"]) | set(here["shape"]))
            if saved["shape"].get(k) != here["shape"].get(k)
        }
        raise ValueError(
            f"adapter in {where!r} was saved for a different base model: model_type {saved['model_type']!r} vs "
            f"{here['model_type']!r}; differing fields (saved, this model): {diff}"
        )


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise ValueError(f"missing adapter weights {str(path)!r}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"corrupt adapter weights {str(path)!r}: {e}") from e
    for name, t in tensors.items():
        # a NaN/inf adapter makes every output NaN; refused here, where the file and the tensor can be named
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"adapter weights {str(path)!r}: tensor {name!r} holds NaN or infinite values")
    return tensors


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter_name: str = "default",
    *,
    is_trainable: bool = False,
) -> PeftModel:
    """Attach the adapter saved in ``directory`` to ``model`` (a base model or a PeftModel) and return the PeftModel.

    The loaded adapter becomes the active one; its tensors stay frozen unless ``is_trainable``.
    """
    meta, configs = read_adapter_config(directory)
    base = model.base_model if isinstance(model, PeftModel) else model
    check_base(meta, base, str(directory))
    tensors = _read_tensors(Path(directory) / WEIGHTS_NAME)
    if isinstance(model, PeftModel):
        peft = model
        peft.add_adapter(adapter_name, configs)
    else:
        peft = get_peft_model(model, configs, adapter_name=adapter_name)
    try:
        peft.load_adapter_state_dict(tensors, adapter_name)
    except ValueError:
        peft.delete_adapter(adapter_name)
        raise
    if is_trainable:
        peft._frozen.discard(adapter_name)
    else:
        peft._frozen.add(adapter_name)
    peft.set_adapter(adapter_name)
    return peft


def export_peft_lora(model: PeftModel, directory: str | os.PathLike, adapter_name: str | None = None) -> None:
    """Write a LoRA adapter in Hugging Face peft's format (keys ``base_model.model.<path>.lora_A.weight``).

    Only plain LoRA on whole modules can be expressed in peft: row-slice targets and DoRA raise ValueError.
    """
    from safetensors.torch import save_file

    name = model._one_name(adapter_name)
    configs = model.peft_config[name]
    if len(configs) != 1 or configs[0].method != "lora":
        raise ValueError(f"export_peft_lora: adapter {name!r} is not pure LoRA (methods {[c.method for c in configs]})")
    cfg = configs[0]
    slices = [t for t in cfg.target_modules if "." in t]
    if slices or cfg.use_dora:
        raise ValueError(
            f"export_peft_lora: peft cannot express row-slice targets {slices} or DoRA (use_dora={cfg.use_dora})"
        )
    if "out_proj" in cfg.target_modules:
        # peft's Mamba check rejects out_proj (and conv1d) as LoRA targets, so the file would not load there
        raise ValueError(
            "export_peft_lora: peft refuses LoRA on out_proj for Mamba models ('incompatible with Mamba-based "
            f"models'); targets {cfg.target_modules}"
        )
    if "dt_proj" in cfg.target_modules:
        warnings.warn(
            "export_peft_lora: transformers' Mamba forward uses dt_proj.weight directly, so a peft LoRA on dt_proj "
            "loads but has no effect there (tests/test_io.py checks this); ssmtune applies it",
            stacklevel=2,
        )
    tensors = {}
    modules = set()
    for path, module in model.adapter_modules(name).items():
        # path is "<module path>.lora"; peft keys carry the module path
        mod_path = path.rsplit(".", 1)[0]
        modules.add(mod_path.rsplit(".", 1)[-1])
        tensors[f"base_model.model.{mod_path}.lora_A.weight"] = module.lora_A.detach().cpu().contiguous().clone()
        tensors[f"base_model.model.{mod_path}.lora_B.weight"] = module.lora_B.detach().cpu().contiguous().clone()
    peft_cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": cfg.r,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": sorted(modules),
        "layers_to_transform": cfg.layers_to_transform,
        "layers_pattern": "layers" if cfg.layers_to_transform is not None else None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    # peft's format has no digest field: staging both files first leaves only the two renames to interrupt
    atomic_write_files(
        {
            out / WEIGHTS_NAME: lambda p: save_file(tensors, p, metadata={"format": "pt"}),
            out / CONFIG_NAME: lambda p: Path(p).write_text(json.dumps(peft_cfg, indent=2) + "\n"),
        }
    )
