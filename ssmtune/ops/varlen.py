"""Packed variable-length sequences (``cu_seqlens``) for the scan and conv ops, on every backend.

A packed batch is one row of ``total`` tokens holding ``n_seq`` sequences back to back; ``cu_seqlens`` (int32 or
int64, ``[n_seq + 1]``, starting at 0 and ending at ``total``, the convention of mamba_ssm and flash-linear-attention)
gives their boundaries. Every sequence starts from its own initial state (row i of an ``[n_seq, ...]`` initial state,
or the shared one), reads its own state offset h' and output offset y' (shared, or ``[n_seq, ...]``) and yields its
own final state (``[n_seq, ...]``). The result equals separate runs of the sequences, gradients included.

The ops run each sequence through the chosen backend on a view of the packed tensors, so every backend and every flag
supports packing with the exact maths of its unpacked path; the packed output is the concatenation of the per-sequence
outputs.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch


def check_cu_seqlens(op: str, cu_seqlens: object, batch: int, total: int) -> list[int]:
    """The boundaries as a list (one host sync), or a ValueError naming the bad value."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        shape = list(cu_seqlens.shape) if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
        raise ValueError(f"{op}: cu_seqlens must be a 1-D tensor [n_seq + 1] with n_seq >= 1, got {shape}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{op}: cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if batch != 1:
        raise ValueError(f"{op}: cu_seqlens needs a packed batch of one row, got batch {batch}")
    bounds = [int(v) for v in cu_seqlens.tolist()]
    if bounds[0] != 0 or bounds[-1] != total:
        raise ValueError(f"{op}: cu_seqlens must start at 0 and end at the packed length {total}, got {bounds}")
    if any(b <= a for a, b in itertools.pairwise(bounds)):
        raise ValueError(f"{op}: cu_seqlens must be strictly increasing (no empty sequence), got {bounds}")
    return bounds


def _row(t: torch.Tensor | None, i: int, shared_ndim: int) -> torch.Tensor | None:
    """Sequence i's row [1, ...] of a per-sequence tensor; a shared tensor is passed as it is."""
    if t is None or t.dim() == shared_ndim:
        return t
    return t[i : i + 1]


def run_packed(
    fn: Callable,
    bounds: list[int],
    time_dim: int,
    timed: dict[str, torch.Tensor | None],
    rows: dict[str, tuple[torch.Tensor | None, int]],
    return_final_state: bool,
    **fixed,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Run ``fn`` once per sequence and concatenate.

    ``timed``: tensors sliced along ``time_dim`` per sequence; ``rows``: name -> (tensor, ndim when shared), per
    sequence or shared; ``fixed``: passed unchanged (``channels_last=True`` keeps the conv's output layout).
    """
    ys, finals = [], []
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        args = {k: None if t is None else t.narrow(time_dim, a, b - a) for k, t in timed.items()}
        args.update({k: _row(t, i, nd) for k, (t, nd) in rows.items()})
        out = fn(**args, **fixed, return_final_state=return_final_state)
        y, final = out if return_final_state else (out, None)
        ys.append(y)
        finals.append(final)
    if fixed.get("channels_last"):  # keep the [B, C, L] view of [B, L, C] memory the conv promised
        y = torch.cat([t.transpose(1, 2) for t in ys], dim=1).transpose(1, 2)
    else:
        y = torch.cat(ys, dim=time_dim)
    return (y, torch.cat(finals, dim=0)) if return_final_state else y
