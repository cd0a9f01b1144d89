"""Mamba-1 (S6) selective scan: a sequential pure-PyTorch backend for CPU training.

On CPU the Blelloch scan of ``parallel.py`` is memory-bound: it materialises several [B, D, L, N] tensors per pass. Here
the recurrence h_t = Ā_t ⊙ h_{t-1} + B̄_t u_t runs as a Python loop over t with one in-place ``addcmul_`` per step on a
[B, D, N] slice, and everything that is not recurrent (Ā, B̄u, the C read-out, local gradients) is computed per block of
K steps, so the working set is a few [K, B, D, N] tensors (a few MB) that stay in cache.

One autograd Function owns the whole op (same arguments and maths as ``selective_scan_ref``). The forward keeps only the
state at each block start (plus the pre-gate output for dz); the backward walks the blocks in reverse, recomputes the
block's states from its checkpoint, runs the adjoint λ_t = Ā_{t+1} ⊙ λ_{t+1} + ĝ_t C_t backwards through the block and
reduces the local gradients (docs/kernels.md, docs/methods.md §8.1) with one batched op each per
block.

Computes in fp32 (fp64 when the inputs are fp64, for gradcheck); y is returned in u's dtype, h_L in the compute dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..varlen import reset_positions
from .naive import _batched

# Steps per block (= checkpoint interval). None picks the power of two in [4, 64] whose [K, B, D, N] block is about
# BLOCK_BYTES: block tensors stay in L2/L3 while the per-block batched ops still amortise their launch cost (measured
# at B 16 / 4 / 1, D 512, N 16: 8, 16-32 and 32-64 steps were best). Tests set BLOCK to pin the block boundaries.
BLOCK: int | None = None
BLOCK_BYTES = 4 << 20


def _block_size(step_bytes: int) -> int:
    if BLOCK is not None:
        return BLOCK
    k = 4
    while k < 64 and 2 * k * step_bytes <= BLOCK_BYTES:
        k *= 2
    return k


def _reduce(grad: torch.Tensor, like: torch.Tensor | None) -> torch.Tensor | None:
    """Sum a per-row gradient back to a shared input's shape and cast to its dtype."""
    if like is None:
        return None
    if grad.dim() > like.dim():
        grad = grad.sum(0)
    return grad.to(like.dtype)


def _delta(delta: torch.Tensor, bias: torch.Tensor | None, softplus: bool, cdt: torch.dtype):
    """Δ_raw (before softplus) and Δ, both [B, D, L] in the compute dtype."""
    raw = delta.to(cdt)
    if bias is not None:
        raw = raw + bias.to(cdt)[None, :, None]
    return raw, (F.softplus(raw) if softplus else raw)


def _block_terms(dt: torch.Tensor, du: torch.Tensor, Bt: torch.Tensor, A: torch.Tensor, t0: int, t1: int):
    """Ā and B̄u for steps [t0, t1): [K, B, D, N] each (dt, du are [L, B, D], Bt is [L, B, N])."""
    dA = torch.exp(dt[t0:t1, :, :, None] * A)
    X = du[t0:t1, :, :, None] * Bt[t0:t1, :, None, :]
    return dA, X


def _restarts(resets: torch.Tensor | None, seqlen: int) -> torch.Tensor | None:
    """Packed rows: [L, B] True at the steps that read the initial state; a flag at position 0 is left out (the row
    start reads it anyway, through the first block's checkpoint). Shared by the torch backends."""
    if resets is None:
        return None
    pos = reset_positions(resets, seqlen)
    pos[:, 0] = False
    return pos.t()


def _restart_block_(dA: torch.Tensor, X: torch.Tensor, r: torch.Tensor, h0: torch.Tensor | None) -> None:
    """In place on a block's Ā, B̄u [K, B, D, N]: a restart step (r [K, B]) h_t = Ā_t h_0 + B̄_t u_t forgets h_{t-1}."""
    m = r[:, :, None, None]
    if h0 is not None:
        X.add_(torch.where(m, dA * h0, 0.0))
    dA.masked_fill_(m, 0.0)


