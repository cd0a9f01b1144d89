"""Config and state-dict mapping between ssmtune, HF transformers and mamba_ssm checkpoints.

The native state-dict layout is HF transformers' one, so HF checkpoints map one to one. mamba_ssm's
``MambaLMHeadModel`` differs only in ``backbone.embedding.weight`` (HF: ``backbone.embeddings.weight``); its mixer
parameter names are the same for Mamba-1 and Mamba-2.

    HF config key            mamba_ssm / ssmtune field
    hidden_size              d_model
    num_hidden_layers        n_layer
    state_size               d_state
    conv_kernel              d_conv
    time_step_rank           dt_rank (Mamba-1)
    num_heads, head_dim      nheads (derived), headdim (Mamba-2)
    n_groups                 ngroups (Mamba-2)
    use_bias, use_conv_bias  bias, conv_bias
    layer_norm_epsilon       norm_epsilon
    tie_word_embeddings      tie_embeddings
    time_step_min/max/floor  dt_min, dt_max, dt_init_floor
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from .config import Mamba2Config, MambaConfig, SSMConfig

HF_ARCHITECTURES = {"mamba": "MambaForCausalLM", "mamba2": "Mamba2ForCausalLM"}


def _get(d: dict[str, Any], key: str, default: Any) -> Any:
    value = d.get(key, default)
    return default if value is None else value


def _require(d: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in d]
    if missing:
        raise ValueError(f"{where}: missing keys {missing}")


def _as_float(v: Any) -> float:
    """JSON numbers, and HF's encoding of non-finite floats ({"__float__": "Infinity"})."""
    return float(v["__float__"]) if isinstance(v, dict) and "__float__" in v else float(v)


def _unlimited(limit: Any) -> bool:
    """True for a Δ limit that clamps nothing: (0, inf)."""
    return limit is None or (_as_float(limit[0]) == 0.0 and math.isinf(_as_float(limit[1])))


def config_from_hf(d: dict[str, Any]) -> SSMConfig:
    """Config from an HF transformers ``config.json`` dict (``model_type`` "mamba" or "mamba2")."""
    model_type = d.get("model_type")
    if model_type not in HF_ARCHITECTURES:
        raise ValueError(f"unknown model_type {model_type!r}; known: {sorted(HF_ARCHITECTURES)}")
    _require(d, ("hidden_size", "num_hidden_layers", "vocab_size"), f"{model_type} config.json")
    hidden = d["hidden_size"]
    expand = _get(d, "expand", 2)
    common = {
        "d_model": hidden,
        "n_layer": d["num_hidden_layers"],
        "vocab_size": d["vocab_size"],
        "d_conv": _get(d, "conv_kernel", 4),
        "expand": expand,
        "conv_bias": _get(d, "use_conv_bias", True),
        "bias": _get(d, "use_bias", False),
        "norm_epsilon": _get(d, "layer_norm_epsilon", 1e-5),
        # HF checkpoints store the padded vocabulary already
        "pad_vocab_size_multiple": 1,
        "residual_in_fp32": _get(d, "residual_in_fp32", True),
        "dt_min": _get(d, "time_step_min", 0.001),
        "dt_max": _get(d, "time_step_max", 0.1),
        "dt_init_floor": _get(d, "time_step_floor", 1e-4),
        "rescale_prenorm_residual": _get(d, "rescale_prenorm_residual", False),
    }
    if model_type == "mamba":
        inter = d.get("intermediate_size")
        if inter is not None and inter != expand * hidden:
            raise ValueError(f"intermediate_size={inter} != expand * hidden_size = {expand * hidden}: not supported")
        rank = _get(d, "time_step_rank", "auto")
        return MambaConfig(
            **common,
            d_state=_get(d, "state_size", 16),
            dt_rank=rank,
            dt_scale=_get(d, "time_step_scale", 1.0),
            dt_init=_get(d, "time_step_init_scheme", "random"),
            tie_embeddings=_get(d, "tie_word_embeddings", True),
        )
    head_dim = _get(d, "head_dim", 64)
    num_heads = d.get("num_heads")
    if num_heads is not None and num_heads * head_dim != expand * hidden:
        raise ValueError(
            f"num_heads * head_dim = {num_heads * head_dim} != expand * hidden_size = {expand * hidden}: not supported"
        )
    limit = d.get("time_step_limit")
    if not _unlimited(limit):
        warnings.warn(f"time_step_limit={limit} is ignored: ssmtune does not clamp Δ", stacklevel=3)
    return Mamba2Config(
        **common,
        d_state=_get(d, "state_size", 128),
        headdim=head_dim,
        ngroups=_get(d, "n_groups", 1),
        chunk_size=_get(d, "chunk_size", 256),
        tie_embeddings=_get(d, "tie_word_embeddings", False),
    )


