"""Mamba-1 (S6) selective scan: the fp32 sequential reference.

Every flag of the fast backends is supported here; the fast paths are tested against this file.
Layout follows mamba_ssm's ``selective_scan_fn`` (channel-first):

    u, delta, z  [B, D, L]     A  [D, N]     B, C  [B, N, L]     D, delta_bias  [D]
    initial_state  [D, N] or [B, D, N]     state_offset  [D, N] or [B, D, N]     y_offset  [D] or [B, D]

Recurrence (docs/methods.md §2, §4.1-4.3), with Δ = softplus(delta + delta_bias) when asked:
    h_0 = initial_state (0 when None)
    h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t u_t       h_{t-1} := h_0 where ``resets`` restarts the row at t
    y_t = C_tᵀ (h_t + h') + D u_t + y'            h' never enters the recurrence
    y_t ← y_t · silu(z_t)                          when z is given
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..varlen import reset_positions


def _batched(
    t: torch.Tensor | None, batch: int, ndim: int, dtype: torch.dtype | None = torch.float32
) -> torch.Tensor | None:
    """Broadcast a shared tensor of ``ndim - 1`` dims to a leading batch axis (a view; autograd sums it back), cast to
    ``dtype`` (None: kept). Shared by the reference and the pure-PyTorch backends."""
    if t is None:
        return None
    if dtype is not None:
        t = t.to(dtype)
    return t.unsqueeze(0).expand(batch, *t.shape) if t.dim() == ndim - 1 else t


def _rows_at(t: torch.Tensor | None, index: torch.Tensor | None, ndim: int) -> torch.Tensor | None:
    """A per-row offset table [n, ...] read through ``index`` [B] (row b: ``t[index[b]]``); shared offsets (``ndim - 1``
    dims) and a None index pass through. Shared by the decode steps' references."""
    if t is None or index is None or t.dim() == ndim - 1:
        return t
    return t.index_select(0, index)


def selective_scan_ref(
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
    """Sequential fp32 reference. Returns y [B, D, L] in u's dtype (and h_L [B, D, N] in fp32). ``resets``
    (bool [B, ceil(L / RESET_ALIGN)], ``varlen.py``): the step at position r · RESET_ALIGN of row b reads the initial
    state where resets[b, r]."""
    out_dtype = u.dtype
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    u, delta, A, B, C = u.float(), delta.float(), A.float(), B.float(), C.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    h = _batched(initial_state, batch, 3)
    h = torch.zeros(batch, dim, dstate, device=u.device) if h is None else h.clone()
    h_init = h
    restart = None if resets is None else reset_positions(resets, seqlen)
    deltaA = torch.exp(delta.unsqueeze(-1) * A.unsqueeze(1))  # [B, D, L, N]
    deltaBu = delta.unsqueeze(-1) * B.transpose(1, 2).unsqueeze(1) * u.unsqueeze(-1)  # [B, D, L, N]
    ys = []
    for t in range(seqlen):
        if restart is not None:
            h = torch.where(restart[:, t, None, None], h_init, h)
        h = deltaA[:, :, t] * h + deltaBu[:, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))
    y = torch.stack(ys, dim=2) if seqlen > 0 else u.new_zeros(batch, dim, 0)  # [B, D, L]
    h_off = _batched(state_offset, batch, 3)
    if h_off is not None:
        y = y + torch.einsum("bdn,bnl->bdl", h_off, C)
    if D is not None:
        y = y + D.float()[None, :, None] * u
    y_off = _batched(y_offset, batch, 2)
    if y_off is not None:
        y = y + y_off.unsqueeze(-1)
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(out_dtype)
    return (y, h) if return_final_state else y


def selective_state_update_ref(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    *,
    state_offset: torch.Tensor | None = None,
    y_offset: torch.Tensor | None = None,
    offset_index: torch.Tensor | None = None,
    A_is_log: bool = False,
) -> torch.Tensor:
    """One decode step. ``state`` [B, D, N] is updated in place (un-offset); returns y [B, D] in x's dtype.

    x, dt, z [B, D]; A [D, N]; B, C [B, N]; D, dt_bias [D]; state_offset [D, N] or [B, D, N]; y_offset [D] or [B, D].
    ``offset_index`` (int32 [B]): per-row offsets are tables [n, D, N] / [n, D] and row b reads entry
    ``offset_index[b]``. ``A_is_log``: A holds A_log, A = -exp(A_log).
    """
    state_offset, y_offset = _rows_at(state_offset, offset_index, 3), _rows_at(y_offset, offset_index, 2)
    out_dtype = x.dtype
    batch = x.shape[0]
    xf, dt = x.float(), dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    A = -torch.exp(A.float()) if A_is_log else A.float()
    dA = torch.exp(dt.unsqueeze(-1) * A)  # [B, D, N]
    dBx = dt.unsqueeze(-1) * B.float().unsqueeze(1) * xf.unsqueeze(-1)  # [B, D, N]
    new_state = dA * state.float() + dBx
    state.copy_(new_state)
    h = new_state
    h_off = _batched(state_offset, batch, 3)
    if h_off is not None:
        h = h + h_off
    y = torch.einsum("bdn,bn->bd", h, C.float())
    if D is not None:
        y = y + D.float() * xf
    y_off = _batched(y_offset, batch, 2)
    if y_off is not None:
        y = y + y_off
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(out_dtype)
