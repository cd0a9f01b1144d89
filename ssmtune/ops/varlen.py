"""Packed variable-length sequences (``cu_seqlens``) for the scan and conv ops, on every backend.

A packed batch is one row of ``total`` tokens holding ``n_seq`` sequences back to back; ``cu_seqlens`` (int32 or
int64, ``[n_seq + 1]``, starting at 0 and ending at ``total``, the convention of mamba_ssm and flash-linear-attention)
gives their boundaries. Every sequence starts from its own initial state (row i of an ``[n_seq, ...]`` initial state,
or the shared one), reads its own state offset h' and output offset y' (shared, or ``[n_seq, ...]``) and yields its
own final state (``[n_seq, ...]``). The result equals separate runs of the sequences, gradients included.

How: the ops sort the sequences by length, longest first, and cut them into contiguous buckets, gather each bucket
into a left-padded batch, one row per sequence ending at the last column, run the chosen backend once per bucket, and
gather the real positions back. A padding step is an exact identity of the recurrence: its step size is 0
(``softplus(-1e4) == 0`` in fp32, so exp(0·A) = 1 and Δ·x·B = 0), so each row's state is its initial state when its
first token arrives and its final state is the state after its last token. The conv places each sequence's initial
conv state in the K-1 columns before its first token. So every backend and every flag supports packing with the maths
of its unpacked path, in one call per bucket, and any bucketing gives the same results (up to rounding: a chunked
scan's chunk boundaries move with the bucket's width).

The buckets minimise ``BUCKET_OVERHEAD_TOKENS`` × buckets + Σ rows × width (a bucket's width: its longest sequence):
each bucket costs launches and host time worth that many row-tokens of scan work, each padded row-token costs GPU
time. 0 gives buckets of equal lengths (no padding); a huge value one bucket (the padded batch's work). Set the module
attribute to change it (``ssmtune bench packing --bucket-tokens`` does); plans are cached per value.
"""

from __future__ import annotations

import functools
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
    # every op of every layer reads the same tensor: one host copy per tensor version, kept on the tensor itself
    # (an inference tensor has no version counter: it is read every time)
    versioned = not cu_seqlens.is_inference()
    cached = getattr(cu_seqlens, "_ssmtune_bounds", None) if versioned else None
    if cached is not None and cached[0] == cu_seqlens._version:
        bounds = cached[1]
    else:
        bounds = [int(v) for v in cu_seqlens.tolist()]
        if versioned:
            cu_seqlens._ssmtune_bounds = (cu_seqlens._version, bounds)
    if bounds[0] != 0 or bounds[-1] != total:
        raise ValueError(f"{op}: cu_seqlens must start at 0 and end at the packed length {total}, got {bounds}")
    if any(b <= a for a, b in itertools.pairwise(bounds)):
        raise ValueError(f"{op}: cu_seqlens must be strictly increasing (no empty sequence), got {bounds}")
    return bounds


# Packed rows (``resets``): a row holds several sequences, each in a slot that starts at a multiple of RESET_ALIGN
# positions; resets[b, r] True restarts row b's state from its initial state at position r * RESET_ALIGN (the chunked
# kernels then reset between chunks, never inside one). The shapes are static, so such rows can be captured.
RESET_ALIGN = 64


