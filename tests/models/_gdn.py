"""Tiny random Gated DeltaNet hybrids written by transformers itself (no downloads), for the GDN tests."""

from __future__ import annotations

import torch
from _hybrid import COMMON

_GDN = {
    "num_hidden_layers": 2,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,  # grouped value heads: two per key head
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 6,
    "layer_types": ["linear_attention", "full_attention"],
}
_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32}
EXTRA = {
    "qwen3_5_text": {**_GDN, "head_dim": 16},
    "qwen3_5_moe_text": {**_GDN, **_MOE, "head_dim": 16},
    "qwen3_next": {**_GDN, **_MOE, "head_dim": 16},
    "olmo_hybrid": {**_GDN, "linear_num_key_heads": 4, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 1},
    # KDA: one decay per key channel; multi-head latent attention in the other layer
    "kimi_linear": {
        "num_hidden_layers": 2,
        "num_key_value_heads": 4,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 1,
        "linear_attn_config": {
            "head_dim": 8,
            "num_heads": 4,
            "short_conv_kernel_size": 4,
            "full_attn_layers": [2],
            "kda_layers": [1],
        },
        "q_lora_rank": None,
        "kv_lora_rank": 16,
        "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 8,
        "v_head_dim": 8,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "n_group": 1,
        "topk_group": 1,
    },
}
GDN_FAMILIES = list(EXTRA)
# the mixer's own Linears per family (LoRA targets)
MIXER_LINEARS = {
    "qwen3_5_text": ["in_proj_qkv", "in_proj_z", "in_proj_a", "out_proj"],
    "qwen3_5_moe_text": ["in_proj_qkv", "in_proj_b", "out_proj"],
    "qwen3_next": ["in_proj_qkvz", "in_proj_ba", "out_proj"],
    "olmo_hybrid": ["a_proj", "b_proj", "g_proj"],
    "kimi_linear": ["b_proj", "g_a_proj", "g_b_proj"],
}


def tiny_gdn_hf(model_type: str, *, seed: int = 0, **overrides):
    """transformers' own model from a tiny config, in eval mode, with a gate and norm that make the state matter."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**COMMON, **EXTRA[model_type], **overrides})
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "A_log") and hasattr(m, "dt_bias"):  # the mixer, or KDA's forget gate
                m.dt_bias.uniform_(-1.0, 1.0)
                m.A_log.uniform_(-2.0, 0.0)  # slow decays: the state carries over many tokens
            if hasattr(m, "conv1d"):  # the mixer: its gated norm
                (getattr(m, "norm", None) or m.o_norm).weight.uniform_(0.5, 1.5)
    return model


def tiny_gdn(model_type: str, *, seed: int = 0, **overrides):
    """The same model with ssmtune's mixers swapped in."""
    from ssmtune import from_transformers

    return from_transformers(tiny_gdn_hf(model_type, seed=seed, **overrides))
