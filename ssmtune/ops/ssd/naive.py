"""Mamba-2 (SSD) scan: the fp32 sequential reference.

Layout follows mamba_ssm's ``mamba_chunk_scan_combined`` (time-first):

    x, z  [B, L, H, P]     dt  [B, L, H]     A  [H]     B, C  [B, L, G, N]     D  [H] or [H, P]     dt_bias  [H]
    initial_state  [H, P, N] or [B, H, P, N]     state_offset  [H, P, N] or [B, H, P, N]
    y_offset  [H, P] or [B, H, P]

Head i reads group g(i) = i // (H / G) of B and C (contiguous blocks, repeat_interleave semantics).
Per head, with Δ = softplus(dt + dt_bias) when asked (docs/methods.md §3):
    h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t B_tᵀ          h ∈ R^{P×N}; h_{t-1} := h_0 where ``resets`` restarts at t
    y_t = (h_t + h') C_t + D x_t + y'                  then y_t · silu(z_t) when z is given
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..selective_scan.naive import _batched, _rows_at
from ..varlen import reset_positions


def _expand_groups(t: torch.Tensor, nheads: int, dim: int) -> torch.Tensor:
    """[..., G, N] → [..., H, N]: every group serves H/G consecutive heads."""
    ngroups = t.shape[dim]
    return t.repeat_interleave(nheads // ngroups, dim=dim)


def _skip(D: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """D [H] or [H, P] times x [..., H, P]."""
    D = D.float()
    return (D.unsqueeze(-1) if D.dim() == 1 else D) * x


def ssd_scan_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    chunk_size: int | None = None,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    state_offset: torch.Tensor | None = None,
    y_offset: torch.Tensor | None = None,
    return_final_state: bool = False,
    resets: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sequential fp32 reference (``chunk_size`` is accepted and ignored). Returns y [B, L, H, P] in x's dtype
    (and h_L [B, H, P, N] in fp32). ``resets`` (bool [B, ceil(L / RESET_ALIGN)], ``varlen.py``): the step at position
    r · RESET_ALIGN of row b reads the initial state where resets[b, r]."""
    del chunk_size
    out_dtype = x.dtype
    batch, seqlen, nheads, headdim = x.shape
    dstate = B.shape[-1]
    xf, dt, A = x.float(), dt.float(), A.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    Bh = _expand_groups(B.float(), nheads, 2)  # [B, L, H, N]
    Ch = _expand_groups(C.float(), nheads, 2)  # [B, L, H, N]
    dA = torch.exp(dt * A)  # [B, L, H]
    h = _batched(initial_state, batch, 4)
    h = torch.zeros(batch, nheads, headdim, dstate, device=x.device) if h is None else h.clone()
    h_init = h
    restart = None if resets is None else reset_positions(resets, seqlen)
    ys = []
    for t in range(seqlen):
        if restart is not None:
            h = torch.where(restart[:, t, None, None, None], h_init, h)
        dBx = (dt[:, t, :, None] * xf[:, t]).unsqueeze(-1) * Bh[:, t].unsqueeze(2)  # [B, H, P, N]
        h = dA[:, t, :, None, None] * h + dBx
        ys.append(torch.einsum("bhpn,bhn->bhp", h, Ch[:, t]))
    y = torch.stack(ys, dim=1) if seqlen > 0 else xf.new_zeros(batch, 0, nheads, headdim)  # [B, L, H, P]
    h_off = _batched(state_offset, batch, 4)
    if h_off is not None:
        y = y + torch.einsum("bhpn,blhn->blhp", h_off, Ch)
    if D is not None:
        y = y + _skip(D, xf)
    y_off = _batched(y_offset, batch, 3)
    if y_off is not None:
        y = y + y_off.unsqueeze(1)
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(out_dtype)
    return (y, h) if return_final_state else y


def ssd_state_update_ref(
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
    """One decode step. ``state`` [B, H, P, N] is updated in place (un-offset); returns y [B, H, P] in x's dtype.

    x, z [B, H, P]; dt [B, H]; A [H]; B, C [B, G, N]; D [H] or [H, P]; dt_bias [H].
    ``offset_index`` (int32 [B]): per-row offsets are tables [n, H, P, N] / [n, H, P] and row b reads entry
    ``offset_index[b]``. ``A_is_log``: A holds A_log, A = -exp(A_log).
    """
    state_offset, y_offset = _rows_at(state_offset, offset_index, 4), _rows_at(y_offset, offset_index, 3)
    out_dtype = x.dtype
    batch, nheads, _ = x.shape
    xf, dt = x.float(), dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    Bh = _expand_groups(B.float(), nheads, 1)  # [B, H, N]
    Ch = _expand_groups(C.float(), nheads, 1)  # [B, H, N]
    A = -torch.exp(A.float()) if A_is_log else A.float()
    dA = torch.exp(dt * A)  # [B, H]
    new_state = dA[:, :, None, None] * state.float() + (dt.unsqueeze(-1) * xf).unsqueeze(-1) * Bh.unsqueeze(2)
    state.copy_(new_state)
    h = new_state
    h_off = _batched(state_offset, batch, 4)
    if h_off is not None:
        h = h + h_off
    y = torch.einsum("bhpn,bhn->bhp", h, Ch)
    if D is not None:
        y = y + _skip(D, xf)
    y_off = _batched(y_offset, batch, 3)
    if y_off is not None:
        y = y + y_off
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(out_dtype)
