from __future__ import annotations

import torch
from torch import nn

from ...core.inject import adapter_key, add_state_hook
from ...core.targets import iter_mixers
from ...models.hooks import StateHook
from .config import InitialStateConfig


class InitialState(StateHook):
    """h0 [D, N] or [H, P, N] (+ conv0 [conv_dim, K-1]) of one mixer; fp32 parameters, zero init."""

    def __init__(
        self,
        state_shape: tuple[int, ...],
        conv_state_shape: tuple[int, int] | None = None,
        *,
        scale: float = 1.0,
        scale_in_training: bool = False,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.scale = scale
        self.scale_in_training = scale_in_training
        self.h0 = nn.Parameter(torch.zeros(state_shape, device=device))
        self.conv0 = None if conv_state_shape is None else nn.Parameter(torch.zeros(conv_state_shape, device=device))

    def initial_state(self, batch_size: int) -> torch.Tensor:
        # alpha scales h0 at inference, and in training only when asked (conv0 is an input window: never scaled)
        if self.scale == 1.0 or (self.training and not self.scale_in_training):
            return self.h0
        return self.h0 * self.scale

    def initial_conv_state(self, batch_size: int) -> torch.Tensor | None:
        return self.conv0


def inject(model: nn.Module, config: InitialStateConfig, *, adapter_name: str) -> dict[str, nn.Module]:
    attached = {}
    for t in iter_mixers(model, config.layers_to_transform):
        conv_shape = t.mixer.conv_state_shape if config.conv_state else None
        hook = InitialState(
            t.mixer.state_shape,
            conv_shape,
            scale=config.scale,
            scale_in_training=config.scale_in_training,
            device=t.mixer.A_log.device,
        )
        attached[f"{t.path}.initial_state"] = add_state_hook(t.mixer, adapter_key(adapter_name, "initial_state"), hook)
    return attached
