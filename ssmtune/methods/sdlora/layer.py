from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ...core.inject import ParamDelta, adapter_key, parametrize_param, wrap_linear
from ...core.targets import is_mamba2, iter_mixers
from ..lora.config import MAMBA1_TARGETS, MAMBA2_TARGETS
from ..lora.layer import LoraDelta, slice_rows
from .config import (
    MAMBA1_LORA_DEFAULT,
    MAMBA1_SDT_TARGETS,
    MAMBA2_LORA_DEFAULT,
    MAMBA2_SDT_TARGETS,
    SDLoraConfig,
)


@dataclass(frozen=True)
class Layout:
    """Sizes of one mixer that fix where the selected entries sit in the flattened tensors."""

    mamba2: bool
    d_inner: int
    """D."""
    d_state: int
    """N (Mamba-2: G·N, the B or C rows of in_proj)."""
    dt_rank: int = 0
    """R (Mamba-1)."""
    nheads: int = 0
    """H (Mamba-2)."""
    d_model: int = 0
    """in_proj's input width (Mamba-2)."""

    @classmethod
    def of(cls, mixer: nn.Module) -> Layout:
        if is_mamba2(mixer):
            return cls(True, mixer.d_inner, mixer.ngroups * mixer.d_state, nheads=mixer.nheads,
                       d_model=mixer.in_proj.in_features)  # fmt: skip
        return cls(False, mixer.d_inner, mixer.d_state, dt_rank=mixer.dt_proj.in_features)

    def sizes(self, config: SDLoraConfig) -> tuple[int, int]:
        """(k_c, k_s): selected channels (M2: heads) per layer, states per channel (M2: B/C rows per layer)."""
        if self.mamba2:
            # round first, so (1 - 0.7)·10 = 3.0000000000000004 does not become 4
            k_c = math.ceil(round((1 - config.channel_freeze) * self.nheads, 9))
            k_s = math.ceil(round((1 - config.state_freeze) * self.d_state, 9))
        else:
            k_c = self.d_inner - round(config.channel_freeze * self.d_inner)
            k_s = self.d_state - round(config.state_freeze * self.d_state)
        if k_c < 1 or k_s < 1:
            raise ValueError(
                f"SDLoraConfig: channel_freeze={config.channel_freeze!r} and state_freeze={config.state_freeze!r} "
                f"leave k_c={k_c} channels and k_s={k_s} states of D={self.nheads if self.mamba2 else self.d_inner}, "
                f"N={self.d_state}; lower the freeze ratios"
            )
        return k_c, k_s

    def index(self, target: str, channels: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """Flat positions of ``target``'s trainable entries.

        Mamba-1: channels [k_c], states [k_c, k_s] (per channel). Mamba-2: channels = heads [k_h], states = B/C rows [k_s].
        """
        dev = channels.device
        if not self.mamba2:
            n, d = self.d_state, self.d_inner
            if target == "A_log":  # A_log [D, N]: entries (c, s) for s in 𝒮_c
                return (channels[:, None] * n + states).reshape(-1)
            # x_proj.weight [R + 2N, D]: all N rows of the block, columns 𝒞
            start = self.dt_rank + (0 if target == "x_proj.B" else n)
            rows = start + torch.arange(n, device=dev)
            return (rows[:, None] * d + channels[None, :]).reshape(-1)
        if target in ("A_log", "dt_bias"):  # [H]
            return channels.clone()
        # in_proj.weight [2D + 2GN + H, d_model]: rows 𝒮 of the B (or C) block, all columns
        start = 2 * self.d_inner + (0 if target == "in_proj.B" else self.d_state)
        rows = start + states
        return (rows[:, None] * self.d_model + torch.arange(self.d_model, device=dev)[None, :]).reshape(-1)

    def placeholder(self, k_c: int, k_s: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        channels = torch.arange(k_c, device=device)
        if self.mamba2:
            return channels, torch.arange(k_s, device=device)
        return channels, torch.arange(k_s, device=device).expand(k_c, k_s).clone()


class SparseDelta(ParamDelta):
    """X' = X + δ on the entries at the flat positions ``index`` only; δ [k] is fp32 and zero-init.

    Only the selected entries are parameters, so the trainable count is exact and nothing else can change under any
    optimiser (equal to the dense-delta-with-masked-gradient form of the reference under AdamW with weight decay 0).
    ``index`` (long) and ``selected`` (1 once ``sdt_select`` has written a selection) are saved with the adapter.
    """

    def __init__(
        self, like: torch.Tensor, index: torch.Tensor, *, target: str, layer_path: str, layout: Layout
    ) -> None:
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(index.numel(), dtype=torch.float32, device=like.device))  # [k]
        self.register_buffer("index", index.to(device=like.device, dtype=torch.long))
        self.register_buffer("selected", torch.zeros(1, dtype=torch.uint8, device=like.device))
        self.target = target
        self.numel = like.numel()
        self.layer_path = layer_path
        self.layout = layout
        # inject arms the placeholder check once attached (registration itself evaluates the parametrization)
        self._checked = True

    def transform(self, X: torch.Tensor) -> torch.Tensor:
        if self.training and not self._checked and self.selected.device.type != "meta":
            self._checked = True
            if not bool(self.selected.item()):
                warnings.warn(
                    "SDLoRA trains a placeholder selection (channels/states 0..k-1): call "
                    "ssmtune.methods.sdlora.sdt_select(model, warmup_batches, ...) before training",
                    stacklevel=2,
                )
        flat = X.reshape(-1)
        # the sum is formed in fp32 and rounded once, as with an fp32 master copy of a bf16 weight
        vals = (flat[self.index].float() + self.delta).to(X.dtype)
        return flat.index_put((self.index,), vals).view_as(X)

    def validate_loaded(self) -> None:
        """After loading a file: the indices must be distinct entries of the target tensor."""
        idx = self.index
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.numel):
            raise ValueError(
                f"SDLoRA {self.layer_path}.{self.target}: index out of range [0, {self.numel}): "
                f"min {int(idx.min())}, max {int(idx.max())}"
            )
        if idx.unique().numel() != idx.numel():
            raise ValueError(f"SDLoRA {self.layer_path}.{self.target}: the saved index repeats entries")

    @torch.no_grad()
    def set_selection(self, channels: torch.Tensor, states: torch.Tensor) -> None:
        index = self.layout.index(self.target, channels.to(self.index.device), states.to(self.index.device))
        if index.shape != self.index.shape:
            raise AssertionError(f"selection size {tuple(index.shape)} != adapter size {tuple(self.index.shape)}")
        self.index.copy_(index)
        self.delta.zero_()
        self.selected.fill_(1)


