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
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.state_shape = tuple(state_shape)  # (D, N) or (H, P, N)
        self.variant = variant
        self.rank = rank
        if variant == "y":
            self.y_off = nn.Parameter(torch.zeros(self.state_shape[:-1], device=device))  # [D] or [H, P]
        elif rank is None:
            self.h_off = nn.Parameter(torch.zeros(self.state_shape, device=device))  # [D, N] or [H, P, N]
        else:
            d, n = math.prod(self.state_shape[:-1]), self.state_shape[-1]
            if d % r_ratio != 0:
                raise ValueError(f"StateOffsetConfig.r_ratio={r_ratio!r} must divide the channel count D={d}")
            self.offset_B = nn.Parameter(torch.zeros(d // r_ratio, rank, device=device))  # [D/ρ, r]
            self.offset_A = nn.Parameter(torch.empty(rank, n * r_ratio, device=device))  # [r, N·ρ]
            nn.init.kaiming_uniform_(self.offset_A, a=math.sqrt(5))

    def state_offset(self) -> torch.Tensor | None:
        if self.variant == "y":
            return None
        if self.rank is None:
            return self.h_off
        return (self.offset_B @ self.offset_A).reshape(self.state_shape)

    def output_offset(self) -> torch.Tensor | None:
        return self.y_off if self.variant == "y" else None


def inject(model: nn.Module, config: StateOffsetConfig, *, adapter_name: str) -> dict[str, nn.Module]:
    tag = f"state_offset_{config.variant}"
    attached = {}
    for t in iter_mixers(model, config.layers_to_transform):
        hook = StateOffset(
            t.mixer.state_shape,
            variant=config.variant,
            rank=config.rank,
            r_ratio=config.r_ratio,
            device=t.mixer.A_log.device,
        )
        attached[f"{t.path}.{tag}"] = add_state_hook(t.mixer, adapter_key(adapter_name, tag), hook)
    return attached