def _run_block(dA: torch.Tensor, X: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """In place: X[k] becomes h_k = Ā_k ⊙ h_{k-1} + X_k, starting from ``h``. One kernel per step on cached slices."""
    X[0].addcmul_(dA[0], h)
    for k in range(1, X.shape[0]):
        X[k].addcmul_(dA[k], X[k - 1])
    return X


class _SequentialScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, h0, h_off, y_off, softplus, grad_mode=True, resets=None):
        ctx.set_materialize_grads(False)
        batch, dim, seqlen = u.shape
        cdt = torch.promote_types(u.dtype, torch.float32)
        _, dt = _delta(delta, delta_bias, softplus, cdt)
        uf = u.to(cdt)
        Af = A.to(cdt)
        # time-major copies so that every per-step slice is contiguous
        dt_t = dt.permute(2, 0, 1).contiguous()  # [L, B, D]
        du_t = (dt * uf).permute(2, 0, 1).contiguous()  # [L, B, D]
        Bt = B.to(cdt).permute(2, 0, 1).contiguous()  # [L, B, N]
        Ct = C.to(cdt).permute(2, 0, 1).contiguous()  # [L, B, N]
        h = torch.zeros(batch, dim, A.shape[1], dtype=cdt, device=u.device)
        if h0 is not None:
            h.copy_(_batched(h0, batch, 3, dtype=None))
        h_init = h if h0 is not None else None  # never written in place (h is rebound per block)
        ctx.restarts = rst = _restarts(resets, seqlen)
        ctx.block = K = _block_size(h.numel() * h.element_size())
        nblocks = -(-seqlen // K)
        # the state before each block, for the backward; none when there will be no backward (inference: grad mode,
        # which forward() itself always runs without, is passed in by the caller)
        need_grad = grad_mode and any(ctx.needs_input_grad)
        ckpts = h.new_empty(nblocks, *h.shape) if need_grad else None
        y_t = uf.new_empty(seqlen, batch, dim)  # C_tᵀ h_t, time-major
        for j in range(nblocks):
            t0, t1 = j * K, min((j + 1) * K, seqlen)
            if ckpts is not None:
                ckpts[j] = h
            dA, X = _block_terms(dt_t, du_t, Bt, Af, t0, t1)
            if rst is not None and rst[t0:t1].any():
                _restart_block_(dA, X, rst[t0:t1], h_init)
            H = _run_block(dA, X, h)
            torch.matmul(H, Ct[t0:t1, :, :, None], out=y_t[t0:t1, :, :, None])
            h = H[-1]
        h = h.clone() if nblocks else h  # not a view of the last block
        y = y_t.permute(1, 2, 0)  # [B, D, L]
        if h_off is not None:
            eq = "dn,bnl->bdl" if h_off.dim() == 2 else "bdn,bnl->bdl"
            y = y + torch.einsum(eq, h_off.to(cdt), C.to(cdt))
        if D is not None:
            y = y + D.to(cdt)[None, :, None] * uf
        if y_off is not None:
            y = y + y_off.to(cdt).unsqueeze(-1)
        y_pre = y
        if z is not None:
            y = y * F.silu(z.to(cdt))
        ctx.softplus = softplus
        if need_grad:
            ctx.save_for_backward(
                u, delta, A, B, C, D, z, delta_bias, h0, h_off, y_off, ckpts, y_pre if z is not None else None
            )
        return y.to(u.dtype).contiguous(), h

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, gh):
        u, delta, A, B, C, D, z, delta_bias, h0, h_off, y_off, ckpts, y_pre = ctx.saved_tensors
        need = ctx.needs_input_grad
        batch, dim, seqlen = u.shape
        cdt = torch.promote_types(u.dtype, torch.float32)
        uf = u.to(cdt)
        # gate: ĝ = g·silu(z) is the gradient at the pre-gate output ŷ; dz = g·ŷ·silu'(z)
        gz = None
        if gy is None:
            g = uf.new_zeros(batch, dim, seqlen)
        else:
            g = gy.to(cdt)
            if z is not None:
                zf = z.to(cdt)
                sig = torch.sigmoid(zf)
                if need[6]:
                    gz = g * y_pre * (sig * (1 + zf * (1 - sig)))
                g = g * zf * sig
        grads: list[torch.Tensor | None] = [None] * 14  # (softplus, grad_mode and resets get none)
        # the reverse scan serves u, Δ, A, B, C, the Δ bias and h0 only: h', y', D and z need just ĝ (State-offset
        # tuning of a frozen base: the first layer's scan needs no adjoint at all)
        if any(need[i] for i in (0, 1, 2, 3, 4, 7, 8)):
            scan = _scan_backward(ctx, u, delta, A, B, C, D, delta_bias, h0, h_off, ckpts, g, gh)
            grads[0:5], grads[7], grads[8] = scan
        if h_off is not None and need[9]:
            grads[9] = _reduce(torch.einsum("bdl,bnl->bdn", g, C.to(cdt)), h_off)
        if D is not None and need[5]:
            grads[5] = (g * uf).sum((0, 2)).to(D.dtype)
        if gz is not None:
            grads[6] = gz.to(z.dtype)
        if y_off is not None and need[10]:
            grads[10] = _reduce(g.sum(-1), y_off)
        return tuple(gr if n else None for gr, n in zip(grads, need))


