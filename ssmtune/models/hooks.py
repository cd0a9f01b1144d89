"""Hook points that the mixers expose to the PEFT methods.

A mixer owns ``state_hooks`` (an ``nn.ModuleDict``); it is the only reader of them. Before each scan it calls
``collect_state(mixer.state_hooks.values(), batch_size)`` and passes the merged tensors to the op by keyword, in the
parallel path and in ``step()`` alike. Contributions of several hooks add up; a field nobody contributes stays None.

Per-row adapters: a hook may carry an object under ``COLLECTOR_ATTR`` with a method
``collect_state(hooks, batch_size, *, initial)``; ``collect_state`` then hands the whole merge to it.
``core/routing.py``'s ``Routing`` installs itself there inside ``PeftModel.route``, so this layer needs no routing.

The graphed decoder (``models/decode.py``) may hand a mixer whose class sets ``reads_offset_index`` per-row h' / y'
as tables of the distinct adapters' offsets plus ``MergedState.offset_index`` (int32 [B], row b reads entry
``offset_index[b]``); such a mixer passes the index to its decode step's op.

Shapes (a leading batch axis is always allowed, so per-row adapters can be served side by side):
    Mamba-1: initial_state [D, N]       state_offset [D, N]       output_offset [D]      initial_conv_state [D, K-1]
    Mamba-2: initial_state [H, P, N]    state_offset [H, P, N]    output_offset [H, P]   initial_conv_state [D+2GN, K-1]
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn


class StateHook(nn.Module):
    """Base class of the state-based methods. Override any of the four; each returns a tensor or None."""

    def initial_state(self, batch_size: int) -> torch.Tensor | None:
        return None

    def initial_conv_state(self, batch_size: int) -> torch.Tensor | None:
        return None

    def state_offset(self) -> torch.Tensor | None:
        return None

    def output_offset(self) -> torch.Tensor | None:
        return None


@dataclass
class MergedState:
    h0: torch.Tensor | None = None
    conv0: torch.Tensor | None = None
    h_off: torch.Tensor | None = None
    y_off: torch.Tensor | None = None
    # int32 [B]: per-row h_off / y_off are tables and row b reads entry offset_index[b] (set by the graphed decoder
    # only, read by the decode step only)
    offset_index: torch.Tensor | None = None

    @property
    def empty(self) -> bool:
        return self.h0 is None and self.conv0 is None and self.h_off is None and self.y_off is None


# Attribute (a plain attribute, never a submodule) under which a hook carries its state collector.
COLLECTOR_ATTR = "_ssmtune_routing"
ADAPTER_ATTR = "_ssmtune_adapter"  # the adapter a hook or LoRA module belongs to (set by the PeftModel)


def add_optional(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """``a + b`` where ``None`` means "no contribution"."""
    if b is None:
        return a
    return b if a is None else a + b


def collect_state(hooks: Iterable[StateHook], batch_size: int, *, initial: bool = True) -> MergedState:
    """Merge the contributions of all active hooks (hooks with ``active == False`` are skipped).

    ``initial=False`` skips ``initial_state`` / ``initial_conv_state``: a mixer continuing from a cache does not use
    them, and computing them can cost a forward pass (Prefix-Tuning runs its virtual tokens through the layer).

    A collector attached to a hook (``COLLECTOR_ATTR``, see the module docstring) does the merge instead.
    """
    hooks = list(hooks)
    for hook in hooks:
        collector = getattr(hook, COLLECTOR_ATTR, None)
        if collector is not None:
            return collector.collect_state(hooks, batch_size, initial=initial)
    merged = MergedState()
    for hook in hooks:
        if not getattr(hook, "active", True):
            continue
        if initial:
            merged.h0 = add_optional(merged.h0, hook.initial_state(batch_size))
            merged.conv0 = add_optional(merged.conv0, hook.initial_conv_state(batch_size))
        merged.h_off = add_optional(merged.h_off, hook.state_offset())
        merged.y_off = add_optional(merged.y_off, hook.output_offset())
    return merged


def check_packed(cu_seqlens: torch.Tensor, cache: object, attention_mask: torch.Tensor | None) -> None:
    """A mixer's packed forward (``cu_seqlens``) takes no attention mask (no padding) and, with a cache, only a fresh
    one: a packed prefill, which leaves one cache row per sequence."""
    if cache is not None and not cache.fresh:
        raise ValueError("cu_seqlens: a packed forward can only prefill a fresh cache, not continue one")
    if attention_mask is not None:
        raise ValueError("cu_seqlens: a packed batch has no padding; pass attention_mask=None")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        what = list(cu_seqlens.shape) if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
        raise ValueError(f"cu_seqlens must be a 1-D tensor [n_seq + 1], got {what}")


def check_rows(resets: torch.Tensor, cache: object, cu_seqlens: object, attention_mask: torch.Tensor | None) -> None:
    """A mixer's packed-rows forward (``resets``) is a training forward over padded slots: no cache (its final state
    would be the last slot's), not with ``cu_seqlens`` (the other packed layout), and with the attention mask that
    marks the pads (they must be identity steps of the scan)."""
    if cache is not None:
        raise ValueError("resets: packed rows are a training layout; a forward with a cache (generation) takes none")
    if cu_seqlens is not None:
        raise ValueError("resets (packed rows) and cu_seqlens (one packed sequence row) are two layouts; pass one")
    if attention_mask is None:
        raise ValueError("resets: packed rows need the attention_mask that marks their pad positions, got None")


def conv0_at_slots(x: torch.Tensor, conv0: torch.Tensor | None, attention_mask: torch.Tensor) -> torch.Tensor:
    """The conv input of packed rows with every sequence's start made as if it ran alone: pads zeroed, and an
    initial conv window ``conv0`` written into the K-1 positions right before each sequence's first token (a real
    position after a pad). x [B, C, L]; conv0 [C, K-1] or [B, C, K-1] or None; attention_mask [B, >=L]. Each sequence
    needs K-1 pads before it (``PackedRowsCollator``'s ``lead``); one at a row's first position reads the conv's own
    initial state instead. Shapes stay static (no host synchronisation): usable under CUDA-graph capture."""
    batch, channels, seqlen = x.shape
    mask = attention_mask[:, -seqlen:].to(x.device).bool()  # [B, L]
    out = x * mask[:, None, :].to(x.dtype)
    if conv0 is None:
        return out
    k1 = conv0.shape[-1]
    c0 = conv0.to(x.dtype).expand(batch, channels, k1)
    first = mask.clone()
    first[:, 1:] &= ~mask[:, :-1]  # [B, L] a sequence's first token
    for j in range(1, min(k1, seqlen - 1) + 1):  # position t = first - j holds conv0[..., K-1-j]
        at = torch.zeros_like(first)
        at[:, :-j] = first[:, j:] & ~mask[:, :-j]
        out = out + at[:, None, :].to(x.dtype) * c0[:, :, k1 - j, None]
    return out


class InputHook(nn.Module):
    """Edits the input embeddings (and the attention mask and labels) before the first block: Prompt Tuning.

    ``forward(embeds [B, L, d_model], attention_mask [B, L] | None, labels [B, L] | None)`` returns the three, edited.
    The LM drops the positions an input hook added (``num_added``) from its logits, so callers see [B, L, vocab].
    """

    num_added: int = 0

    def forward(
        self, embeds: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        return embeds, attention_mask, labels
