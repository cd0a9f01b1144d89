"""Causal depthwise conv1d with an initial conv state (the K-1 inputs before position 1): the torch path and the decode
step. The op ``ssmtune.ops.causal_conv1d`` dispatches between this and the Triton kernels of ``conv_fused.py``.

    x  [B, C, L]     weight  [C, K]     bias  [C]     initial_state  [C, K-1] or [B, C, K-1]

A zero initial state is the standard left padding. The final state is the last K-1 inputs of
(initial_state ⧺ x), so a continuation from it is exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def check_causal_conv1d_args(x, weight, initial_state, activation) -> None:
    """ValueError naming the bad argument of ``causal_conv1d``."""
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d: x must be [B, C, L], got shape {tuple(x.shape)}")
    batch, channels, _ = x.shape
    if weight.dim() != 2 or weight.shape[0] != channels:
        raise ValueError(f"causal_conv1d: weight must be [C={channels}, K], got shape {tuple(weight.shape)}")
    if activation not in (None, "silu"):
        raise ValueError(f"causal_conv1d: activation must be None or 'silu', got {activation!r}")
    width = weight.shape[1]
    if initial_state is not None and (
        initial_state.shape[-2:] != (channels, width - 1)
        or initial_state.dim() not in (2, 3)
        or (initial_state.dim() == 3 and initial_state.shape[0] != batch)
    ):
        raise ValueError(
            f"causal_conv1d: initial_state must be [C={channels}, K-1={width - 1}] or [B={batch}, C, K-1], "
            f"got shape {tuple(initial_state.shape)}"
        )


def causal_conv1d_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    initial_state: torch.Tensor | None = None,
    activation: str | None = None,
    return_final_state: bool = False,
    channels_last: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The torch path of ``ssmtune.ops.causal_conv1d``: zero/initial-state padding, ``F.conv1d`` in x's dtype."""
    batch, channels, _ = x.shape
    width = weight.shape[1]
    if initial_state is None:
        pad = x.new_zeros(batch, channels, width - 1)
    else:
        pad = initial_state.to(x.dtype).expand(batch, channels, width - 1)
    xp = torch.cat([pad, x], dim=-1)  # [B, C, K-1+L]
    if x.shape[-1] == 0:  # F.conv1d refuses an input shorter than the kernel: an empty output, the state unchanged
        y = x.new_empty(batch, channels, 0)
        return (y, xp.clone()) if return_final_state else y
    y = F.conv1d(xp, weight.unsqueeze(1).to(x.dtype), None if bias is None else bias.to(x.dtype), groups=channels)
    if activation == "silu":
        y = F.silu(y)
    if channels_last:
        y = y.transpose(1, 2).contiguous().transpose(1, 2)
    if return_final_state:
        return y, xp[..., xp.shape[-1] - (width - 1) :]
    return y


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """One decode step: x [B, C]; conv_state [B, C, K-1] is rolled in place; returns y [B, C]."""
    window = torch.cat([conv_state.to(x.dtype), x.unsqueeze(-1)], dim=-1)  # [B, C, K]
    y = (window * weight.to(x.dtype)).sum(-1)
    if bias is not None:
        y = y + bias.to(x.dtype)
    conv_state.copy_(window[..., 1:])
    return torch.nn.functional.silu(y) if activation == "silu" else y
