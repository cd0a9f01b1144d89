"""Packed variable-length sequences (``cu_seqlens``) for the scan and conv ops, on every backend.

A packed batch is one row of ``total`` tokens holding ``n_seq`` sequences back to back; ``cu_seqlens`` (int32 or
int64, ``[n_seq + 1]``, starting at 0 and ending at ``total``, the convention of mamba_ssm and flash-linear-attention)
gives their boundaries. Every sequence starts from its own initial state (row i of an ``[n_seq, ...]`` initial state,
or the shared one), reads its own state offset h' and output offset y' (shared, or ``[n_seq, ...]``) and yields its
own final state (``[n_seq, ...]``). The result equals separate runs of the sequences, gradients included.

How: the ops gather the sequences into a left-padded batch of ``n_seq`` rows, one row per sequence ending at the
last column, run the chosen backend once on it, and gather the real positions back. A padding step is an exact
identity of the recurrence: its step size is 0 (``softplus(-1e4) == 0`` in fp32, so exp(0·A) = 1 and Δ·x·B = 0),
so each row's state is its initial state when its first token arrives and its final state is the state after its
last token. The conv places each sequence's initial conv state in the K-1 columns before its first token. So every
backend and every flag supports packing with the maths of its unpacked path, in one call per op; the scans run
``n_seq × longest`` steps (the dense layers around them see only the packed tokens).
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


PAD_LOGIT = -1.0e4  # a padding step's pre-softplus step size: softplus gives exactly 0 in fp32


def _layout(bounds: list[int], width: int, lead: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded rows: ``idx`` [n, width] positions in the packed axis (``total``: the zero slot; ``total + 1 + j``:
    slot j of the ``lead`` columns before each sequence, e.g. its initial conv state), and ``keep`` [total], the
    flat positions of the packed tokens in the [n * width] rows."""
    total, n = bounds[-1], len(bounds) - 1
    idx = torch.full((n, width), total, dtype=torch.long)
    keep = []
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        start = width - (b - a)
        idx[i, start:] = torch.arange(a, b)
        if lead:
            idx[i, start - lead : start] = total + 1 + i * lead + torch.arange(lead)
        keep.append(i * width + start + torch.arange(b - a))
    return idx.to(device), torch.cat(keep).to(device)


def _to_rows(t: torch.Tensor, time_dim: int, idx: torch.Tensor, fill: float = 0.0, lead=None) -> torch.Tensor:
    """[1, ..., total (at time_dim), ...] -> [n, ..., width, ...]; padding holds ``fill``, lead slots ``lead``
    ([n * lead, ...] rows in the time-first order)."""
    src = t[0].movedim(time_dim - 1, 0)  # [total, ...]
    parts = [src, src.new_full((1, *src.shape[1:]), fill)]
    if lead is not None:
        parts.append(lead.to(src.dtype))
    return torch.cat(parts)[idx].movedim(1, time_dim).contiguous()  # [n, ..., width, ...]


def _from_rows(y: torch.Tensor, time_dim: int, keep: torch.Tensor) -> torch.Tensor:
    """[n, ..., width, ...] -> [1, ..., total, ...], the packed positions only."""
    y = y.movedim(time_dim, 1)
    return y.reshape(-1, *y.shape[2:])[keep].movedim(0, time_dim - 1).unsqueeze(0)


def scan_packed(
    fn: Callable,
    bounds: list[int],
    time_dim: int,
    timed: dict[str, torch.Tensor | None],
    step: tuple[str, str, str],
    return_final_state: bool,
    **fixed,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """A scan (``selective_scan`` / ``ssd_scan``) on the left-padded rows of a packed batch.

    ``timed``: the packed inputs with a time axis; ``step``: the names of the step size, its bias and softplus flag;
    ``fixed``: every other argument (per-sequence states and offsets are already [n_seq, ...] rows)."""
    width = max(b - a for a, b in itertools.pairwise(bounds))
    dt_name, bias_name, softplus_name = step
    idx, keep = _layout(bounds, width, 0, timed[dt_name].device)
    if not fixed[softplus_name]:  # fold the bias in, so that a zero pad is a zero step
        bias = fixed.pop(bias_name)
        if bias is not None:
            dt = timed[dt_name]
            shape = [1] * dt.dim()
            shape[1 if time_dim == 2 else 2] = -1
            timed[dt_name] = (dt.float() + bias.float().view(shape)).to(dt.dtype)
        fixed[bias_name] = None
    rows = {}
    for k, t in timed.items():
        fill = PAD_LOGIT if k == dt_name and fixed[softplus_name] else 0.0
        rows[k] = None if t is None else _to_rows(t, time_dim, idx, fill)
    out = fn(**rows, **fixed, return_final_state=return_final_state)
    y, final = out if return_final_state else (out, None)
    y = _from_rows(y, time_dim, keep)
    return (y, final) if return_final_state else y


def conv_packed(
    fn: Callable,
    bounds: list[int],
    x: torch.Tensor,
    initial_state: torch.Tensor | None,
    return_final_state: bool,
    channels_last: bool,
    **fixed,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``causal_conv1d`` on left-padded rows; each row's initial conv state sits in the K-1 columns before its first
    token, so no window reaches into another sequence."""
    n, lead = len(bounds) - 1, fixed["weight"].shape[1] - 1
    width = max(b - a for a, b in itertools.pairwise(bounds)) + lead
    idx, keep = _layout(bounds, width, 0 if initial_state is None else lead, x.device)  # else zero padding
    slots = None
    if initial_state is not None:
        h0 = initial_state.expand(n, *initial_state.shape[-2:])  # [n, C, K-1]
        slots = h0.permute(0, 2, 1).reshape(n * lead, -1)  # time-first
    rows = _to_rows(x, 2, idx, 0.0, slots)
    out = fn(rows, **fixed, initial_state=None, return_final_state=return_final_state, channels_last=channels_last)
    y, final = out if return_final_state else (out, None)
    if channels_last:  # keep the [B, C, L] view of [B, L, C] memory the conv promised
        y = y.transpose(1, 2).reshape(-1, y.shape[1])[keep].t().unsqueeze(0)
    else:
        y = _from_rows(y, 2, keep)
    return (y, final) if return_final_state else y
