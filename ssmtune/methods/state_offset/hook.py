from __future__ import annotations

import math

import torch
from torch import nn

from ...core.inject import adapter_key, add_state_hook
from ...core.targets import iter_mixers
from ...models.hooks import StateHook
from .config import StateOffsetConfig


class StateOffset(StateHook):
    """h' (``state_offset``) or y' (``output_offset``) of one mixer; fp32 parameters, zero init."""

    def __init__(
        self,
        state_shape: tuple[int, ...],
        *,
        variant: str = "h",
        rank: int | None = None,
        r_ratio: int = 1,
        output_shape: tuple[int, ...] | None = None,
        scale: float = 1.0,
        scale_in_training: bool = False,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.state_shape = tuple(state_shape)  # (D, N), (H, P, N) or Gated DeltaNet's (H, K, V)
        self.variant = variant
        self.rank = rank
        self.scale = scale
        self.scale_in_training = scale_in_training
        if variant == "y":
            # [D] or [H, P]; Gated DeltaNet reads out V, the last axis of its state: [H, V]
            shape = self.state_shape[:-1] if output_shape is None else tuple(output_shape)
            self.y_off = nn.Parameter(torch.zeros(shape, device=device))
        elif rank is None:
            self.h_off = nn.Parameter(torch.zeros(self.state_shape, device=device))  # [D, N] or [H, P, N]
        else:
            d, n = math.prod(self.state_shape[:-1]), self.state_shape[-1]
            if d % r_ratio != 0:
                raise ValueError(f"StateOffsetConfig.r_ratio={r_ratio!r} must divide the channel count D={d}")
            self.offset_B = nn.Parameter(torch.zeros(d // r_ratio, rank, device=device))  # [D/ρ, r]
            self.offset_A = nn.Parameter(torch.empty(rank, n * r_ratio, device=device))  # [r, N·ρ]
            nn.init.kaiming_uniform_(self.offset_A, a=math.sqrt(5))

    def _scaled(self, t: torch.Tensor) -> torch.Tensor:
        # alpha acts at inference, and in training only when asked
        if self.scale == 1.0 or (self.training and not self.scale_in_training):
            return t
        return t * self.scale

    def state_offset(self) -> torch.Tensor | None:
        if self.variant == "y":
            return None
        if self.rank is None:
            return self._scaled(self.h_off)
        return self._scaled((self.offset_B @ self.offset_A).reshape(self.state_shape))

    def output_offset(self) -> torch.Tensor | None:
        return self._scaled(self.y_off) if self.variant == "y" else None


def inject(model: nn.Module, config: StateOffsetConfig, *, adapter_name: str) -> dict[str, nn.Module]:
    tag = f"state_offset_{config.variant}"
    attached = {}
    for t in iter_mixers(model, config.layers_to_transform):
        hook = StateOffset(
            t.mixer.state_shape,
            variant=config.variant,
            rank=config.rank,
            r_ratio=config.r_ratio,
            output_shape=getattr(t.mixer, "output_offset_shape", None),
            scale=config.scale,
            scale_in_training=config.scale_in_training,
            device=t.mixer.A_log.device,
        )
        attached[f"{t.path}.{tag}"] = add_state_hook(t.mixer, adapter_key(adapter_name, tag), hook)
    return attached
