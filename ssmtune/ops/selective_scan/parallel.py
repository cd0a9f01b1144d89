"""Mamba-1 (S6) selective scan in pure PyTorch: Blelloch scan, and `selective_scan_torch` (sequential on CPU).

The recurrence h_t = Ā_t ⊙ h_{t-1} + X_t (Ā_t = exp(Δ_t A), X_t = Δ_t B_t u_t) is a composition of affine maps, so it
is evaluated with an in-place Blelloch scan along L on [B, D, L, N] (2·log2 L sweeps, any L, no padding), as in
mamba.py's ``pscan``. A custom autograd function owns the scan: it saves only the states and recomputes Ā in backward,
where the adjoint λ_t = ∂L/∂h_t is the same scan run backwards in time (see README.md). Everything around the scan
(Δ, X, the C read-out, D, offsets, gate) is plain autograd. The initial state is folded into the first step exactly:
X_1 ← X_1 + Ā_1 ⊙ h_0.

Computes in fp32 (fp64 when the inputs are fp64, for gradcheck) and returns y in u's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .naive import _batched
from .sequential import _restarts, selective_scan_sequential


def _level(t: torch.Tensor, stride: int, reverse: bool) -> torch.Tensor:
    """Elements that close a block of ``stride`` steps, in ascending time (scan order reversed when ``reverse``)."""
    seqlen = t.shape[2]
    if not reverse:
        return t[:, :, stride - 1 :: stride]
    count = seqlen // stride
    return t[:, :, seqlen - count * stride :: stride]


def _pscan_(a: torch.Tensor, x: torch.Tensor, reverse: bool = False) -> None:
    """In place along dim 2: x_t ← a_t ⊙ x_{t-1} + x_t with x_{-1} = 0 (or x_t ← a_t ⊙ x_{t+1} + x_t when ``reverse``).

    ``a`` is clobbered (block products). Blelloch: an up-sweep pairs neighbouring blocks, a down-sweep completes the
    prefixes of the blocks left open. Scan index i sits at slice index T-1-i when ``reverse``, which flips the pairing.
    """
    seqlen = x.shape[2]
    strides = []
    stride = 1
    while seqlen // stride >= 2:
        strides.append(stride)
        stride *= 2
    # 1. up-sweep: the later element of each pair absorbs the earlier one
    for stride in strides:
        av, xv = _level(a, stride, reverse), _level(x, stride, reverse)
        count = xv.shape[2]
        pairs = count // 2
        if reverse:
            first = count % 2
            later, earlier = slice(first, count, 2), slice(first + 1, count, 2)
        else:
            later, earlier = slice(1, 2 * pairs, 2), slice(0, 2 * pairs, 2)
        xv[:, :, later].addcmul_(av[:, :, later], xv[:, :, earlier])
        av[:, :, later].mul_(av[:, :, earlier])
    # 2. down-sweep: each remaining block start takes the full prefix that ends just before it
    for stride in reversed(strides):
        av, xv = _level(a, stride, reverse), _level(x, stride, reverse)
        count = xv.shape[2]
        open_blocks = (count - 1) // 2
        if open_blocks == 0:
            continue
        if reverse:
            first = count - 1 - 2 * open_blocks
            target, source = slice(first, first + 2 * open_blocks, 2), slice(first + 1, first + 1 + 2 * open_blocks, 2)
        else:
            target, source = slice(2, 2 + 2 * open_blocks, 2), slice(1, 1 + 2 * open_blocks, 2)
        xv[:, :, target].addcmul_(av[:, :, target], xv[:, :, source])


class _ScanFn(torch.autograd.Function):
    """h = scan(exp(Δ A), X, h0) on [B, D, L, N]; saves Δ, A, h0 and the states, recomputes exp(Δ A) in backward.
    ``rst`` (bool [B, 1, L, 1] or None, packed rows): the steps that read h0 in place of h_{t-1}."""

    @staticmethod
    def forward(ctx, delta, A, X, h0, rst=None) -> torch.Tensor:
        dA = torch.exp(delta.unsqueeze(-1) * A.unsqueeze(1))  # [B, D, L, N]
        h = X.contiguous().clone()  # [B, D, L, N]
        if h0 is not None and h.shape[2] > 0:
            h[:, :, 0].addcmul_(dA[:, :, 0], h0)
        if rst is not None:
            # a restart is the pair (0, Ā_t h0 + X_t), as the first step above
            if h0 is not None:
                h.add_(torch.where(rst, dA * h0.unsqueeze(2), 0.0))
            dA.masked_fill_(rst, 0.0)
        _pscan_(dA, h)
        ctx.save_for_backward(delta, A, h0, h, rst)
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h: torch.Tensor):
        delta, A, h0, h, rst = ctx.saved_tensors
        seqlen = h.shape[2]
        dA = torch.exp(delta.unsqueeze(-1) * A.unsqueeze(1))  # [B, D, L, N]
        # adjoint λ_t = g_t + Ā_{t+1} ⊙ λ_{t+1}: the scan backwards in time with coefficients shifted by one
        a_next = torch.zeros_like(dA)
        a_next[:, :, : seqlen - 1] = dA[:, :, 1:]
        if rst is not None:
            a_next[:, :, : seqlen - 1].masked_fill_(rst[:, :, 1:], 0.0)  # a restart does not read h_{t-1}
        lam = grad_h.contiguous().clone()  # [B, D, L, N]
        _pscan_(a_next, lam, reverse=True)
        del a_next
        # ∂L/∂Ā_t = λ_t ⊙ h_{t-1} (h_0 included), then through Ā = exp(Δ A)
        w = torch.empty_like(dA)  # [B, D, L, N]
        torch.mul(lam[:, :, 1:], h[:, :, :-1], out=w[:, :, 1:])
        if seqlen > 0:
            if h0 is None:
                w[:, :, 0].zero_()
            else:
                torch.mul(lam[:, :, 0], h0, out=w[:, :, 0])
        if rst is not None:
            w.masked_fill_(rst, 0.0)
            if h0 is not None:
                w.add_(torch.where(rst, lam * h0.unsqueeze(2), 0.0))
        w.mul_(dA)
        grad_delta = torch.einsum("bdln,dn->bdl", w, A) if ctx.needs_input_grad[0] else None
        grad_A = torch.einsum("bdln,bdl->dn", w, delta) if ctx.needs_input_grad[1] else None
        grad_h0 = None
        if h0 is not None and ctx.needs_input_grad[3]:
            grad_h0 = dA[:, :, 0] * lam[:, :, 0] if seqlen > 0 else grad_h.new_zeros(h0.shape)
            if rst is not None:
                grad_h0 = grad_h0 + torch.where(rst, dA * lam, 0.0).sum(2)
        return grad_delta, grad_A, lam, grad_h0, None


def selective_scan_blelloch(
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
    """Parallel-scan twin of ``selective_scan_ref`` (same arguments, same maths); ``backend="torch"`` on CUDA.

    Args:
        u (torch.Tensor): shape [B, D, L]
        delta (torch.Tensor): shape [B, D, L]
        A (torch.Tensor): shape [D, N]
        B (torch.Tensor): shape [B, N, L]
        C (torch.Tensor): shape [B, N, L]
        D (torch.Tensor | None): shape [D]
        z (torch.Tensor | None): shape [B, D, L]
        delta_bias (torch.Tensor | None): shape [D]
        initial_state (torch.Tensor | None): h_0, shape [D, N] or [B, D, N]
        state_offset (torch.Tensor | None): h', shape [D, N] or [B, D, N]
        y_offset (torch.Tensor | None): y', shape [D] or [B, D]
        resets (torch.Tensor | None): bool [B, ceil(L / RESET_ALIGN)], packed rows (``varlen.py``)
    Returns:
        y [B, D, L] in u's dtype, and h_L [B, D, N] in fp32 (fp64 for fp64 inputs) when ``return_final_state``.
    """
    out_dtype = u.dtype
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    cdt = torch.promote_types(u.dtype, torch.float32)
    uf, delta, A, B, C = u.to(cdt), delta.to(cdt), A.to(cdt), B.to(cdt), C.to(cdt)
    if delta_bias is not None:
        delta = delta + delta_bias.to(cdt)[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    h0 = _batched(initial_state, batch, 3, cdt)
    X = (delta * uf).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(1)  # [B, D, L, N]
    rst = _restarts(resets, seqlen)
    rst = None if rst is None else rst.t()[:, None, :, None]  # [B, 1, L, 1]
    h = _ScanFn.apply(delta, A, X, h0, rst)  # [B, D, L, N]
    y = torch.einsum("bdln,bnl->bdl", h, C)  # [B, D, L]
    if state_offset is not None:
        eq = "dn,bnl->bdl" if state_offset.dim() == 2 else "bdn,bnl->bdl"
        y = y + torch.einsum(eq, state_offset.to(cdt), C)
    if D is not None:
        y = y + D.to(cdt)[None, :, None] * uf
    if y_offset is not None:
        y = y + y_offset.to(cdt).unsqueeze(-1)
    if z is not None:
        y = y * F.silu(z.to(cdt))
    y = y.to(out_dtype).contiguous()
    if not return_final_state:
        return y
    if seqlen > 0:
        last = h[:, :, -1].clone()  # [B, D, N]
    elif h0 is not None:
        last = h0.clone()
    else:
        last = torch.zeros(batch, dim, dstate, dtype=cdt, device=u.device)
    return y, last


def selective_scan_torch(
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
    """``backend="torch"``: the one place that picks the pure-PyTorch scan (same arguments as ``selective_scan_ref``).

    CPU: the sequential loop of ``sequential.py`` (one cache-resident [B, D, N] update per step) beats the Blelloch scan,
    which materialises several [B, D, L, N] tensors per pass and is memory-bound there (docs/kernels.md, "CPU
    torch backend": 4-6x on the scan alone). CUDA: the Blelloch scan, whose O(log L) sweeps are parallel over L.
    """
    fn = selective_scan_sequential if u.device.type == "cpu" else selective_scan_blelloch
    return fn(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus,
        initial_state=initial_state, state_offset=state_offset, y_offset=y_offset,
        return_final_state=return_final_state, resets=resets,
    )  # fmt: skip
