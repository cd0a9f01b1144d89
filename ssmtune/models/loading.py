"""Load checkpoints in the HF transformers or mamba_ssm layout; save in the HF layout.

Folder layouts read by ``load_model``:
- HF transformers: ``config.json`` with ``model_type`` "mamba" / "mamba2", weights in ``model.safetensors``,
  sharded ``model.safetensors.index.json``, ``pytorch_model.bin`` or ``pytorch_model.bin.index.json``;
- mamba_ssm ``MambaLMHeadModel``: ``config.json`` with d_model, n_layer, ssm_cfg, and ``pytorch_model.bin``;
- a transformers hybrid (``model_type`` falcon_h1, nemotron_h, granitemoehybrid, bamba, zamba2): loaded by
  transformers, then ``from_transformers`` swaps in ssmtune's mixers (``models/hybrid.py``).
A ``tokenizer.json`` next to the weights is loaded as ``model.tokenizer`` (None otherwise).
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from ..utils.io import atomic_write_files
from .config import SSMConfig
from .convert import (
    HF_ARCHITECTURES,
    check_state_dict,
    config_from_hf,
    config_from_mamba_ssm,
    config_to_hf,
    state_dict_to_native,
)
from .hybrid import HYBRID_MODEL_TYPES
from .lm import SSMForCausalLM, causal_lm_for

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# parameters kept in fp32 whatever the requested dtype (docs/methods.md §9: A_log and D_skip stay fp32)
FP32_PARAMS = ("A_log", "D")


BUILTIN_MODELS = Path(__file__).resolve().parents[1] / "builtin" / "models"
BUILTIN_PREFIX = "builtin:"


def resolve_builtin(spec: str) -> Path:
    """``builtin:<name>`` -> the packaged folder ``ssmtune/builtin/models/<name>`` (docs/base-models.md)."""
    name = spec[len(BUILTIN_PREFIX) :]
    folder = BUILTIN_MODELS / name
    if not name or not (folder / "config.json").is_file():
        found = sorted(p.name for p in BUILTIN_MODELS.iterdir() if p.is_dir()) if BUILTIN_MODELS.is_dir() else []
        raise FileNotFoundError(f"no built-in model {name!r}; available: {found}")
    return folder


def _resolve_folder(path_or_hub_id: str | os.PathLike) -> Path:
    if str(path_or_hub_id).startswith(BUILTIN_PREFIX):
        return resolve_builtin(str(path_or_hub_id))
    path = Path(path_or_hub_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{str(path_or_hub_id)!r} is not a checkpoint folder (it is a file)")
        return path
    name = str(path_or_hub_id)
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~")) and "\\" not in name
    if not looks_like_hub_id:
        raise FileNotFoundError(f"checkpoint folder {name!r} does not exist")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise FileNotFoundError(
            f"{name!r} is not a local folder, and loading hub ids needs huggingface_hub (pip install 'ssmtune[hf]')"
        ) from e
    try:
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt"]))
    except Exception as e:  # offline, unknown repo, gated repo: all mean "not loadable"
        raise FileNotFoundError(
            f"{name!r} is not a local folder and could not be fetched from the Hugging Face hub "
            f"({type(e).__name__}: {e})"
        ) from e


def read_config(folder: str | os.PathLike) -> tuple[SSMConfig, str]:
    """The config of a checkpoint folder and its layout ("hf" or "mamba_ssm")."""
    folder = Path(folder)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{str(folder)!r} is not a checkpoint folder: it has no config.json")
    d = json.loads(cfg_file.read_text())
    if "model_type" in d:
        return config_from_hf(d), "hf"
    if "d_model" in d and "n_layer" in d:
        return config_from_mamba_ssm(d), "mamba_ssm"
    raise ValueError(
        f"{str(cfg_file)!r} is neither an HF config (no 'model_type') nor a mamba_ssm config (no 'd_model'/'n_layer')"
    )


def _load_file(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"refusing to load {str(file)!r}: it is not a file of tensors and plain data (an unsafe pickle, which "
            f"could run code, or a damaged file): {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None


def read_state_dict(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder (single file or sharded), keys as stored."""
    folder = Path(folder)
    for name in WEIGHT_FILES:
        file = folder / name
        if not file.is_file():
            continue
        if name.endswith(".index.json"):
            shards = sorted(set(json.loads(file.read_text())["weight_map"].values()))
            sd: dict[str, torch.Tensor] = {}
            for shard in shards:
                if not (folder / shard).is_file():
                    raise FileNotFoundError(f"shard {shard!r} listed in {str(file)!r} is missing")
                sd.update(_load_file(folder / shard))
            return sd
        return _load_file(file)
    found = sorted(p.name for p in folder.iterdir())[:10]
    raise ValueError(f"{str(folder)!r} is not a checkpoint folder: none of {list(WEIGHT_FILES)} found (has {found})")


