"""Tiny random Mamba-1 / Mamba-2 models and the method case table shared by the method tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ssmtune.core.config import AdapterConfig
from ssmtune.methods import (
    AdditionalScanConfig,
    BitFitConfig,
    FullConfig,
    InitialStateConfig,
    LoraConfig,
    PartialConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    SDLoraConfig,
    StateOffsetConfig,
)
from ssmtune.models import InferenceCache, Mamba2Config, MambaConfig, causal_lm_for

VOCAB = 37


def tiny_config(arch: str, **kw) -> MambaConfig | Mamba2Config:
    """Odd-ish sizes: Mamba-1 D=32, N=5, R=3; Mamba-2 D=32, H=4, P=8, G=2, N=6."""
    if arch == "m1":
        base = {
            "d_model": 16,
            "n_layer": 2,
            "vocab_size": VOCAB,
            "d_state": 5,
            "dt_rank": 3,
            "pad_vocab_size_multiple": 1,
        }
        return MambaConfig(**{**base, **kw})
    base = {
        "d_model": 16,
        "n_layer": 2,
        "vocab_size": VOCAB,
        "d_state": 6,
        "headdim": 8,
        "ngroups": 2,
        "chunk_size": 4,
        "pad_vocab_size_multiple": 1,
    }
    return Mamba2Config(**{**base, **kw})


def tiny_model(arch: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **kw):
    torch.manual_seed(seed)
    model = causal_lm_for(tiny_config(arch, **kw))
    # A larger dt bias than the mamba init makes the scans' state matter over a few tokens.
    with torch.no_grad():
        for _, mixer in model.mixers():
            if hasattr(mixer, "dt_proj"):
                mixer.dt_proj.bias.add_(2.0)
            else:
                mixer.dt_bias.add_(2.0)
    return model.to(dtype).eval()


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[], AdapterConfig | list[AdapterConfig]]
    identity_at_init: bool = True
    mergeable: bool = False
    arches: tuple[str, ...] = ("m1", "m2")


M1_LORA_ALL = ["in_proj.x", "in_proj.z", "x_proj.dt", "x_proj.B", "x_proj.C", "dt_proj", "out_proj"]
M2_LORA_ALL = ["in_proj.z", "in_proj.x", "in_proj.B", "in_proj.C", "in_proj.dt", "out_proj"]

CASES = [
    Case("state_offset_h", lambda: StateOffsetConfig()),
    Case("state_offset_y", lambda: StateOffsetConfig(variant="y")),
    Case("state_offset_h_lowrank", lambda: StateOffsetConfig(rank=2, r_ratio=2, layers_to_transform=[1])),
    Case("initial_state", lambda: InitialStateConfig()),
    Case("initial_state_conv", lambda: InitialStateConfig(conv_state=True)),
    Case("prefix", lambda: PrefixTuningConfig(num_virtual_tokens=3), identity_at_init=False),
    Case("prompt", lambda: PromptTuningConfig(num_virtual_tokens=2), identity_at_init=False),
    Case("lora_whole", lambda: LoraConfig(r=2, target_modules=["in_proj", "out_proj"]), mergeable=True),
    Case(
        "lora_m1_slices",
        lambda: LoraConfig(r=2, lora_alpha=4, target_modules=M1_LORA_ALL),
        mergeable=True,
        arches=("m1",),
    ),
    Case("lora_m2_slices", lambda: LoraConfig(r=2, target_modules=M2_LORA_ALL), mergeable=True, arches=("m2",)),
    Case("dora", lambda: LoraConfig(r=2, use_dora=True, target_modules=["in_proj.z", "out_proj"]), mergeable=True),
    Case("so_h+lora", lambda: [StateOffsetConfig(), LoraConfig(r=2, target_modules=["out_proj"])]),
    Case("bitfit", lambda: BitFitConfig(), mergeable=True),
    Case("partial_default", lambda: PartialConfig(), mergeable=True),
    Case(
        "partial_norms",
        lambda: PartialConfig(
            parameters=["D", "re:layers\\.\\d+\\.norm\\.weight", "norm_f.*"], layers_to_transform=[1]
        ),
        mergeable=True,
    ),
    Case("full", lambda: FullConfig(), mergeable=True),
    Case("additional_scan", lambda: AdditionalScanConfig(n_states=3), arches=("m1",)),
    # tiny sizes: D=32 (M2: H=4), N=5 (M2: G·N=12); the paper's β=0.99 would leave no channel
    Case("sdlora", lambda: SDLoraConfig(state_freeze=0.6, channel_freeze=0.85, r=2), mergeable=True),
    Case(
        "sdlora+bitfit",
        lambda: [SDLoraConfig(channel_freeze=0.9, r=2, lora_targets=["x_proj.B"]), BitFitConfig()],
        mergeable=True,
        arches=("m1",),
    ),
]

PARAMS = [(c, a) for c in CASES for a in c.arches]
IDS = [f"{c.id}-{a}" for c, a in PARAMS]


def perturb(peft_model, scale: float = 0.3) -> None:
    """Move every adapter tensor away from its init (LoRA B, offsets, states), reproducibly."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p) * scale)


def decode_logits(model, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Prefill ``ids[:, :prefill]`` into a fresh cache, then step the rest one token at a time."""
    cache = InferenceCache(model.config.n_layer)
    outs = [model(ids[:, :prefill], cache=cache).logits]
    for t in range(prefill, ids.shape[1]):
        outs.append(model(ids[:, t : t + 1], cache=cache).logits)
    return torch.cat(outs, dim=1)
