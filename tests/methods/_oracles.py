"""Plain-PyTorch sequential mixers (docs/methods.md §2-3) with h0, h' and y' arguments: the oracles of the method
tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _conv(x: torch.Tensor, conv: torch.nn.Conv1d, conv0: torch.Tensor | None) -> torch.Tensor:
    """x [B, L, C] -> silu(causal depthwise conv(x)) [B, L, C], left-padded by conv0 [C, K-1] or zeros."""
    k = conv.weight.shape[-1]
    pad = x.new_zeros(x.shape[0], x.shape[2], k - 1) if conv0 is None else conv0.to(x).expand(x.shape[0], -1, -1)
    xp = torch.cat([pad, x.transpose(1, 2)], dim=-1)
    return F.silu(F.conv1d(xp, conv.weight, conv.bias, groups=x.shape[2])).transpose(1, 2)


def _base(layer):
    return getattr(layer, "base_layer", layer)


def mamba1_mixer(m, u, *, h0=None, conv0=None, h_off=None, y_off=None, dense_skip=None):
    """Mamba-1 mixer on u [B, L, d_model] using only the *base* Linears. Returns (out, pieces).

    ``dense_skip`` [D, D] replaces the diagonal skip D_skip (the §5.3 oracle).
    """
    x, z = _base(m.in_proj)(u).chunk(2, dim=-1)  # [B, L, D]
    x = _conv(x, m.conv1d, conv0)
    n = m.A_log.shape[1]
    dt, Bt, Ct = torch.split(_base(m.x_proj)(x), [_base(m.x_proj).out_features - 2 * n, n, n], dim=-1)
    delta = F.softplus(_base(m.dt_proj)(dt))  # [B, L, D]
    A = -torch.exp(m.A_log)  # [D, N]
    h = torch.zeros(u.shape[0], *A.shape, dtype=u.dtype) if h0 is None else h0.to(u).expand(u.shape[0], -1, -1)
    ys = []
    for t in range(u.shape[1]):
        h = torch.exp(delta[:, t, :, None] * A) * h + delta[:, t, :, None] * Bt[:, t, None, :] * x[:, t, :, None]
        hr = h if h_off is None else h + h_off
        ys.append(torch.einsum("bdn,bn->bd", hr, Ct[:, t]))
    y = torch.stack(ys, dim=1)  # [B, L, D]
    y = y + (x * m.D if dense_skip is None else x @ dense_skip.T)
    if y_off is not None:
        y = y + y_off
    out = _base(m.out_proj)(y * F.silu(z))
    return out, {"z": z, "C": Ct, "delta": delta, "A": A}


def mamba2_mixer(m, u, *, h0=None, conv0=None, h_off=None, y_off=None):
    """Mamba-2 mixer on u [B, L, d_model] using only the base Linears. Returns out [B, L, d_model]."""
    d, g, h = m.d_inner, m.ngroups, m.nheads
    n = m.d_state
    p = d // h
    bsz, seqlen, _ = u.shape
    z, xBC, dt = torch.split(_base(m.in_proj)(u), [d, m.conv_dim, h], dim=-1)
    xBC = _conv(xBC, m.conv1d, conv0)
    x, Bt, Ct = torch.split(xBC, [d, g * n, g * n], dim=-1)
    x = x.reshape(bsz, seqlen, h, p)
    Bt = Bt.reshape(bsz, seqlen, g, n).repeat_interleave(h // g, dim=2)  # [B, L, H, N]
    Ct = Ct.reshape(bsz, seqlen, g, n).repeat_interleave(h // g, dim=2)
    delta = F.softplus(dt + m.dt_bias)  # [B, L, H]
    A = -torch.exp(m.A_log)  # [H]
    state = torch.zeros(bsz, h, p, n, dtype=u.dtype) if h0 is None else h0.to(u).expand(bsz, -1, -1, -1)
    ys = []
    for t in range(seqlen):
        dA = torch.exp(delta[:, t] * A)[:, :, None, None]
        state = dA * state + (delta[:, t, :, None] * x[:, t])[..., None] * Bt[:, t, :, None, :]
        hr = state if h_off is None else state + h_off
        ys.append(torch.einsum("bhpn,bhn->bhp", hr, Ct[:, t]))
    y = torch.stack(ys, dim=1) + m.D[:, None] * x  # [B, L, H, P]
    if y_off is not None:
        y = y + y_off
    return _base(m.out_proj)(m.norm(y.reshape(bsz, seqlen, d), z))
