"""Gated delta rule: the chunked torch path (autograd gives every gradient, h0 and S' included).

Within a chunk of C positions from the state S at its start, with G the in-chunk cumulative log-decay (per head, or
per key channel for KDA) and D_ij = Σ_c a_ic b_jc exp(G_ic - G_jc) for j ≤ i (the decayed Gram, ``_decayed_gram``):
    T = I + strictly_lower(β_i D(k̂, k̂)_ij)                         the delta rule's UT system
    U = T⁻¹ (β v),  W = T⁻¹ (β k̂ ⊙ exp(G))                        new values, decayed keys reading S
    V' = U - W S                                                    what S does not predict yet
    o = (q̂ ⊙ exp(G)) S + D(q̂, k̂) V'                                read-out of S, then the chunk itself
    S ← diag(exp(G_C)) S + (k̂ ⊙ exp(G_C - G))ᵀ V'
Offsets are read out after the scan (``naive.read_offsets``), so they never decay.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .naive import prepare_qk, read_offsets

DEFAULT_CHUNK = 64
# A per-channel gate (KDA) needs the decayed Gram as [C, C, K] per chunk: memory ~ L·C·K per head, so a shorter chunk
DEFAULT_CHUNK_PER_CHANNEL = 16


def _decayed_gram(a: torch.Tensor, b: torch.Tensor, G: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
    """[..., C, C]: Σ_c a_ic b_jc exp(G_ic - G_jc) where ``causal`` (j ≤ i), else 0. G [..., C] or [..., C, K]."""
    if G.dim() == a.dim() - 1:  # one decay per head: the exponent factors out of the sum
        diff = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf"))
        return (a @ b.transpose(-1, -2)) * diff.exp()
    diff = (G[..., :, None, :] - G[..., None, :, :]).masked_fill(~causal[..., None], float("-inf"))
    return torch.einsum("...ic,...jc,...ijc->...ij", a, b, diff.exp())


def gated_delta_rule_torch(
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
    """Same arguments and results as ``naive.gated_delta_rule_ref``; ``chunk_size`` defaults to 64 (16 for a
    per-channel gate)."""
    batch, seqlen, nheads, dv = v.shape
    out_dtype = v.dtype
    c = chunk_size or (DEFAULT_CHUNK_PER_CHANNEL if g.dim() == 4 else DEFAULT_CHUNK)
    q_hat, k_hat = prepare_qk(q, k, nheads, scale=scale, use_qk_l2norm=use_qk_l2norm)
    dk = q_hat.shape[-1]
    per_channel = g.dim() == 4
    pad = (c - seqlen % c) % c
    n = (seqlen + pad) // c

    def chunks(t: torch.Tensor) -> torch.Tensor:  # [B, L, H, ...] -> [B, H, n, C, ...], zero-padded at the end
        t = t.float().movedim(1, 2)
        t = F.pad(t, (0, 0, 0, pad) if t.dim() == 4 else (0, pad))
        return t.reshape(batch, nheads, n, c, *t.shape[3:])

    qc, kc, vc, bc = chunks(q_hat), chunks(k_hat), chunks(v), chunks(beta)
    G = chunks(g).cumsum(dim=3)  # [B, H, n, C] or [B, H, n, C, K]; padded steps neither decay nor write (β = 0)
    causal = torch.ones(c, c, dtype=torch.bool, device=v.device).tril()
    eG = G.exp() if per_channel else G.exp()[..., None]
    G_last = G[:, :, :, -1:]  # [B, H, n, 1(, K)]
    k_to_end = kc * ((G_last - G).exp() if per_channel else (G_last - G).exp()[..., None])
    system = _decayed_gram(kc * bc[..., None], kc, G, causal).tril(-1)
    system = system + torch.eye(c, dtype=system.dtype, device=system.device)
    U = torch.linalg.solve_triangular(system, vc * bc[..., None], upper=False, unitriangular=True)
    W = torch.linalg.solve_triangular(system, kc * bc[..., None] * eG, upper=False, unitriangular=True)
    attn = _decayed_gram(qc, kc, G, causal)
    q_dec = qc * eG
    chunk_decay = G_last.squeeze(3).exp()  # [B, H, n] or [B, H, n, K]
    if initial_state is None:
        state = v.new_zeros(batch, nheads, dk, dv, dtype=torch.float32)
    else:
        state = initial_state.float().expand(batch, nheads, dk, dv)
    outs = []
    for i in range(n):
        v_new = U[:, :, i] - W[:, :, i] @ state
        outs.append(q_dec[:, :, i] @ state + attn[:, :, i] @ v_new)
        decay = chunk_decay[:, :, i]
        state = state * (decay[..., None] if per_channel else decay[..., None, None])
        state = state + k_to_end[:, :, i].transpose(-1, -2) @ v_new
    o = torch.stack(outs, dim=2).reshape(batch, nheads, n * c, dv)[:, :, :seqlen].transpose(1, 2)
    o = read_offsets(o, q_hat, state_offset, output_offset).to(out_dtype)
    return (o, state) if output_final_state else o