def check_resets(op: str, resets: object, batch: int, seqlen: int) -> None:
    """A ValueError naming the bad value unless ``resets`` is a bool tensor [batch, ceil(seqlen / RESET_ALIGN)]."""
    want = [batch, -(-seqlen // RESET_ALIGN)]
    if not isinstance(resets, torch.Tensor) or resets.dtype != torch.bool or list(resets.shape) != want:
        got = (list(resets.shape), resets.dtype) if isinstance(resets, torch.Tensor) else type(resets).__name__
        raise ValueError(f"{op}: resets must be a bool tensor of shape {want} (one flag per {RESET_ALIGN} positions), "
                         f"got {got}")  # fmt: skip


def reset_chunk_size(op: str, chunk_size: int | None) -> int:
    """A chunked scan's chunk size with resets: RESET_ALIGN by default, else a divisor of it (a ValueError naming the
    value otherwise), so that every reset falls on a chunk start."""
    if chunk_size is None:
        return RESET_ALIGN
    if chunk_size < 1 or RESET_ALIGN % chunk_size:
        raise ValueError(f"{op}: with resets, chunk_size must divide RESET_ALIGN ({RESET_ALIGN}), got {chunk_size}")
    return chunk_size


def reset_positions(resets: torch.Tensor, seqlen: int) -> torch.Tensor:
    """[B, ceil(L / RESET_ALIGN)] chunk flags -> [B, L] bool, True at each position whose step reads the initial
    state (the references' form)."""
    pos = torch.zeros(resets.shape[0], seqlen, dtype=torch.bool, device=resets.device)
    pos[:, ::RESET_ALIGN] = resets
    return pos


PAD_LOGIT = -1.0e4  # a padding step's pre-softplus step size: softplus gives exactly 0 in fp32
# The cost of one more bucket, in row-tokens of scan work (see the module docstring). Profiled on an H100 (130m-shaped
# Mamba-2, torch 2.11, Triton 3.6), a packed training step was host-bound: each bucket cost about 1.4 ms of host time
# per layer (SSD forward 0.4, backward 0.7, conv 0.3; ~80 µs per Triton launch) plus its gathers. A row-token of scan
# work costs about 0.09 µs (SSD) to 0.13 µs (Mamba-1 scan) of GPU time per layer, forward + backward (B 8, L 2048 at the
# 130m width; docs/benchmarks.md's scan tables, H200). 1-1.5 ms / 0.09-0.13 µs is about 8k-16k; the low end is kept,
# since wider models pay more GPU time per token for the same host cost. On the benchmark's batches (8 sequences,
# log-uniform 32..2048) it gives 1-2 buckets; a 2,048-token sequence is split from 5 or more 32-token ones.
BUCKET_OVERHEAD_TOKENS = 8192


def _groups(lens: list[int], overhead: float) -> list[list[int]]:
    """Contiguous groups of the sequences sorted longest first that minimise Σ (overhead + rows × longest); on a tie,
    fewer groups. O(k²) over the k distinct lengths: a cut inside a run of equal lengths never pays, since moving it to
    the run's start moves rows to a group as wide as they are, or merges two groups."""
    if not overhead >= 0:  # also refuses NaN
        raise ValueError(f"BUCKET_OVERHEAD_TOKENS must be >= 0, got {overhead}")
    order = sorted(range(len(lens)), key=lambda i: -lens[i])
    srt = [lens[i] for i in order]
    starts = [k for k in range(len(srt)) if k == 0 or srt[k] != srt[k - 1]] + [len(srt)]
    # best[j]: (cost, groups) of the sorted sequences before starts[j]; cut[j]: the run where their last group starts
    best, cut = [(0.0, 0)], [0]
    for j in range(1, len(starts)):
        c, i = min(
            ((best[i][0] + overhead + (starts[j] - starts[i]) * srt[starts[i]], best[i][1] + 1), i) for i in range(j)
        )
        best.append(c)
        cut.append(i)
    groups, j = [], len(starts) - 1
    while j:
        groups.append(order[starts[cut[j]] : starts[j]])
        j = cut[j]
    return groups[::-1]


# the ops of every layer share a forward's plan; 256 holds a benchmark's cycle of batches × stacks × bucket values
@functools.lru_cache(maxsize=256)
def _plan(bounds: tuple[int, ...], lead: int, slots: bool, device: torch.device, overhead: float):
    """``_build_plan``, cached; built outside inference mode, since later forwards that record autograd reuse it."""
    with torch.inference_mode(False):
        return _build_plan(bounds, lead, slots, device, overhead)


def _build_plan(bounds: tuple[int, ...], lead: int, slots: bool, device: torch.device, overhead: float):
    """Buckets of sequences of similar lengths (``_groups``), longest first, each a left-padded batch of rows.

    Per bucket: ``ids`` [m] (its sequences) and ``idx`` [m, width] positions in the packed axis (``total``: the zero
    slot; with ``slots``, ``total + 1 + i * lead + j``: slot j of the ``lead`` columns before sequence i, e.g. its
    initial conv state; else those columns are zero padding). ``gather`` [total]: for each packed position, its
    position in the buckets' rows flattened and concatenated; ``seq_order`` [n_seq] puts the concatenated buckets'
    sequences back in order."""
    total = bounds[-1]
    lens = [b - a for a, b in itertools.pairwise(bounds)]
    groups = _groups(lens, overhead)  # the lead columns add n_seq × lead to every grouping: left out of the cost
    buckets = []
    gather = torch.empty(total, dtype=torch.long)
    offset = 0
    for ids in groups:
        width = lens[ids[0]] + lead
        idx = torch.full((len(ids), width), total, dtype=torch.long)
        for r, i in enumerate(ids):
            a, b = bounds[i], bounds[i + 1]
            start = width - (b - a)
            idx[r, start:] = torch.arange(a, b)
            if slots:
                idx[r, start - lead : start] = total + 1 + i * lead + torch.arange(lead)
            gather[a:b] = offset + r * width + start + torch.arange(b - a)
        offset += len(ids) * width
        buckets.append((torch.tensor(ids, device=device), idx.to(device)))
    seq_order = torch.argsort(torch.tensor([i for ids in groups for i in ids]))
    return buckets, gather.to(device), seq_order.to(device)


def _plan_now(bounds: list[int], lead: int, slots: bool, device: torch.device):
    """The plan under the current ``BUCKET_OVERHEAD_TOKENS`` (read at call time, so that setting it takes effect)."""
    return _plan(tuple(bounds), lead, slots, device, BUCKET_OVERHEAD_TOKENS)


def _to_rows(src: torch.Tensor, time_dim: int, idx: torch.Tensor) -> torch.Tensor:
    """Time-first source [total + slots, ...] -> rows [m, ..., width (at time_dim), ...]. ``index_select``, whose
    backward is one ``index_add_`` (an advanced index's sorts its indices first); every real position and conv-state
    slot is read once (the pad slot, read many times, takes no gradient), so the gradient is the same."""
    rows = src.index_select(0, idx.view(-1)).view(*idx.shape, *src.shape[1:])
    return rows.movedim(1, time_dim).contiguous()


def _time_first(t: torch.Tensor, time_dim: int, fill: float = 0.0, lead: torch.Tensor | None = None) -> torch.Tensor:
    """[1, ..., total (at time_dim), ...] -> [total + 1 (+ lead rows), ...]: the zero slot holds ``fill``."""
    src = t[0].movedim(time_dim - 1, 0)
    parts = [src, src.new_full((1, *src.shape[1:]), fill)]
    if lead is not None:
        parts.append(lead.to(src.dtype))
    return torch.cat(parts)


def _from_buckets(parts: list[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
    """The buckets' parts concatenated along dim 0 (a lone bucket's without a copy), rows ``index`` of them: e.g.
    outputs flattened time-first [m * width, ...] -> the packed [total, ...], final states -> [n_seq, ...]."""
    return (parts[0] if len(parts) == 1 else torch.cat(parts)).index_select(0, index)


def _packed_y(ys: list[torch.Tensor], time_dim: int, gather: torch.Tensor) -> torch.Tensor:
    """Bucket outputs [m, ..., width (at time_dim), ...] -> the packed [1, ..., total, ...]."""
    flat = [y.movedim(time_dim, 1).flatten(0, 1) for y in ys]
    return _from_buckets(flat, gather).movedim(0, time_dim - 1).unsqueeze(0)


def _pick(t: torch.Tensor | None, shared_ndim: int, ids: torch.Tensor) -> torch.Tensor | None:
    """A bucket's rows of a per-sequence tensor; a shared one as it is."""
    return t if t is None or t.dim() == shared_ndim else t.index_select(0, ids)


def scan_packed(
    fn: Callable,
    bounds: list[int],
    time_dim: int,
    timed: dict[str, torch.Tensor | None],
    per_seq: dict[str, tuple[torch.Tensor | None, int]],
    step: tuple[str, str, str],
    return_final_state: bool,
    **fixed,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """A scan (``selective_scan`` / ``ssd_scan``) on the left-padded buckets of a packed batch.

    ``timed``: the packed inputs with a time axis; ``per_seq``: name -> (tensor, dims when shared), per sequence or
    shared; ``step``: the names of the step size, its bias and softplus flag; ``fixed``: every other argument."""
    dt_name, bias_name, softplus_name = step
    buckets, gather, seq_order = _plan_now(bounds, 0, False, timed[dt_name].device)
    if not fixed[softplus_name]:  # fold the bias in, so that a zero pad is a zero step
        bias = fixed.pop(bias_name)
        if bias is not None:
            dt = timed[dt_name]
            shape = [1] * dt.dim()
            shape[1 if time_dim == 2 else 2] = -1
            timed[dt_name] = (dt.float() + bias.float().view(shape)).to(dt.dtype)
        fixed[bias_name] = None
    fill = {k: PAD_LOGIT if k == dt_name and fixed[softplus_name] else 0.0 for k in timed}
    srcs = {k: None if t is None else _time_first(t, time_dim, fill[k]) for k, t in timed.items()}
    ys, finals = [], []
    for ids, idx in buckets:
        rows = {k: None if t is None else _to_rows(t, time_dim, idx) for k, t in srcs.items()}
        rows.update({k: _pick(t, nd, ids) for k, (t, nd) in per_seq.items()})
        out = fn(**rows, **fixed, return_final_state=return_final_state)
        y, final = out if return_final_state else (out, None)
        ys.append(y)
        finals.append(final)
    y = _packed_y(ys, time_dim, gather)
    return (y, _from_buckets(finals, seq_order)) if return_final_state else y


def conv_packed(
    fn: Callable,
    bounds: list[int],
    x: torch.Tensor,
    initial_state: torch.Tensor | None,
    return_final_state: bool,
    channels_last: bool,
    **fixed,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``causal_conv1d`` on left-padded buckets; each row's initial conv state sits in the K-1 columns before its
    first token, so no window reaches into another sequence."""
    n, lead = len(bounds) - 1, fixed["weight"].shape[1] - 1
    buckets, gather, seq_order = _plan_now(bounds, lead, initial_state is not None, x.device)
    slots = None
    if initial_state is not None:
        h0 = initial_state.expand(n, *initial_state.shape[-2:])  # [n, C, K-1]
        slots = h0.permute(0, 2, 1).reshape(n * lead, -1)  # time-first
    src = _time_first(x, 2, 0.0, slots)
    ys, finals = [], []
    for _, idx in buckets:
        out = fn(_to_rows(src, 2, idx), **fixed, initial_state=None, return_final_state=return_final_state,
                 channels_last=channels_last)  # fmt: skip
        y, final = out if return_final_state else (out, None)
        ys.append(y)
        finals.append(final)
    if channels_last:  # keep the [B, C, L] view of [B, L, C] memory the conv promised
        y = _from_buckets([y.transpose(1, 2).reshape(-1, y.shape[1]) for y in ys], gather).t().unsqueeze(0)
    else:
        y = _packed_y(ys, 2, gather)
    return (y, _from_buckets(finals, seq_order)) if return_final_state else y
