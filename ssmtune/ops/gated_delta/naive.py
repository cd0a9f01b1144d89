"""Gated delta rule: the fp32 sequential reference, every flag.

Layout follows flash-linear-attention's ``chunk_gated_delta_rule`` / ``chunk_kda`` (time-first):

    q, k  [B, L, Hk, K]     v  [B, L, H, V]     beta  [B, L, H]
    g  [B, L, H] (Gated DeltaNet: one log-decay per head) or [B, L, H, K] (KDA: one per key channel)
    initial_state, state_offset  [H, K, V] or [B, H, K, V]     output_offset  [H, V] or [B, H, V]

Value heads may outnumber key heads (H = m·Hk): key head i serves value heads i·m .. i·m+m-1 (repeat_interleave).
q̂ = scale · l2norm(q) (l2norm only with ``use_qk_l2norm``; scale defaults to K^-1/2), k̂ likewise without the scale.
Per head, with S ∈ R^{K×V}:
    S_t = diag(exp(g_t)) S_{t-1}                     (a scalar exp(g_t) for Gated DeltaNet)
    S_t = S_t + β_t k̂_t (v_t - S_tᵀ k̂_t)ᵀ           the delta rule
    o_t = (S_t + S')ᵀ q̂_t + y'                      S' (state offset) and y' (output offset) act on the read-out only
"""

from __future__ import annotations

import torch


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(Σx² + eps) over the last axis, as fla's kernels and transformers normalise q and k."""
    return x * torch.rsqrt(x.square().sum(-1, keepdim=True) + eps)


def _prepare(x: torch.Tensor, nheads: int, use_qk_l2norm: bool) -> torch.Tensor:
    x = x.float()
    if use_qk_l2norm:
        x = l2norm(x)
    rep = nheads // x.shape[2]
    return x.repeat_interleave(rep, dim=2) if rep > 1 else x


def prepare_q(q: torch.Tensor, nheads: int, *, scale: float | None, use_qk_l2norm: bool) -> torch.Tensor:
    """fp32 q̂ [B, L, H, K], normalised and scaled as the kernels do, key heads repeated: all the read-out of the
    offsets needs (a kernel that runs the recurrence itself takes k̂ from ``prepare_qk``)."""
    return _prepare(q, nheads, use_qk_l2norm) * (q.shape[-1] ** -0.5 if scale is None else scale)


def prepare_qk(
    q: torch.Tensor, k: torch.Tensor, nheads: int, *, scale: float | None, use_qk_l2norm: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 q̂ [B, L, H, K] (``prepare_q``) and k̂ [B, L, H, K] (normalised alike, not scaled), key heads repeated."""
    return prepare_q(q, nheads, scale=scale, use_qk_l2norm=use_qk_l2norm), _prepare(k, nheads, use_qk_l2norm)


def read_offsets(
    o: torch.Tensor, q_hat: torch.Tensor, state_offset: torch.Tensor | None, output_offset: torch.Tensor | None
) -> torch.Tensor:
    """o [B, L, H, V] + q̂ S' + y' in fp32: one GEMM beside the kernel, never decayed."""
    if state_offset is not None:
        s = state_offset.float()
        o = o + (
            torch.einsum("blhk,hkv->blhv", q_hat, s) if s.dim() == 3 else torch.einsum("blhk,bhkv->blhv", q_hat, s)
        )
    if output_offset is not None:
        y = output_offset.float()
        o = o + (y if y.dim() == 2 else y[:, None])
    return o


def gated_delta_rule_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
    initial_state: torch.Tensor | None = None,
    state_offset: torch.Tensor | None = None,
    output_offset: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """o [B, L, H, V] in v's dtype (and S_L [B, H, K, V] in fp32 when ``output_final_state``); ``chunk_size`` is
    ignored."""
    batch, seqlen, nheads, dv = v.shape
    out_dtype = v.dtype
    q_hat, k_hat = prepare_qk(q, k, nheads, scale=scale, use_qk_l2norm=use_qk_l2norm)
    dk = q_hat.shape[-1]
    v, beta, g = v.float(), beta.float(), g.float()
    if initial_state is None:
        state = v.new_zeros(batch, nheads, dk, dv)
    else:
        state = initial_state.float().expand(batch, nheads, dk, dv)
    outs = []
    for t in range(seqlen):
        decay = g[:, t].exp()  # [B, H] or [B, H, K]
        state = state * (decay[..., None, None] if decay.dim() == 2 else decay[..., None])
        kt = k_hat[:, t]  # [B, H, K]
        delta = (v[:, t] - torch.einsum("bhk,bhkv->bhv", kt, state)) * beta[:, t, :, None]
        state = state + kt[..., None] * delta[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q_hat[:, t], state))
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(batch, 0, nheads, dv)
    o = read_offsets(o, q_hat, state_offset, output_offset).to(out_dtype)
    return (o, state) if output_final_state else o
