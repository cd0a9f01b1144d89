"""Inference cache: per layer, the conv window and the SSM state of the tokens seen so far.

    Mamba-1: conv_state [B, D, K-1]          ssm_state [B, D, N] (fp32)
    Mamba-2: conv_state [B, D+2GN, K-1]      ssm_state [B, H, P, N] (fp32)

The cache always holds the un-offset state: state offsets (h', y') act on the read-out only (docs/methods.md §4.1).
A layer cache with ``seqlen_offset == 0`` is *fresh*: the next forward is a prefill, where initial states from
state hooks apply. Otherwise the mixer continues from the cached states, exactly, for any number of tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class LayerCache:
    """Cache of one mixer. Tensors are None until the first prefill (lazy allocation) or ``allocate``."""

    conv_state: torch.Tensor | None = None
    """[B, conv_dim, K-1], in the activations' dtype."""
    ssm_state: torch.Tensor | None = None
    """[B, D, N] or [B, H, P, N], fp32."""
    seqlen_offset: int = 0
    """Tokens already consumed by this layer."""

    @property
    def fresh(self) -> bool:
        return self.seqlen_offset == 0

    def store(self, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> None:
        """Write prefill results, in place when a buffer of the same shape exists (pre-allocated caches). Stored
        states are contiguous: the decode kernels update them in place (a scan's final state can be a strided view)."""
        if self.conv_state is not None and self.conv_state.shape == conv_state.shape:
            self.conv_state.copy_(conv_state)
        else:
            self.conv_state = conv_state.contiguous()
        if self.ssm_state is not None and self.ssm_state.shape == ssm_state.shape:
            self.ssm_state.copy_(ssm_state)
        else:
            self.ssm_state = ssm_state.float().contiguous()


class InferenceCache:
    """Caches of all layers, indexed by layer. ``InferenceCache(n_layer)`` is empty; mixers fill it on prefill."""

    def __init__(self, num_layers: int) -> None:
        self.layers = [LayerCache() for _ in range(num_layers)]

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, layer_idx: int) -> LayerCache:
        return self.layers[layer_idx]

    @property
    def seqlen_offset(self) -> int:
        """Tokens consumed so far (including positions added by input hooks)."""
        return self.layers[0].seqlen_offset if self.layers else 0

    @seqlen_offset.setter
    def seqlen_offset(self, value: int) -> None:
        for layer in self.layers:
            layer.seqlen_offset = value

    @property
    def batch_size(self) -> int | None:
        for layer in self.layers:
            if layer.ssm_state is not None:
                return layer.ssm_state.shape[0]
        return None

    @classmethod
    def allocate(
        cls,
        mixers: Iterable[nn.Module],
        batch_size: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> InferenceCache:
        """Zero states for each mixer, with shapes from its current ``conv_state_shape`` / ``state_shape``."""
        mixers = list(mixers)
        cache = cls(len(mixers))
        for layer, mixer in zip(cache.layers, mixers):
            # the conv window holds activations: default to the conv weight's dtype (A_log stays fp32)
            ref = mixer.conv1d.weight
            dev = ref.device if device is None else torch.device(device)
            layer.conv_state = torch.zeros(batch_size, *mixer.conv_state_shape, dtype=dtype or ref.dtype, device=dev)
            layer.ssm_state = torch.zeros(batch_size, *mixer.state_shape, dtype=torch.float32, device=dev)
        return cache

    def reset(self) -> None:
        """Mark every layer fresh (buffers are kept and overwritten by the next prefill)."""
        self.seqlen_offset = 0

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Select batch rows, e.g. the surviving beams: every state becomes ``state[beam_idx]``."""
        for layer in self.layers:
            if layer.conv_state is not None:
                layer.conv_state = layer.conv_state.index_select(0, beam_idx.to(layer.conv_state.device))
            if layer.ssm_state is not None:
                layer.ssm_state = layer.ssm_state.index_select(0, beam_idx.to(layer.ssm_state.device))

    @classmethod
    def cat(cls, caches: list[InferenceCache]) -> InferenceCache:
        """Concatenate caches of the same depth and offset along the batch axis (rows prefilled one by one)."""
        if not caches:
            raise ValueError("InferenceCache.cat: got an empty list")
        out = cls(len(caches[0]))
        for i, layer in enumerate(out.layers):
            parts = [c[i] for c in caches]
            if any(p.conv_state is None or p.ssm_state is None for p in parts):
                raise ValueError(f"InferenceCache.cat: layer {i} is not filled in every cache")
            layer.conv_state = torch.cat([p.conv_state for p in parts], dim=0)
            layer.ssm_state = torch.cat([p.ssm_state for p in parts], dim=0)
            layer.seqlen_offset = max(p.seqlen_offset for p in parts)
        return out
