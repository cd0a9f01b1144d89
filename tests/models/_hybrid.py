"""Tiny random hybrid models written by transformers itself (no downloads), for the hybrid tests."""

from __future__ import annotations

import torch

VOCAB = 128
COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 96,
    "max_position_embeddings": 256,
}
# the mixer fields Granite-4.0-H and Bamba share
_GRANITE_BAMBA = {
    "num_hidden_layers": 2,
    "mamba_n_heads": 8,
    "mamba_d_head": 16,
    "mamba_d_state": 16,
    "mamba_n_groups": 2,
    "mamba_chunk_size": 8,
}
# groups > 1, chunk 8 (a 21-token input spans three chunks)
EXTRA = {
    "falcon_h1": {
        "num_hidden_layers": 2,
        "mamba_d_ssm": 128,
        "mamba_n_heads": 8,
        "mamba_d_head": 16,
        "mamba_d_state": 16,
        "mamba_n_groups": 2,
        "mamba_chunk_size": 8,
        "head_dim": 16,
    },
    "nemotron_h": {
        "num_hidden_layers": 3,
        "mamba_num_heads": 8,
        "mamba_head_dim": 16,
        "ssm_state_size": 16,
        "n_groups": 2,
        "chunk_size": 8,
        "hybrid_override_pattern": "M*-",
        "head_dim": 16,
    },
    "granitemoehybrid": {
        **_GRANITE_BAMBA,
        "layer_types": ["mamba", "attention"],
        "num_local_experts": 0,
        "shared_intermediate_size": 96,
    },
    "bamba": {
        **_GRANITE_BAMBA,
        "attn_layer_indices": [1],
    },
    "zamba2": {
        "num_hidden_layers": 2,
        "mamba_headdim": 16,
        "mamba_d_state": 16,
        "n_mamba_heads": 8,
        "mamba_ngroups": 2,
        "chunk_size": 8,
        "layers_block_type": ["mamba", "hybrid"],
        "attention_head_dim": 16,
    },
}
FAMILIES = list(EXTRA)
# recurrent mixers per family in the configs above
NUM_MIXERS = {"falcon_h1": 2, "nemotron_h": 1, "granitemoehybrid": 1, "bamba": 1, "zamba2": 2}


def _cache_kwarg() -> str:
    """The forward's name for the cache: ``cache`` from transformers 5.25 on, ``past_key_values`` before."""
    import re

    import transformers

    major, minor = (int(v) for v in re.match(r"(\d+)\.(\d+)", transformers.__version__).groups())
    return "cache" if (major, minor) >= (5, 25) else "past_key_values"


CACHE_KWARG = _cache_kwarg()


def tiny_config(model_type: str, **overrides):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **{**COMMON, **EXTRA[model_type], **overrides})


def tiny_hf(model_type: str, *, seed: int = 0, **overrides):
    """transformers' own model from a tiny config, in eval mode, with a dt bias that makes the state matter."""
    from transformers import AutoModelForCausalLM

    if model_type not in EXTRA:  # the Gated DeltaNet families
        from _gdn import tiny_gdn_hf

        return tiny_gdn_hf(model_type, seed=seed, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides)).eval()
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "A_log") and hasattr(m, "dt_bias"):
                m.dt_bias.uniform_(-1.0, 1.0)
                m.D.uniform_(0.5, 1.5)
                if hasattr(m.norm, "weight"):
                    m.norm.weight.uniform_(0.5, 1.5)
                if m.conv1d.bias is not None:
                    m.conv1d.bias.uniform_(-0.2, 0.2)
    return model


def tiny_hybrid(model_type: str, *, seed: int = 0, **overrides):
    """The same model with ssmtune's mixers swapped in."""
    from ssmtune import from_transformers

    return from_transformers(tiny_hf(model_type, seed=seed, **overrides))


def ids(batch: int = 2, length: int = 21, seed: int = 3) -> torch.Tensor:
    """Token ids in 1..VOCAB-1 (0 is the pad token of the generate tests)."""
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def decode_logits(model, input_ids: torch.Tensor, prefill: int, **kwargs) -> torch.Tensor:
    """Logits of a prefill of ``prefill`` tokens, then one token at a time through transformers' cache."""
    out = model(input_ids[:, :prefill], use_cache=True, **kwargs)
    cache = out.past_key_values
    logits = [out.logits]
    for j in range(prefill, input_ids.shape[1]):
        pos = torch.full((input_ids.shape[0], 1), j, device=input_ids.device)
        step = {CACHE_KWARG: cache, "use_cache": True, "position_ids": pos}
        out = model(input_ids[:, j : j + 1], **step, **kwargs)
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


def argmax_continuation(model, x: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by full forwards over the whole sequence (no cache)."""
    for _ in range(steps):
        nxt = model(x).logits[:, -1].argmax(-1, keepdim=True)
        x = torch.cat([x, nxt], dim=1)
    return x


# --- the generic PEFT checks that the SSD hybrids and the Gated DeltaNet models share --------------------------------


def check_identity_at_init(clean, model, identity_at_init: bool) -> None:
    """A fresh adapter leaves the logits as they were, or (Prefix, which adds tokens) visibly changes them."""
    from ssmtune.ops.testing import assert_close

    x = ids()
    with torch.no_grad():
        out, ref = model(x).logits, clean(x).logits
    if identity_at_init:
        assert_close("identity", ref, out, 0, atol=1e-6)
    else:
        assert (out - ref).abs().max() > 1e-4


def check_trains_only_adapters(clean, model) -> None:
    """Only the adapter's parameters train and get gradients; two steps change the output; disabled, it is the base."""
    from ssmtune.ops.testing import assert_close

    model.train()
    adapter = {id(p) for m in model.adapter_modules().values() for p in m.parameters()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == adapter
    x = ids()
    # Adam: steps of ~lr whatever the gradient's scale (Falcon-H1's multipliers make some tiny)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(2):  # LoRA's B starts at zero: its A gets a gradient from the second step on
        opt.zero_grad()
        model(x, labels=x).loss.backward()
        for n, p in model.named_parameters():
            assert (p.grad is not None) == (id(p) in adapter), n
        opt.step()
    model.eval()
    with torch.no_grad():
        assert (model(x).logits - clean(x).logits).abs().max().item() > 1e-4
        with model.disable_adapter():
            assert_close("disabled", clean(x).logits, model(x).logits, 0, atol=1e-5)


def check_decode_matches_forward(model) -> None:
    from ssmtune.ops.testing import assert_close

    x = ids(length=13)
    with torch.no_grad():
        assert_close("decode", model(x).logits, decode_logits(model, x, prefill=8), 1e-4, atol=1e-5)


def check_rows_match_alone(peft, rows: list) -> None:
    """A batch with one adapter per row (None: no adapter) equals each row run alone with its adapter."""
    from ssmtune.ops.testing import assert_close

    x = ids(batch=len(rows), length=9)
    with torch.no_grad():
        mixed = peft(x, adapter_names=rows).logits
        for b, name in enumerate(rows):
            if name is None:
                with peft.disable_adapter():
                    alone = peft(x[b : b + 1]).logits
            else:
                peft.set_adapter(name)
                alone = peft(x[b : b + 1]).logits
            assert_close(f"row {b} ({name})", alone[0], mixed[b], 1e-5, atol=1e-5)