def config_to_hf(config: SSMConfig, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """HF transformers ``config.json`` dict for ``config``; the vocabulary written is the padded one."""
    d: dict[str, Any] = {
        "architectures": [HF_ARCHITECTURES[config.model_type]],
        "model_type": config.model_type,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layer,
        "vocab_size": config.padded_vocab_size,
        "state_size": config.d_state,
        "conv_kernel": config.d_conv,
        "expand": config.expand,
        "use_bias": config.bias,
        "use_conv_bias": config.conv_bias,
        "layer_norm_epsilon": config.norm_epsilon,
        "residual_in_fp32": config.residual_in_fp32,
        "tie_word_embeddings": config.tie_embeddings,
        "time_step_min": config.dt_min,
        "time_step_max": config.dt_max,
        "time_step_floor": config.dt_init_floor,
        # init-only flag; transformers 5.23 applies it to loaded out_proj weights too, so it must stay off
        "rescale_prenorm_residual": False,
        "hidden_act": "silu",
    }
    if isinstance(config, MambaConfig):
        d.update(
            intermediate_size=config.d_inner,
            time_step_rank=config.dt_rank,
            time_step_scale=config.dt_scale,
            time_step_init_scheme=config.dt_init,
        )
    elif isinstance(config, Mamba2Config):
        if config.D_has_hdim:
            raise ValueError("D_has_hdim=True has no HF transformers equivalent (its D is [nheads])")
        d.update(
            num_heads=config.nheads, head_dim=config.headdim, n_groups=config.ngroups, chunk_size=config.chunk_size
        )
    if dtype is not None:
        d["dtype"] = str(dtype).removeprefix("torch.")
    return d


def config_from_mamba_ssm(d: dict[str, Any]) -> SSMConfig:
    """Config from a mamba_ssm ``MambaLMHeadModel`` ``config.json`` dict (d_model, n_layer, ssm_cfg, ...)."""
    _require(d, ("d_model", "n_layer", "vocab_size"), "mamba_ssm config.json")
    ssm_cfg = dict(d.get("ssm_cfg") or {})
    layer = ssm_cfg.pop("layer", "Mamba1")
    if d.get("attn_layer_idx"):
        raise ValueError(f"attn_layer_idx={d['attn_layer_idx']}: hybrid attention layers are not supported")
    if d.get("d_intermediate", 0):
        raise ValueError(f"d_intermediate={d['d_intermediate']}: MLP blocks are not supported")
    if not d.get("rms_norm", True):
        raise ValueError("rms_norm=False (LayerNorm blocks) is not supported")
    common = {
        "d_model": d["d_model"],
        "n_layer": d["n_layer"],
        "vocab_size": d["vocab_size"],
        "residual_in_fp32": d.get("residual_in_fp32", True),
        "pad_vocab_size_multiple": d.get("pad_vocab_size_multiple", 8),
        "tie_embeddings": d.get("tie_embeddings", True),
        "norm_epsilon": d.get("norm_epsilon", 1e-5),
    }
    names = {
        "Mamba1": ("d_state", "d_conv", "expand", "dt_rank", "dt_min", "dt_max", "dt_init", "dt_scale",
                   "dt_init_floor", "conv_bias", "bias"),
        "Mamba2": ("d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size", "D_has_hdim", "A_init_range",
                   "dt_min", "dt_max", "dt_init_floor", "conv_bias", "bias"),
    }  # fmt: skip
    if layer not in names:
        raise ValueError(f"unknown ssm_cfg layer {layer!r}; known: {sorted(names)}")
    if layer == "Mamba2":
        if not ssm_cfg.pop("rmsnorm", True) or ssm_cfg.pop("norm_before_gate", False):
            raise ValueError("only rmsnorm=True, norm_before_gate=False Mamba-2 layers are supported")
        d_ssm = ssm_cfg.pop("d_ssm", None)
        if d_ssm is not None and d_ssm != ssm_cfg.get("expand", 2) * d["d_model"]:
            raise ValueError(f"d_ssm={d_ssm}: a partial SSM width is not supported")
        limit = ssm_cfg.pop("dt_limit", None)
        if not _unlimited(limit):
            warnings.warn(f"dt_limit={limit} is ignored: ssmtune does not clamp Δ", stacklevel=3)
    kwargs = {k: v for k, v in ssm_cfg.items() if k in names[layer]}
    ignored = sorted(set(ssm_cfg) - set(kwargs) - {"use_fast_path", "layer_idx", "activation", "sequence_parallel"})
    if ignored:
        warnings.warn(f"mamba_ssm ssm_cfg keys ignored: {ignored}", stacklevel=3)
    cls = Mamba2Config if layer == "Mamba2" else MambaConfig
    return cls(**common, **kwargs)


def state_dict_to_native(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF or mamba_ssm keys → native keys (``backbone.embedding.`` → ``backbone.embeddings.``)."""
    out = {}
    for key, value in sd.items():
        if key.startswith("backbone.embedding."):
            key = "backbone.embeddings." + key.removeprefix("backbone.embedding.")
        out[key] = value
    return out


def check_state_dict(
    sd: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], where: str, *, tied: bool
) -> dict[str, torch.Tensor]:
    """Raise ValueError on missing/unexpected keys or shape mismatches; drop a tied ``lm_head.weight``."""
    sd = dict(sd)
    if tied:
        sd.pop("lm_head.weight", None)
        expected = {k: v for k, v in expected.items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        parts = [f"{len(missing)} missing state-dict keys, e.g. {missing[:5]}"] if missing else []
        parts += [f"{len(unexpected)} unexpected state-dict keys, e.g. {unexpected[:5]}"] if unexpected else []
        raise ValueError(f"{where}: " + "; ".join(parts))
    bad = [f"{k}: expected {tuple(v.shape)}, got {tuple(sd[k].shape)}" for k, v in expected.items()
           if tuple(sd[k].shape) != tuple(v.shape)]  # fmt: skip
    if bad:
        raise ValueError(f"{where}: {len(bad)} shape mismatches, e.g. {bad[:5]}")
    return sd
