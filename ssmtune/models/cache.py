"""Inference cache: per layer, the conv window and the SSM state of the tokens seen so far.

    Mamba-1: conv_state [B, D, K-1]          ssm_state [B, D, N] (fp32 by default)
    Mamba-2: conv_state [B, D+2GN, K-1]      ssm_state [B, H, P, N] (fp32 by default)

A cache made without a ``state_dtype`` keeps fp32 SSM states; ``generate`` and the serving engine make theirs in
``decode_state_dtype(model, state_dtype)``: by default the model's dtype where it is 16-bit (a bf16 model decodes with
bf16 states, as mamba_ssm, transformers and vLLM do: half the state's memory traffic per decode step), fp32 otherwise;
``state_dtype=torch.float32`` continues the training scan's fp32 states exactly. The decode kernels load it, compute
in fp32 and store it back in its dtype; a prefill's fp32 final states are rounded into it when stored.

The cache always holds the un-offset state: state offsets (h', y') act on the read-out only (docs/methods.md §4.1).
A layer cache with ``seqlen_offset == 0`` is *fresh*: the next forward is a prefill, where initial states from
state hooks apply. Otherwise the mixer continues from the cached states, exactly, for any number of tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..ops import STATE_DTYPES  # what the decode kernels store


def state_dtype_of(value: torch.dtype | None) -> torch.dtype:
    """The SSM state dtype a cache keeps for ``value``: None is the default, fp32; else fp32, bf16 or fp16."""
    if value is None:
        return torch.float32
    if value not in STATE_DTYPES:
        raise ValueError(f"state_dtype must be None, torch.float32, torch.bfloat16 or torch.float16, got {value!r}")
    return value


def decode_state_dtype(model, value: torch.dtype | None) -> torch.dtype:
    """The SSM state dtype ``generate`` and the serving engine decode ``model`` with: ``value`` when given, else the
    dtype of the model's embedding weights where it is bf16 / fp16 (the base's dtype: adapters may be fp32), else
    fp32. Measured on an H100 (docs/serving.md): bf16 states decode Mamba-2 at 64 rows about 1.2x faster than fp32
    ones, and no batch size slower."""
    if value is not None:
        return state_dtype_of(value)
    weight = model.backbone.embeddings.weight
    return weight.dtype if weight.dtype in (torch.bfloat16, torch.float16) else torch.float32


@dataclass
class LayerCache:
    """Cache of one mixer. Tensors are None until the first prefill (lazy allocation) or ``allocate``."""

    conv_state: torch.Tensor | None = None
    """[B, conv_dim, K-1], in the activations' dtype."""
    ssm_state: torch.Tensor | None = None
    """[B, D, N] or [B, H, P, N], in ``state_dtype``."""
    seqlen_offset: int = 0
    """Tokens already consumed by this layer."""
    state_dtype: torch.dtype = torch.float32
    """The dtype ``store`` keeps the SSM state in (``state_dtype_of``)."""

    @property
    def fresh(self) -> bool:
        return self.seqlen_offset == 0

    def store(self, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> None:
        """Write prefill results, in place when a buffer of the same shape exists (pre-allocated caches). Stored
        states are contiguous: the decode kernels update them in place (a scan's final state can be a strided view).
        The scans' fp32 final state is rounded into ``state_dtype`` (into the buffer's dtype when written in place)."""
        if self.conv_state is not None and self.conv_state.shape == conv_state.shape:
            self.conv_state.copy_(conv_state)
        else:
            self.conv_state = conv_state.contiguous()
        if self.ssm_state is not None and self.ssm_state.shape == ssm_state.shape:
            self.ssm_state.copy_(ssm_state)
        else:
            self.ssm_state = ssm_state.to(self.state_dtype).contiguous()


class InferenceCache:
    """Caches of all layers, indexed by layer. ``InferenceCache(n_layer)`` is empty; mixers fill it on prefill.
    ``state_dtype``: the SSM states' dtype (None: fp32; ``state_dtype_of``)."""

    def __init__(self, num_layers: int, state_dtype: torch.dtype | None = None) -> None:
        dtype = state_dtype_of(state_dtype)
        self.layers = [LayerCache(state_dtype=dtype) for _ in range(num_layers)]

    @property
    def state_dtype(self) -> torch.dtype:
        return self.layers[0].state_dtype if self.layers else torch.float32

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
        state_dtype: torch.dtype | None = None,
    ) -> InferenceCache:
        """Zero states for each mixer, with shapes from its current ``conv_state_shape`` / ``state_shape``; SSM states
        in ``state_dtype`` (None: fp32)."""
        mixers = list(mixers)
        cache = cls(len(mixers), state_dtype)
        for layer, mixer in zip(cache.layers, mixers):
            # the conv window holds activations: default to the conv weight's dtype (A_log stays fp32)
            ref = mixer.conv1d.weight
            dev = ref.device if device is None else torch.device(device)
            layer.conv_state = torch.zeros(batch_size, *mixer.conv_state_shape, dtype=dtype or ref.dtype, device=dev)
            layer.ssm_state = torch.zeros(batch_size, *mixer.state_shape, dtype=layer.state_dtype, device=dev)
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
        dtypes = {c.state_dtype for c in caches}
        if len(dtypes) > 1:
            raise ValueError(
                f"InferenceCache.cat: the caches keep states in different dtypes {sorted(map(str, dtypes))}"
            )
        out = cls(len(caches[0]), caches[0].state_dtype)
        for i, layer in enumerate(out.layers):
            parts = [c[i] for c in caches]
            if any(p.conv_state is None or p.ssm_state is None for p in parts):
                raise ValueError(f"InferenceCache.cat: layer {i} is not filled in every cache")
            layer.conv_state = torch.cat([p.conv_state for p in parts], dim=0)
            layer.ssm_state = torch.cat([p.ssm_state for p in parts], dim=0)
            layer.seqlen_offset = max(p.seqlen_offset for p in parts)
        return out