def _load_tokenizer(folder: Path) -> Any:
    marker = folder / "tokenizer_config.json"
    if marker.is_file() and not (folder / "tokenizer.json").is_file():
        # models pretrained here use the built-in byte tokenizer and mark it so
        cfg = json.loads(marker.read_text())
        if cfg.get("tokenizer_class") == "ByteTokenizer":
            from ..tokenizer import ByteTokenizer

            return ByteTokenizer(add_sep_token=bool(cfg.get("add_sep_token", False)))
    if not (folder / "tokenizer.json").is_file():
        return None
    try:
        from ..tokenizer import load_tokenizer
    except ImportError:
        load_tokenizer = None
    if load_tokenizer is not None:
        try:
            return load_tokenizer(folder)
        except ValueError:  # e.g. no <|endoftext|> in the vocabulary: fall back to the raw tokenizer
            pass
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    return Tokenizer.from_file(str(folder / "tokenizer.json"))


def load_model(
    path_or_hub_id: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> SSMForCausalLM:
    """Load a Mamba / Mamba-2 causal LM from a checkpoint folder (HF transformers or mamba_ssm layout) or a hub id;
    a transformers hybrid folder gives transformers' model with ssmtune's mixers (``ssmtune.from_transformers``).

    Args:
        path_or_hub_id: a local folder, or an HF hub id (needs huggingface_hub and network access).
        dtype: parameter dtype (default fp32); A_log and D stay fp32.
        device: where the parameters live (default CPU).
    Returns:
        the model in eval mode, with ``model.tokenizer`` set when the folder has a ``tokenizer.json``.
    Raises:
        FileNotFoundError: the folder does not exist (and is not a reachable hub id).
        ValueError: not a checkpoint folder, unknown model_type, missing/unexpected keys, shape mismatches.
    """
    folder = _resolve_folder(path_or_hub_id)
    cfg_file = folder / "config.json"
    model_type = json.loads(cfg_file.read_text()).get("model_type") if cfg_file.is_file() else None
    if model_type in HYBRID_MODEL_TYPES:
        from .hybrid import load_hybrid

        return load_hybrid(folder, dtype=dtype, device=device, tokenizer=_load_tokenizer(folder))
    if model_type is not None and model_type not in HF_ARCHITECTURES:
        raise ValueError(
            f"unknown model_type {model_type!r} in {str(cfg_file)!r}; ssmtune loads {sorted(HF_ARCHITECTURES)} and "
            f"the hybrids {sorted(HYBRID_MODEL_TYPES)}"
        )
    config, _ = read_config(folder)
    sd = state_dict_to_native(read_state_dict(folder))
    device = torch.device(device) if device is not None else torch.device("cpu")
    with torch.device("meta"):
        model = causal_lm_for(config, init=False)
    sd = check_state_dict(sd, model.state_dict(), str(folder), tied=config.tie_embeddings)
    model = model.to_empty(device=device)
    if dtype is not None:
        model = model.to(dtype)
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1] in FP32_PARAMS and ".mixer." in name:
                p.data = p.data.float()
    if config.tie_embeddings:
        model.lm_head.weight = model.backbone.embeddings.weight
    model.load_state_dict(sd, strict=not config.tie_embeddings)
    model.tokenizer = _load_tokenizer(folder)
    return model.eval()


def save_pretrained(model: SSMForCausalLM, save_directory: str | os.PathLike) -> None:
    """Write ``config.json`` (HF transformers style) and ``model.safetensors`` so that transformers'
    ``MambaForCausalLM`` / ``Mamba2ForCausalLM.from_pretrained`` opens the folder. Every file is written to a temp
    file first, then all are moved into place. Adapters must be merged or removed first: state hooks and input hooks are
    skipped, and any other extra key (e.g. an unmerged LoRA wrapper) or changed shape raises ValueError."""
    from safetensors.torch import save_file

    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    sd = {k: v for k, v in model.state_dict().items() if ".state_hooks." not in k and not k.startswith("input_hooks.")}
    with torch.device("meta"):
        expected = causal_lm_for(config, init=False).state_dict()
    where = "save_pretrained (merge or remove adapters that change the base layout first)"
    sd = check_state_dict(sd, expected, where, tied=config.tie_embeddings)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    dtype = model.backbone.embeddings.weight.dtype
    hf_config = config_to_hf(config, dtype)
    writes = {
        folder / "model.safetensors": lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}),
        folder / "config.json": lambda tmp: Path(tmp).write_text(json.dumps(hf_config, indent=2) + "\n"),
    }
    tok = getattr(model, "tokenizer", None)
    # a raw tokenizers.Tokenizer, or ssmtune's wrapper around one
    save = getattr(tok, "save", None) or getattr(getattr(tok, "_tok", None), "save", None)
    if callable(save):
        writes[folder / "tokenizer.json"] = lambda tmp: save(tmp)
    # all staged before any replaces the old files, so an interrupted save leaves the old model whole
    atomic_write_files(writes)
