"""Mamba-2 (SSD) scan: the chunked pure-PyTorch backend (the ``ssd_minimal`` algorithm of Dao & Gu, §6 / Listing 1).

The sequence is cut into chunks of T steps. Inside a chunk the SSM is the masked quadratic form
Y = (L ∘ C Bᵀ) X with L[t, s] = exp(Σ_{r=s+1..t} Δ_r A); across chunks only the [P, N] states are carried, by a
recurrence over the chunk boundaries. Heads map to groups in contiguous blocks (head i reads group i // (H/G)), i.e.
the head axis is viewed as [G, H/G] and B_t, C_t are never repeated in memory. Plain autograd; fp32 compute
(fp64 for fp64 inputs, for gradcheck); y is returned in x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..varlen import RESET_ALIGN, reset_chunk_size


def segsum(x: torch.Tensor) -> torch.Tensor:
    """[..., T] → [..., T, T] with out[t, s] = Σ_{r=s+1..t} x_r for s ≤ t and -inf above the diagonal.

    Built from a masked cumsum rather than a difference of cumsums, so it stays exact for long decays.
    """
    T = x.shape[-1]
    x = x.unsqueeze(-1).expand(*x.shape, T)  # [..., T(t), T(s)] holds x_t
    strict = torch.ones(T, T, dtype=torch.bool, device=x.device).tril(-1)
    x = x.masked_fill(~strict, 0)
    out = torch.cumsum(x, dim=-2)
    return out.masked_fill(~strict.logical_or(torch.eye(T, dtype=torch.bool, device=x.device)), float("-inf"))


def _per_batch(t: torch.Tensor | None, batch: int, ndim: int, dtype: torch.dtype) -> torch.Tensor | None:
    if t is None:
        return None
    t = t.to(dtype)
    return t.unsqueeze(0).expand(batch, *t.shape) if t.dim() == ndim - 1 else t


def ssd_scan_torch(
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
    """Chunked twin of ``ssd_scan_ref`` (same arguments, same maths).

    Args:
        x (torch.Tensor): shape [B, L, H, P]
        dt (torch.Tensor): shape [B, L, H]
        A (torch.Tensor): shape [H]
        B (torch.Tensor): shape [B, L, G, N]
        C (torch.Tensor): shape [B, L, G, N]
        chunk_size (int | None): chunk length T; default 64 on CPU, 128 elsewhere; any L (padded internally); with
            ``resets``, a divisor of RESET_ALIGN (default 64)
        D (torch.Tensor | None): shape [H] or [H, P]
        z (torch.Tensor | None): shape [B, L, H, P]
        dt_bias (torch.Tensor | None): shape [H]
        initial_state (torch.Tensor | None): h_0, shape [H, P, N] or [B, H, P, N]
        state_offset (torch.Tensor | None): h', shape [H, P, N] or [B, H, P, N]
        y_offset (torch.Tensor | None): y', shape [H, P] or [B, H, P]
        resets (torch.Tensor | None): bool [B, ceil(L / RESET_ALIGN)], packed rows (``varlen.py``): the chunk starting
            at a flagged position starts from h_0
    Returns:
        y [B, L, H, P] in x's dtype, and h_L [B, H, P, N] in fp32 (fp64 for fp64 inputs) when ``return_final_state``.
    """
    out_dtype = x.dtype
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    hpg = nheads // ngroups
    cdt = torch.promote_types(x.dtype, torch.float32)
    xf, dt, A, B, C = x.to(cdt), dt.to(cdt), A.to(cdt), B.to(cdt), C.to(cdt)
    if dt_bias is not None:
        dt = dt + dt_bias.to(cdt)
    if dt_softplus:
        dt = F.softplus(dt)
    if resets is not None:
        chunk_size = reset_chunk_size("ssd_scan_torch", chunk_size)
    T = chunk_size or (64 if x.device.type == "cpu" else 128)
    T = max(1, min(T, seqlen))
    nchunks = -(-seqlen // T)
    pad = nchunks * T - seqlen
    # zero padding at the end is inert: Δ = 0 gives decay 1 and no input, so the final state is unchanged
    Xc = F.pad(xf * dt.unsqueeze(-1), (0, 0, 0, 0, 0, pad)).view(batch, nchunks, T, ngroups, hpg, headdim)
    Ac = F.pad(dt * A, (0, 0, 0, pad)).view(batch, nchunks, T, ngroups, hpg).permute(0, 3, 4, 1, 2)  # [B, G, K, c, T]
    Bc = F.pad(B, (0, 0, 0, 0, 0, pad)).view(batch, nchunks, T, ngroups, dstate)
    Cc = F.pad(C, (0, 0, 0, 0, 0, pad)).view(batch, nchunks, T, ngroups, dstate)
    A_cumsum = torch.cumsum(Ac, dim=-1)  # [B, G, K, c, T]

    # 1. intra-chunk output (diagonal blocks): Y_diag = (L ∘ C Bᵀ) X
    Lmat = torch.exp(segsum(Ac))  # [B, G, K, c, T, T]
    CB = torch.einsum("bctgn,bcsgn->bgcts", Cc, Bc)  # [B, G, c, T, T]
    y = torch.einsum("bgkcts,bcsgkp->bctgkp", Lmat * CB.unsqueeze(2), Xc)  # [B, c, T, G, K, P]

    # 2. chunk states: the input of each chunk decayed to the chunk's end (B terms)
    decay_states = torch.exp(A_cumsum[..., -1:] - A_cumsum)  # [B, G, K, c, T]
    states = torch.einsum("bctgn,bgkct,bctgkp->bcgkpn", Bc, decay_states, Xc)  # [B, c, G, K, P, N]

    # 3. inter-chunk recurrence over chunk boundaries, started from h_0 (A terms)
    h0 = _per_batch(initial_state, batch, 4, cdt)
    if h0 is None:
        h0 = xf.new_zeros(batch, nheads, headdim, dstate)
    states = torch.cat([h0.reshape(batch, 1, ngroups, hpg, headdim, dstate), states], dim=1)  # [B, c+1, G, K, P, N]
    decay_chunk = torch.exp(segsum(F.pad(A_cumsum[..., -1], (1, 0))))  # [B, G, K, c+1, c+1]
    if resets is not None:
        # packed rows: the state entering a flagged chunk j is h_0, so entry j holds h_0 instead of chunk j-1's input,
        # and boundary z sums only from its last reset on (chunk 0 always counts as one)
        start = torch.zeros(batch, nchunks + 1, dtype=torch.bool, device=x.device)
        start[:, : nchunks : RESET_ALIGN // T] = resets  # T divides 64 or T = L < 64 (then one chunk)
        start[:, 0] = True
        states = torch.where(start[:, :, None, None, None, None], h0.reshape(batch, 1, *states.shape[2:]), states)
        idx = torch.arange(nchunks + 1, device=x.device)
        last = torch.where(start, idx, 0).cummax(dim=1).values  # [B, c+1]: the last reset at or before z
        decay_chunk = decay_chunk * (idx[None, None, :] >= last[:, :, None])[:, None, None].to(cdt)
    new_states = torch.einsum("bgkzc,bcgkpn->bzgkpn", decay_chunk, states)  # [B, c+1, G, K, P, N]
    states, final_state = new_states[:, :-1], new_states[:, -1]

    # 4. state -> output at every position of the next chunk (C terms)
    state_decay_out = torch.exp(A_cumsum)  # [B, G, K, c, T]
    y = y + torch.einsum("bctgn,bcgkpn,bgkct->bctgkp", Cc, states, state_decay_out)
    y = y.reshape(batch, nchunks * T, nheads, headdim)[:, :seqlen]  # [B, L, H, P]

    # 5. read-out offset C_t h' (never decays), skip, output offset and gate
    if state_offset is not None:
        h_off = state_offset.to(cdt)
        if h_off.dim() == 3:
            off = torch.einsum("blgn,gkpn->blgkp", C, h_off.view(ngroups, hpg, headdim, dstate))
        else:
            off = torch.einsum("blgn,bgkpn->blgkp", C, h_off.view(batch, ngroups, hpg, headdim, dstate))
        y = y + off.reshape(batch, seqlen, nheads, headdim)
    if D is not None:
        Df = D.to(cdt)
        y = y + (Df.unsqueeze(-1) if Df.dim() == 1 else Df) * xf
    if y_offset is not None:
        y_off = y_offset.to(cdt)
        y = y + (y_off if y_off.dim() == 2 else y_off.unsqueeze(1))
    if z is not None:
        y = y * F.silu(z.to(cdt))
    y = y.to(out_dtype).contiguous()
    if return_final_state:
        return y, final_state.reshape(batch, nheads, headdim, dstate)
    return y
