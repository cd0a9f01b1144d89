"""Our stand-in for fla's gated ``chunk_bwd_dqkwg`` where fla refuses it (Hopper with Triton >= 3.4 and < 3.7.1, where
Triton miscompiles that kernel), so that fla's Gated DeltaNet backward runs there with every other kernel its own.

What the kernel computes, per (batch, value head) and chunk of n <= BT valid rows i, j (l = n - 1, the last one), with
h, dh read as K×V matrices: the gradients through the chunk's output and the state it passes on,

    o_i    = scale · 2^g_i · hᵀ q_i  +  Σ_{j<=i} scale · 2^(g_i - g_j) (q_i · k_j) v_j
    h_next = 2^g_l · h  +  Σ_j 2^(g_l - g_j) k_j v_jᵀ

    inputs   q, k  [B, T, H, K]        do, dv, v (fla's v_new: the delta rule's corrected values)  [B, T, HV, V]
             w  [B, T, HV, K]           g  [B, T, HV] fp32: the log-decay cumulated within each chunk, in log2 units
             h, dh  [B, NT, HV, K, V]   ([..., V, K] when ``state_v_first``): the state entering each chunk and the
             gradient of the state it passes on (NT = ceil(T / BT); varlen: [1, chunks, HV, K, V] by ``chunk_indices``)
    key head of value head i_h: i_h // (HV // H)

    A_ij = scale · (do_i · v_j) · 2^(g_i - g_j)  for j <= i, else 0   (rounded to k's dtype before its products)
    dq_i = scale · 2^g_i · h do_i  +  Σ_j A_ij k_j
    dk_j = 2^(g_l - g_j) · dh v_j  +  Σ_i A_ij q_i
    dw_i = -h dv_i
    dg_i = q_i · dq_i  -  k_i · dk_i  +  [i = l] · (2^g_l · Σ h ⊙ dh  +  Σ_j 2^(g_l - g_j) k_j · dh v_j)

dq, dk come back [B, T, H, K] (summed over the value heads of each key head) in q's / k's dtype, dw in w's, and dg
[B, T, HV] in fp32: the gradient with respect to the natural-log cumulated gate (g · ln 2), before fla's reverse cumsum
within each chunk. dk and dg are this kernel's parts (fla adds the WY representation's afterwards). Products run in fp32
on the inputs as stored; h and dh are rounded to do's / v's dtype for their products, as fla's kernel does.

Two ports: ``chunk_bwd_dqkwg_torch`` below (batched matmuls over all chunks, in slices; the default) and our Triton
kernel (``fla_bwd_triton.py``), chosen by ``IMPL``.

Mechanism: fla routes ``chunk_bwd_dqkwg`` through its backend registry (``fla.backends``), the extension point its own
TileLang port of this kernel uses. We register one more backend there whose verifier accepts only the calls fla would
refuse (gated, no ``g_gamma``, on a CUDA device where ``fla_backward_ok`` is False), or every gated call inside
``forced()``: no call that fla can serve changes hands, and a working TileLang backend (lower priority number) still
comes first. Re-running fla's backward ourselves in an ``autograd.Function`` would tie us to a dozen of fla's private
signatures.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from .fla import fla_backward_ok

_forced = 0  # module-wide, not thread-local: CUDA autograd runs backward on its own thread
_installed: bool | None = None
SLICE_ELEMENTS = 1 << 25  # chunks go in slices of about this many elements per fp32 temporary (memory on long inputs)
# which port fla's backward calls: "torch" (chunk_bwd_dqkwg_torch) or "triton" (fla_bwd_triton.py, our kernel, which
# avoids the pattern Triton miscompiles but has yet to be checked on Hopper: tests/ops/test_gated_delta_fla_bwd.py -m gpu)
IMPL = "torch"


@contextlib.contextmanager
def forced() -> Iterator[None]:
    """Route every gated ``chunk_bwd_dqkwg`` call to ``port`` (tests, on devices where fla's kernel also runs)."""
    global _forced
    _forced += 1
    try:
        yield
    finally:
        _forced -= 1


def _chunk_rows(
    k: torch.Tensor, chunk: int, cu_seqlens: torch.Tensor | None, chunk_indices: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat token index [N, BT] of each chunk's rows (clamped into the chunk) and their validity mask [N, BT]."""
    batch, seqlen, device = k.shape[0], k.shape[1], k.device
    if cu_seqlens is None:
        nt = -(-seqlen // chunk)
        seq = torch.arange(batch, device=device).repeat_interleave(nt)
        start = seq * seqlen + torch.arange(nt, device=device).repeat(batch) * chunk
        end = seq * seqlen + seqlen
    else:
        seq, part = chunk_indices[:, 0].long(), chunk_indices[:, 1].long()
        start = cu_seqlens.long()[seq] + part * chunk
        end = cu_seqlens.long()[seq + 1]
    rows = start[:, None] + torch.arange(chunk, device=device)
    valid = rows < end[:, None]
    return torch.minimum(rows, end[:, None] - 1), valid


def chunk_bwd_dqkwg_torch(
    q, k, v, do, h, dh, w, g, dv, scale: float, state_v_first: bool, cu_seqlens, chunk_size: int, chunk_indices,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:  # fmt: skip
    """``port`` as batched matmuls over all chunks at once (in slices of ``SLICE_ELEMENTS``)."""
    batch, seqlen, nk, kdim = k.shape
    nv = v.shape[2]
    rows, valid = _chunk_rows(k, chunk_size, cu_seqlens, chunk_indices)
    n = rows.shape[0]
    hs, dhs = h.reshape(n, nv, *h.shape[-2:]), dh.reshape(n, nv, *dh.shape[-2:])
    if state_v_first:
        hs, dhs = hs.transpose(-1, -2), dhs.transpose(-1, -2)  # [N, HV, K, V]
    # rows past a sequence's end write to a spare last row: no boolean indexing, so no host sync
    dest = torch.where(valid, rows, batch * seqlen)
    tokens = batch * seqlen + 1
    dq = torch.empty(tokens, nv, kdim, dtype=q.dtype, device=q.device)
    dk = torch.empty(tokens, nv, kdim, dtype=k.dtype, device=k.device)
    dw = None if w is None else torch.empty(tokens, nv, kdim, dtype=w.dtype, device=w.device)
    dg = torch.empty(tokens, nv, dtype=torch.float32, device=g.device)
    step = max(1, SLICE_ELEMENTS // (nv * chunk_size * max(kdim, v.shape[-1], chunk_size)))
    for s in range(0, n, step):
        part = slice(s, s + step)
        grads = _chunk_grads(
            q, k, v, do, dv if w is not None else None, g, hs[part], dhs[part], rows[part], valid[part], scale
        )
        for out, grad in zip((dq, dk, dw, dg), grads, strict=True):
            if out is not None:
                out[dest[part].flatten()] = grad.transpose(1, 2).flatten(0, 1).to(out.dtype)
    dq, dk = dq[:-1].view(batch, seqlen, nv, kdim), dk[:-1].view(batch, seqlen, nv, kdim)
    if nv != nk:
        dq = dq.view(batch, seqlen, nk, nv // nk, kdim).sum(3)
        dk = dk.view(batch, seqlen, nk, nv // nk, kdim).sum(3)
    dw = None if dw is None else dw[:-1].view(batch, seqlen, nv, kdim)
    return dq, dk, dw, dg[:-1].view(batch, seqlen, nv)


def _chunk_grads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    do: torch.Tensor,
    dv: torch.Tensor | None,
    g: torch.Tensor,
    hs: torch.Tensor,
    dhs: torch.Tensor,
    rows: torch.Tensor,
    valid: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """dq, dk, dw [N, HV, BT, K] and dg [N, HV, BT] in fp32 for the chunks whose rows are ``rows``."""
    nv, chunk = v.shape[2], rows.shape[1]

    def chunks(x: torch.Tensor) -> torch.Tensor:
        # [B, T, heads, D] -> [N, HV, BT, D] fp32, rows past a sequence's end zero (fla's kernel masks them)
        x = x.flatten(0, 1)[rows].float().masked_fill(~valid[..., None, None], 0)
        return (x.repeat_interleave(nv // x.shape[2], dim=2) if x.shape[2] != nv else x).transpose(1, 2)

    qc, kc, vc, doc = chunks(q), chunks(k), chunks(v), chunks(do)  # [N, HV, BT, K or V]
    gc = g.flatten(0, 1)[rows].float().transpose(1, 2)  # [N, HV, BT]
    last = (valid.sum(1) - 1)[:, None, None].expand(-1, nv, 1)
    g_last = gc.gather(2, last)  # [N, HV, 1]
    vmask = valid[:, None, :]
    decay_k = torch.where(vmask, torch.exp2(g_last - gc), 0.0)  # 2^(g_last - g_j), 0 on padded rows
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    amask = causal & vmask[..., :, None] & vmask[..., None, :]
    decay_a = torch.exp2(torch.where(amask, gc[..., :, None] - gc[..., None, :], float("-inf")))

    dq = doc @ hs.to(do.dtype).float().transpose(-1, -2) * (torch.exp2(gc)[..., None] * scale)
    dk_inter = vc @ dhs.to(v.dtype).float().transpose(-1, -2) * decay_k[..., None]
    a = ((doc @ vc.transpose(-1, -2)) * decay_a * scale).to(k.dtype).float()  # [N, HV, BT, BT]
    dq = dq + a @ kc
    dk = dk_inter + a.transpose(-1, -2) @ qc

    dg_last = (hs.float() * dhs.float()).sum((-2, -1)) * torch.exp2(g_last[..., 0]) + (dk_inter * kc).sum((-2, -1))
    dg = (dq * qc).sum(-1) - (dk * kc).sum(-1)  # [N, HV, BT]
    dg.scatter_add_(2, last, dg_last[..., None])
    dw = None if dv is None else -(chunks(dv.to(v.dtype)) @ hs.to(v.dtype).float().transpose(-1, -2))
    return dq, dk, dw, dg


def port(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    do: torch.Tensor,
    h: torch.Tensor,
    dh: torch.Tensor,
    w: torch.Tensor | None = None,
    g: torch.Tensor | None = None,
    g_gamma: torch.Tensor | None = None,
    dv: torch.Tensor | None = None,
    scale: float | None = None,
    state_v_first: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    chunk_size: int = 64,
    chunk_indices: torch.LongTensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """fla's gated ``chunk_bwd_dqkwg`` (same arguments and results; the module docstring has the maths) by ``IMPL``'s
    port: ``(dq, dk, dw, dg)``."""
    if g is None or g_gamma is not None:
        raise ValueError(f"chunk_bwd_dqkwg port: needs a per-token gate g and no g_gamma, got g={g is not None}, "
                         f"g_gamma={g_gamma is not None}")  # fmt: skip
    if cu_seqlens is not None and chunk_indices is None:
        from fla.ops.utils import prepare_chunk_indices

        chunk_indices = prepare_chunk_indices(cu_seqlens, chunk_size)
    if IMPL == "triton":
        from .fla_bwd_triton import chunk_bwd_dqkwg_triton as fn
    else:
        fn = chunk_bwd_dqkwg_torch
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    return fn(q, k, v, do, h, dh, w, g, dv, scale, state_v_first, cu_seqlens, chunk_size, chunk_indices)


def _takes(q, k, v, do, h, dh, w=None, g=None, g_gamma=None, *args, **kwargs) -> tuple[bool, str | None]:
    """fla's verifier protocol: (accepted, reason). Gated calls that fla refuses, or all gated ones when forced."""
    if g is None or g_gamma is not None:
        return False, "only the per-token gate"
    if _forced or (q.is_cuda and not fla_backward_ok(q.device)):
        return True, None
    return False, "fla's own kernel works here"


def install() -> bool:
    """Register ``port`` with fla's backend registry once; False where that cannot take effect (fla
    without a registry, or ``FLA_DISABLE_BACKEND_DISPATCH=1``, which bypasses it)."""
    global _installed
    if _installed is None:
        _installed = False
        try:
            from fla.backends import BaseBackend, register
        except ImportError:
            return False
        if os.environ.get("FLA_DISABLE_BACKEND_DISPATCH") == "1":
            return False

        class SsmtuneDqkwgBackend(BaseBackend):
            backend_type = "ssmtune_dqkwg"
            priority = 9  # after fla's TileLang port (5), which is faster when it is installed and usable

            def chunk_bwd_dqkwg_verifier(self, *args, **kwargs):
                return _takes(*args, **kwargs)

            def chunk_bwd_dqkwg(self, *args, **kwargs):
                return port(*args, **kwargs)

        register("common")(SsmtuneDqkwgBackend)
        _installed = True
    return _installed