def targets_for(mixer: nn.Module, config: SDLoraConfig) -> tuple[list[str], list[str]]:
    """(sdt targets, lora targets) of the config for this mixer's architecture; ValueError on a foreign name."""
    m2 = is_mamba2(mixer)
    arch = "Mamba-2" if m2 else "Mamba-1"
    sdt_valid, lora_valid = (MAMBA2_SDT_TARGETS, MAMBA2_TARGETS) if m2 else (MAMBA1_SDT_TARGETS, MAMBA1_TARGETS)
    sdt = list(config.sdt_targets) if config.sdt_targets is not None else list(sdt_valid)
    lora_default = MAMBA2_LORA_DEFAULT if m2 else MAMBA1_LORA_DEFAULT
    lora = list(config.lora_targets) if config.lora_targets is not None else list(lora_default)
    bad = [t for t in sdt if t not in sdt_valid] + [t for t in lora if t not in lora_valid]
    if bad:
        raise ValueError(
            f"SDLoraConfig: {bad} are not {arch} targets; sdt_targets: {list(sdt_valid)}, lora_targets: {list(lora_valid)}"
        )
    return sdt, lora


def _tensor_owner(mixer: nn.Module, target: str) -> tuple[nn.Module, str]:
    """The module and attribute holding the tensor of an SDT target (the plain Linear under a LoRA wrapper)."""
    if target in ("A_log", "dt_bias"):
        return mixer, target
    lin = getattr(mixer, target.split(".")[0])
    return getattr(lin, "base_layer", lin), "weight"


def inject(model: nn.Module, config: SDLoraConfig, *, adapter_name: str) -> dict[str, nn.Module]:
    plan = []
    for t in iter_mixers(model, config.layers_to_transform):
        sdt, lora = targets_for(t.mixer, config)
        layout = Layout.of(t.mixer)
        plan.append((t, sdt, lora, layout, layout.sizes(config)))
    deltas, loras = {}, {}
    for t, sdt, lora, layout, (k_c, k_s) in plan:
        channels, states = layout.placeholder(k_c, k_s, t.mixer.A_log.device)
        for target in sdt:
            module, name = _tensor_owner(t.mixer, target)
            delta = SparseDelta(
                getattr(module, name), layout.index(target, channels, states),
                target=target, layer_path=t.path, layout=layout,
            )  # fmt: skip
            delta.train(t.mixer.training)
            deltas[f"{t.path}.{target}.sdt"] = parametrize_param(module, name, delta)
            delta._checked = False
        for target in lora:
            name, rows = slice_rows(t.mixer, target)
            lin = getattr(t.mixer, name)
            base = getattr(lin, "base_layer", lin)
            delta = LoraDelta(base, rows, r=config.r, alpha=config.lora_alpha, dropout=config.lora_dropout)
            # new modules start in training mode; follow the model's, or dropout would act in an eval model
            delta.train(t.mixer.training)
            tag = "sdlora" if rows is None else f"sdlora_{target.partition('.')[2]}"
            wrap_linear(t.mixer, name, delta, key=adapter_key(adapter_name, tag))
            loras[f"{t.path}.{target}.sdlora"] = delta
    # parameter deltas first: merging them before LoRA keeps a LoRA merge into the same Linear exact
    return {**deltas, **loras}
