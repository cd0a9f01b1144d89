"""The gated delta rule's read-out offsets as Triton kernels: out = o + q̂ S' + y' and its backward.

``naive.read_offsets`` is the maths (q̂ = scale · l2norm(q), key heads repeated over their value heads). In torch it
is some ten elementwise kernels over fp32 copies of q and o each way, about 1 ms per Gated DeltaNet layer of a
4 x 1024 training step; here it is one kernel forward and two backward:

- forward, one program per (block of BL tokens, batch · value head, block of BV value channels): q̂ from q, one
  ``tl.dot`` with S', plus y' and o, stored in o's dtype;
- dq, one program per (block of BL tokens, batch · key head): dq̂ = Σ over the head's value heads of do S'ᵀ, then the
  l2norm's backward, r (dq̂ - q̂ₙ (q̂ₙ · dq̂)) with r = 1 / sqrt(Σq² + eps) and q̂ₙ = r q;
- dS', one program per (block of SUB · BL tokens, batch · value head, block of BV): q̂ᵀ do over its tokens, written
  per block and summed by the launcher (no atomics: the same sum every run).

do passes to o unchanged, and dy' is a sum of do over the tokens. fp32 products (``input_precision="ieee"``): the
work is small and the offsets are what is being trained.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

EPS = tl.constexpr(1e-6)  # naive.l2norm's
BL = 64  # tokens per program
SUB = 4  # token blocks per dS' program: the per-block partial sums stay small


@triton.jit
def _q_hat(q, i_b, offs_l, i_hk, offs_k, m_l, m_k, sq_b, sq_l, sq_h, L2NORM: tl.constexpr):
    """q̂ₙ [BL, BK] in fp32 (l2-normalised when L2NORM, not scaled) and r [BL] (1 when not L2NORM)."""
    p = q + i_b * sq_b + offs_l[:, None] * sq_l + i_hk * sq_h + offs_k[None, :]
    x = tl.load(p, mask=m_l[:, None] & m_k[None, :], other=0.0).to(tl.float32)
    if L2NORM:
        r = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) + EPS)
    else:
        r = tl.full([x.shape[0]], 1.0, tl.float32)
    return x * r[:, None], r


@triton.jit
def _readout_fwd_kernel(
    o, q, s, y, out, L, sq_b, sq_l, sq_h, so_b, so_l, so_h, ss_b, sy_b, scale,
    H: tl.constexpr, REP: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BL: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, L2NORM: tl.constexpr, HAS_S: tl.constexpr, HAS_Y: tl.constexpr,
):  # fmt: skip
    i_l, i_bh, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    offs_l = i_l * BL + tl.arange(0, BL)
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    m_l, m_k, m_v = offs_l < L, offs_k < K, offs_v < V
    m_o = m_l[:, None] & m_v[None, :]
    p_o = i_b * so_b + offs_l[:, None] * so_l + i_h * so_h + offs_v[None, :]
    acc = tl.load(o + p_o, mask=m_o, other=0.0).to(tl.float32)
    if HAS_S:
        qn, _ = _q_hat(q, i_b, offs_l, i_h // REP, offs_k, m_l, m_k, sq_b, sq_l, sq_h, L2NORM)
        p_s = s + i_b * ss_b + i_h * K * V + offs_k[:, None] * V + offs_v[None, :]
        sb = tl.load(p_s, mask=m_k[:, None] & m_v[None, :], other=0.0)
        acc += tl.dot(qn * scale, sb, input_precision="ieee")
    if HAS_Y:
        acc += tl.load(y + i_b * sy_b + i_h * V + offs_v, mask=m_v, other=0.0)[None, :]
    tl.store(out + p_o, acc.to(out.dtype.element_ty), mask=m_o)


@triton.jit
def _readout_dq_kernel(
    do, q, s, dq, L, sq_b, sq_l, sq_h, sd_b, sd_l, sd_h, ss_b, scale,
    HK: tl.constexpr, REP: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BL: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, L2NORM: tl.constexpr,
):  # fmt: skip
    i_l, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_hk = i_bh // HK, i_bh % HK
    offs_l = i_l * BL + tl.arange(0, BL)
    offs_k = tl.arange(0, BK)
    m_l, m_k = offs_l < L, offs_k < K
    dqh = tl.zeros([BL, BK], dtype=tl.float32)
    for j in tl.static_range(REP):
        i_h = i_hk * REP + j
        for v0 in tl.static_range(0, V, BV):  # constexpr bounds: the compiler (not the interpreter) requires them
            offs_v = v0 + tl.arange(0, BV)
            m_v = offs_v < V
            p_do = do + i_b * sd_b + offs_l[:, None] * sd_l + i_h * sd_h + offs_v[None, :]
            dob = tl.load(p_do, mask=m_l[:, None] & m_v[None, :], other=0.0).to(tl.float32)
            # S'ᵀ as a [BV, BK] block, read transposed from memory
            p_st = s + i_b * ss_b + i_h * K * V + offs_v[:, None] + offs_k[None, :] * V
            st = tl.load(p_st, mask=m_v[:, None] & m_k[None, :], other=0.0)
            dqh += tl.dot(dob, st, input_precision="ieee")
    dqh = dqh * scale
    if L2NORM:
        qn, r = _q_hat(q, i_b, offs_l, i_hk, offs_k, m_l, m_k, sq_b, sq_l, sq_h, L2NORM)
        dqh = r[:, None] * (dqh - qn * tl.sum(qn * dqh, axis=1)[:, None])
    p_dq = dq + i_b * L * HK * K + offs_l[:, None] * HK * K + i_hk * K + offs_k[None, :]
    tl.store(p_dq, dqh.to(dq.dtype.element_ty), mask=m_l[:, None] & m_k[None, :])


@triton.jit
def _readout_ds_kernel(
    do, q, ws, L, sq_b, sq_l, sq_h, sd_b, sd_l, sd_h, scale,
    H: tl.constexpr, REP: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BL: tl.constexpr, SUB: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, L2NORM: tl.constexpr,
):  # fmt: skip
    i_n, i_bh, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = offs_k < K, offs_v < V
    acc = tl.zeros([BK, BV], dtype=tl.float32)
    for i_s in tl.static_range(SUB):
        offs_l = (i_n * SUB + i_s) * BL + tl.arange(0, BL)
        m_l = offs_l < L
        # q̂ₙᵀ as a [BK, BL] block, read transposed from memory (no tl.trans of a computed block)
        p_qt = q + i_b * sq_b + offs_l[None, :] * sq_l + (i_h // REP) * sq_h + offs_k[:, None]
        qt = tl.load(p_qt, mask=m_k[:, None] & m_l[None, :], other=0.0).to(tl.float32)
        if L2NORM:
            qt = qt / tl.sqrt(tl.sum(qt * qt, axis=0) + EPS)[None, :]
        p_do = do + i_b * sd_b + offs_l[:, None] * sd_l + i_h * sd_h + offs_v[None, :]
        dob = tl.load(p_do, mask=m_l[:, None] & m_v[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(qt * scale, dob, input_precision="ieee")
    n_blocks = tl.num_programs(0)
    p_ws = ws + ((i_b * n_blocks + i_n) * H + i_h) * K * V + offs_k[:, None] * V + offs_v[None, :]
    tl.store(p_ws, acc, mask=m_k[:, None] & m_v[None, :])


def _blocks(k: int, v: int) -> tuple[int, int]:
    # tl.dot takes blocks of at least 16 on every side
    return max(16, triton.next_power_of_2(k)), max(16, min(64, triton.next_power_of_2(v)))


class ReadoutOffsets(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o, q, state_offset, output_offset, scale, use_qk_l2norm):
        batch, seqlen, nheads, dv = o.shape
        hk, dk = q.shape[2], q.shape[3]
        bk, bv = _blocks(dk, dv)
        o = o.contiguous()  # read with out's strides
        q = q if q.stride(-1) == 1 else q.contiguous()
        s = None if state_offset is None else state_offset.float().contiguous()
        y = None if output_offset is None else output_offset.float().contiguous()
        out = torch.empty_like(o, memory_format=torch.contiguous_format)
        grid = (triton.cdiv(seqlen, BL), batch * nheads, triton.cdiv(dv, bv))
        _readout_fwd_kernel[grid](
            o, q, s, y, out, seqlen, *q.stride()[:3], out.stride(0), out.stride(1), out.stride(2),
            0 if s is None or s.dim() == 3 else s.stride(0), 0 if y is None or y.dim() == 2 else y.stride(0), scale,
            H=nheads, REP=nheads // hk, K=dk, V=dv, BL=BL, BK=bk, BV=bv, L2NORM=use_qk_l2norm, HAS_S=s is not None,
            HAS_Y=y is not None,
        )  # fmt: skip
        ctx.save_for_backward(q, s)
        ctx.args = (scale, use_qk_l2norm, None if state_offset is None else state_offset.dtype)
        ctx.y_like = None if output_offset is None else (output_offset.dim(), output_offset.dtype)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, s = ctx.saved_tensors
        scale, use_qk_l2norm, s_dtype = ctx.args
        dout = dout if dout.stride(-1) == 1 else dout.contiguous()
        batch, seqlen, nheads, dv = dout.shape
        hk, dk = q.shape[2], q.shape[3]
        bk, bv = _blocks(dk, dv)
        ds = dq = dy = None
        if s is not None and ctx.needs_input_grad[1]:
            dq = torch.empty(batch, seqlen, hk, dk, device=q.device, dtype=q.dtype)
            _readout_dq_kernel[(triton.cdiv(seqlen, BL), batch * hk)](
                dout, q, s, dq, seqlen, *q.stride()[:3], *dout.stride()[:3], 0 if s.dim() == 3 else s.stride(0),
                scale, HK=hk, REP=nheads // hk, K=dk, V=dv, BL=BL, BK=bk, BV=bv, L2NORM=use_qk_l2norm,
            )  # fmt: skip
        if s is not None and ctx.needs_input_grad[2]:
            n_blocks = triton.cdiv(seqlen, BL * SUB)
            ws = torch.empty(batch, n_blocks, nheads, dk, dv, device=q.device, dtype=torch.float32)
            _readout_ds_kernel[(n_blocks, batch * nheads, triton.cdiv(dv, bv))](
                dout, q, ws, seqlen, *q.stride()[:3], *dout.stride()[:3], scale,
                H=nheads, REP=nheads // hk, K=dk, V=dv, BL=BL, SUB=SUB, BK=bk, BV=bv, L2NORM=use_qk_l2norm,
            )  # fmt: skip
            ds = (ws.sum(1) if s.dim() == 4 else ws.sum((0, 1))).to(s_dtype)
        if ctx.y_like is not None and ctx.needs_input_grad[3]:
            y_dim, y_dtype = ctx.y_like
            dy = dout.float().sum(1)
            dy = (dy if y_dim == 3 else dy.sum(0)).to(y_dtype)
        return dout, dq, ds, dy, None, None


def read_offsets_triton(
    o: torch.Tensor,
    q: torch.Tensor,
    state_offset: torch.Tensor | None,
    output_offset: torch.Tensor | None,
    *,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
) -> torch.Tensor:
    """o [B, L, H, V] + q̂ S' + y' in o's dtype (``naive.read_offsets`` from q [B, L, Hk, K] as the kernels prepare
    it); o itself when there is no offset."""
    if state_offset is None and output_offset is None:
        return o
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return ReadoutOffsets.apply(o, q, state_offset, output_offset, scale, use_qk_l2norm)
