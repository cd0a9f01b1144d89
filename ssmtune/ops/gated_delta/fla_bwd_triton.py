"""fla's gated ``chunk_bwd_dqkwg`` as a Triton kernel of ours (the maths and layouts: ``fla_bwd.py``).

One program per (block of BK key channels, chunk, batch · value head). A loop over blocks of BV value channels gathers
do vᵀ, h do, dh v and h dv; the gates and the intra-chunk terms follow. Where fla's kernel transposes the [BT, BT] result
of a ``tl.dot`` to form Aᵀ q (the pattern Triton >= 3.4 and < 3.7.1 miscompiles on Hopper), this one accumulates
v doᵀ as a second product instead, so every ``tl.dot`` operand is a loaded block or the untransposed result of another.
dg is written per key block and summed by the launcher.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.heuristics(
    {"HAS_DW": lambda args: args["dw"] is not None, "IS_VARLEN": lambda args: args["cu_seqlens"] is not None}
)
@triton.jit(do_not_specialize=["T"])
def chunk_bwd_dqkwg_kernel(
    q, k, v, do, h, dh, dv, g, dq, dk, dw, dg, cu_seqlens, chunk_indices, scale, T, N_ROWS,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, V_FIRST: tl.constexpr, HAS_DW: tl.constexpr, IS_VARLEN: tl.constexpr,
):  # fmt: skip
    i_k, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // HV, i_bh % HV
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_t * 2).to(tl.int64)
        i_c = tl.load(chunk_indices + i_t * 2 + 1).to(tl.int64)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        i_s = i_t.to(tl.int64)  # chunks of all sequences in one list
    else:
        i_c = i_t.to(tl.int64)
        bos = i_b.to(tl.int64) * T
        eos = bos + T
        i_s = i_b.to(tl.int64) * tl.cdiv(T, BT) + i_c
    o_t = bos + i_c * BT + tl.arange(0, BT)  # token rows of the flattened [B * T] axis
    m_t = o_t < eos
    i_last = tl.minimum(bos + i_c * BT + BT, eos) - 1
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    i_hk = i_h // (HV // H)
    p_state = (i_s * HV + i_h) * K * V

    b_ds = tl.zeros([BT, BT], dtype=tl.float32)  # do vᵀ
    b_dst = tl.zeros([BT, BT], dtype=tl.float32)  # v doᵀ, its transpose
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_dw = tl.zeros([BT, BK], dtype=tl.float32)
    b_hdh = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_tv = m_t[:, None] & m_v[None, :]
        m_vk = m_v[:, None] & m_k[None, :]
        p_tv = (o_t[:, None] * HV + i_h) * V + o_v[None, :]
        b_v = tl.load(v + p_tv, mask=m_tv, other=0.0)
        b_do = tl.load(do + p_tv, mask=m_tv, other=0.0)
        # state blocks read as [BV, BK]
        if V_FIRST:
            p_vk = p_state + o_v[:, None] * K + o_k[None, :]
        else:
            p_vk = p_state + o_k[None, :] * V + o_v[:, None]
        b_h = tl.load(h + p_vk, mask=m_vk, other=0.0)
        b_dh = tl.load(dh + p_vk, mask=m_vk, other=0.0)
        b_hdh += tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), axis=0)
        b_ds = tl.dot(b_do, tl.trans(b_v), b_ds)
        b_dst = tl.dot(b_v, tl.trans(b_do), b_dst)
        b_dq = tl.dot(b_do, b_h.to(b_do.dtype), b_dq)
        b_dk = tl.dot(b_v, b_dh.to(b_v.dtype), b_dk)
        if HAS_DW:
            b_dv = tl.load(dv + p_tv, mask=m_tv, other=0.0)
            b_dw = tl.dot(b_dv.to(b_v.dtype), b_h.to(b_v.dtype), b_dw)

    b_g = tl.load(g + o_t * HV + i_h, mask=m_t, other=0.0)
    b_gl = tl.load(g + i_last * HV + i_h)
    p_qk = (o_t[:, None] * H + i_hk) * K + o_k[None, :]
    b_q = tl.load(q + p_qk, mask=m_tk, other=0.0)
    b_k = tl.load(k + p_qk, mask=m_tk, other=0.0)
    b_dq = b_dq * (tl.exp2(b_g) * scale)[:, None]
    b_dk = b_dk * tl.where(m_t, tl.exp2(b_gl - b_g), 0.0)[:, None]
    b_dg_last = tl.sum(b_hdh, axis=0) * tl.exp2(b_gl) + tl.sum(tl.sum(b_dk * b_k.to(tl.float32), axis=1), axis=0)

    o_i = tl.arange(0, BT)
    m_pair = m_t[:, None] & m_t[None, :]
    # A[i, j] = scale (do_i · v_j) 2^(g_i - g_j) for j <= i; its transpose from v doᵀ with the exponent mirrored
    m_a = (o_i[:, None] >= o_i[None, :]) & m_pair
    m_at = (o_i[:, None] <= o_i[None, :]) & m_pair
    b_a = b_ds * tl.exp2(tl.where(m_a, b_g[:, None] - b_g[None, :], float("-inf"))) * scale
    b_at = b_dst * tl.exp2(tl.where(m_at, b_g[None, :] - b_g[:, None], float("-inf"))) * scale
    b_dq = tl.dot(b_a.to(b_k.dtype), b_k, b_dq)
    b_dk = tl.dot(b_at.to(b_q.dtype), b_q, b_dk)
    b_dg = tl.sum(b_dq * b_q.to(tl.float32), axis=1) - tl.sum(b_dk * b_k.to(tl.float32), axis=1)
    b_dg = tl.where(o_t == i_last, b_dg + b_dg_last, b_dg)

    p_out = (o_t[:, None] * HV + i_h) * K + o_k[None, :]
    tl.store(dq + p_out, b_dq.to(dq.dtype.element_ty), mask=m_tk)
    tl.store(dk + p_out, b_dk.to(dk.dtype.element_ty), mask=m_tk)
    if HAS_DW:
        tl.store(dw + p_out, (-b_dw).to(dw.dtype.element_ty), mask=m_tk)
    tl.store(dg + i_k.to(tl.int64) * N_ROWS * HV + o_t * HV + i_h, b_dg, mask=m_t)


def chunk_bwd_dqkwg_triton(
    q, k, v, do, h, dh, w, g, dv, scale: float, state_v_first: bool, cu_seqlens, chunk_size: int, chunk_indices,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:  # fmt: skip
    """``fla_bwd.port`` by this kernel (``chunk_indices`` given with ``cu_seqlens``)."""
    batch, seqlen, nk, kdim = k.shape
    nv, vdim = v.shape[2], v.shape[3]
    # chunks per sequence (the grid's batch axis covers the rest), or of all sequences
    nt = triton.cdiv(seqlen, chunk_size) if cu_seqlens is None else chunk_indices.shape[0]
    bk = min(max(triton.next_power_of_2(kdim), 16), 64)
    bv = min(max(triton.next_power_of_2(vdim), 16), 64)
    nkb = triton.cdiv(kdim, bk)
    q, k, v, do, h, dh, g = (x.contiguous() for x in (q, k, v, do, h, dh, g))
    dv = None if w is None else dv.contiguous()
    dq = torch.empty(batch, seqlen, nv, kdim, dtype=q.dtype, device=q.device)
    dk = torch.empty(batch, seqlen, nv, kdim, dtype=k.dtype, device=k.device)
    dw = None if w is None else torch.empty(batch, seqlen, nv, kdim, dtype=w.dtype, device=w.device)
    dg = torch.empty(nkb, batch, seqlen, nv, dtype=torch.float32, device=g.device)
    chunk_bwd_dqkwg_kernel[(nkb, nt, batch * nv)](
        q, k, v, do, h, dh, dv, g, dq, dk, dw, dg, cu_seqlens, chunk_indices, scale, seqlen, batch * seqlen,
        H=nk, HV=nv, K=kdim, V=vdim, BT=chunk_size, BK=bk, BV=bv, V_FIRST=state_v_first, num_warps=4,
    )  # fmt: skip
    if nv != nk:
        dq = dq.view(batch, seqlen, nk, nv // nk, kdim).sum(3)
        dk = dk.view(batch, seqlen, nk, nv // nk, kdim).sum(3)
    return dq, dk, dw, dg.sum(0)