def _scan_backward(ctx, u, delta, A, B, C, D, delta_bias, h0, h_off, ckpts, g, gh):
    """Gradients of u, Δ, A, B, C, the Δ bias and h0 from ĝ (the pre-gate output's gradient) and ∂L/∂h_L."""
    batch, dim, seqlen = u.shape
    cdt = g.dtype
    raw, dt = _delta(delta, delta_bias, ctx.softplus, cdt)
    uf, Af, Bf, Cf = u.to(cdt), A.to(cdt), B.to(cdt), C.to(cdt)
    dt_t = dt.permute(2, 0, 1).contiguous()  # [L, B, D]
    du_t = (dt * uf).permute(2, 0, 1).contiguous()
    g_t = g.permute(2, 0, 1).contiguous()
    Bt = Bf.permute(2, 0, 1).contiguous()  # [L, B, N]
    Ct = Cf.permute(2, 0, 1).contiguous()
    sLB = uf.new_empty(seqlen, batch, dim)  # Σ_n λ B
    sAw = uf.new_empty(seqlen, batch, dim)  # Σ_n A λ ⊙ Ā h_{t-1}
    dB_t = uf.new_empty(seqlen, batch, A.shape[1])
    dC_t = uf.new_empty(seqlen, batch, A.shape[1])
    dA_acc = Af.new_zeros(Af.shape)
    # carry = Ā_{t+1} ⊙ λ_{t+1} entering step t; at t = L it is ∂L/∂h_L
    carry = gh.to(cdt) if gh is not None else ckpts.new_zeros(batch, dim, A.shape[1])
    rst = ctx.restarts
    h_init = _batched(h0, batch, 3, cdt) if h0 is not None else None
    dh0_rst = torch.zeros_like(carry)  # the restarts' terms of ∂L/∂h_0: Ā_t λ_t where step t read h_0
    for j in reversed(range(ckpts.shape[0])):
        t0, t1 = j * ctx.block, min((j + 1) * ctx.block, seqlen)
        dA, H = _block_terms(dt_t, du_t, Bt, Af, t0, t1)
        r = rst[t0:t1] if rst is not None and rst[t0:t1].any() else None
        full = None
        if r is not None:
            full = dA.clone()  # Ā unmasked, for the local gradients
            _restart_block_(dA, H, r, h_init)
        _run_block(dA, H, ckpts[j])
        lam = g_t[t0:t1, :, :, None] * Ct[t0:t1, :, None, :]  # ĝ_t C_t, becomes λ in place
        lam[-1].add_(carry)
        for k in range(t1 - t0 - 2, -1, -1):
            lam[k].addcmul_(dA[k + 1], lam[k + 1])
        carry = dA[0] * lam[0]
        torch.matmul(lam, Bt[t0:t1, :, :, None], out=sLB[t0:t1, :, :, None])
        torch.matmul(du_t[t0:t1, :, None, :], lam, out=dB_t[t0:t1, :, None, :])
        torch.matmul(g_t[t0:t1, :, None, :], H, out=dC_t[t0:t1, :, None, :])
        # w_t = λ_t ⊙ Ā_t ⊙ h_{t-1}, the gradient through Ā_t (h_0 is the checkpoint)
        if r is None:
            w = dA.mul_(lam)
            w[1:].mul_(H[:-1])
            w[0].mul_(ckpts[j])
        else:
            # a restart read h_0 (zeros without one) in place of h_{t-1}
            w = full.mul_(lam)
            m = r[:, :, None, None]
            dh0_rst += torch.where(m, w, 0.0).sum(0)
            prev = torch.cat([ckpts[j][None], H[:-1]])
            w.mul_(torch.where(m, 0.0, prev) if h_init is None else torch.where(m, h_init, prev))
        torch.sum(w * Af, -1, out=sAw[t0:t1])
        dA_acc += w.mul_(dt_t[t0:t1, :, :, None]).sum((0, 1))  # a leading-dim reduction, no permuted copy
    sLB, sAw = sLB.permute(1, 2, 0), sAw.permute(1, 2, 0)  # [B, D, L]
    grad_u = dt * sLB
    if D is not None:
        grad_u = grad_u + g * D.to(cdt)[None, :, None]
    grad_dt = uf * sLB + sAw
    if ctx.softplus:
        grad_dt = grad_dt * torch.sigmoid(raw)
    grad_C = dC_t.permute(1, 2, 0)
    if h_off is not None:
        eq = "dn,bdl->bnl" if h_off.dim() == 2 else "bdn,bdl->bnl"
        grad_C = grad_C + torch.einsum(eq, h_off.to(cdt), g)
    grad_bias = grad_dt.sum((0, 2)).to(delta_bias.dtype) if delta_bias is not None else None
    return (
        (grad_u.to(u.dtype), grad_dt.to(delta.dtype), dA_acc.to(A.dtype), dB_t.permute(1, 2, 0).to(B.dtype),
         grad_C.to(C.dtype)),
        grad_bias,
        _reduce(carry + dh0_rst, h0),
    )  # fmt: skip


def selective_scan_sequential(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    *,
    initial_state: torch.Tensor | None = None,
    state_offset: torch.Tensor | None = None,
    y_offset: torch.Tensor | None = None,
    return_final_state: bool = False,
    resets: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sequential twin of ``selective_scan_ref`` with a block-checkpointed backward: the same arguments and shapes
    (``resets``: packed rows, as there).

    Returns:
        y [B, D, L] in u's dtype, and h_L [B, D, N] in fp32 (fp64 for fp64 inputs) when ``return_final_state``.
    """
    y, h_last = _SequentialScanFn.apply(
        u,
        delta,
        A,
        B,
        C,
        D,
        z,
        delta_bias,
        initial_state,
        state_offset,
        y_offset,
        delta_softplus,
        torch.is_grad_enabled(),
        resets,
    )
    return (y, h_last) if return_final_state else y
