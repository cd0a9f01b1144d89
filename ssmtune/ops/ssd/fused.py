"""Mamba-2 (SSD) chunked scan in Triton, forward and backward, with initial state and fused state offsets.

Same algorithm family as mamba_ssm's ``mamba_chunk_scan_combined`` (Dao & Gu, arXiv 2405.21060, §6), written anew.
With Q the chunk size, a_t = Σ_{s ≤ t in chunk} Δ_s A (chunk-local cumsum) and s_c the state entering chunk c:
    1. cumsum:        Δ = softplus(dt + dt_bias), a = chunk cumsum of Δ A                  (ssd_chunk_cumsum_fwd_kernel)
    2. states:        s_{c+1} = e^{a_last} s_c + Σ_k e^{a_last - a_k} Δ_k x_k B_kᵀ, s_0 = h0 (ssd_chunk_state_fwd_kernel)
    3. chunk scan:    y_q = Σ_{k ≤ q} (C_q·B_k) e^{a_q - a_k} Δ_k x_k + e^{a_q} s_c C_q + h' C_q + D x_q + y'
                      then y · silu(z)                                                     (ssd_chunk_scan_fwd_kernel)
Steps 2 fuses the chunk states with the sequential state passing (one program per [P, N] tile loops over chunks).
Packed rows (``resets``, chunk size dividing RESET_ALIGN): s_c = h0 at a flagged chunk, in step 2 and its reverse
(ssd/README.md).
The offset h' never decays, so it is one extra [Q, N] x [N, P] product next to the inter-chunk C·state product in the
same kernel; y' and D join the epilogue. The backward mirrors these steps; the derivation is in docs/kernels.md.
In the backward, dh' = Σ_t ĝ_tᵀ C_t accumulates in the reverse state-passing loop, and dC's h' term ĝ·h' is one GEMM
over all positions after the dC kernel (measured faster than the same dot inside it, docs/kernels.md).

Loop bounds are ``tl.constexpr`` (chunk count, chunk size, heads per program), so the kernels also run under
``TRITON_INTERPRET=1`` on CPU tensors. Launches are not wrapped in ``torch.cuda.device``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ssmtune.ops import launch, layout
from ssmtune.ops.ssd import SSD_MIN_HEADDIM_CUDA
from ssmtune.ops.varlen import RESET_ALIGN, check_resets, reset_chunk_size

_MIN_BLOCK = 16
# The CPU interpreter's bf16 tl.dot returns garbage (numpy has no bf16), so interpreted dots run in fp32.
_DOT_IN_FP32 = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


# Warps of the dx and dC backward kernels. With 4 instead of 8 the backward at B 8, L 8192, H 64, P 64, N 128 took
# 8.8 instead of 13.3 ms forward+backward (H200, triton 3.6); below head dim 32, 8 warps also gave wrong gradients
# (ssd/__init__.py).
BWD_NUM_WARPS = 4
# Warps of the forward chunk-scan kernel (Triton's default).
FWD_NUM_WARPS = 4


def _bwd_stages(*tensors: torch.Tensor) -> int:
    # fp32 tiles at head dim 64, N 128 and 64-step chunks: the dC kernel asked for 256 KiB of shared memory with 3
    # pipeline stages, over the H100/H200's 227 KiB (an OutOfResources error); 1 stage needs 128 KiB.
    # The widest operand decides (x, B and C may differ in dtype)
    return 1 if max(t.element_size() for t in tensors) >= 4 else 3


def _pow2(n: int) -> int:
    return max(_MIN_BLOCK, triton.next_power_of_2(n))


def _heads_per_program(nheads: int, ngroups: int, cap: int = 4) -> int:
    """Largest divisor of H/G not above ``cap``: programs loop over the heads of one group to sum dB, dC in place."""
    ratio = nheads // ngroups
    return max(d for d in range(1, min(cap, ratio) + 1) if ratio % d == 0)


@triton.jit
def _dot(a, b):
    if _DOT_IN_FP32:
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b)


@triton.heuristics({"HAS_BIAS": lambda args: args["dt_bias"] is not None})
@triton.jit(do_not_specialize=["T"])
def ssd_chunk_cumsum_fwd_kernel(
    dt,
    A,
    dt_bias,
    dt_out,
    a_out,
    T,
    H: tl.constexpr,
    TP: tl.constexpr,
    CHUNK: tl.constexpr,
    BH: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    i_c, i_b, i_hb = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    o_t = i_c * CHUNK + tl.arange(0, CHUNK)
    o_h = i_hb * BH + tl.arange(0, BH)
    m_t, m_h = o_t < T, o_h < H
    m = m_t[:, None] & m_h[None, :]
    b_dt = tl.load(dt + (i_b * T + o_t[:, None]) * H + o_h[None, :], mask=m, other=0.0).to(tl.float32)  # [Q, BH]
    if HAS_BIAS:
        b_dt += tl.load(dt_bias + o_h, mask=m_h, other=0.0).to(tl.float32)[None, :]
    if SOFTPLUS:
        b_dt = tl.where(b_dt <= 20.0, tl.log(1.0 + tl.exp(b_dt)), b_dt)
    # padded steps get Δ = 0: they neither decay nor write the state
    b_dt = tl.where(m, b_dt, 0.0)
    b_A = tl.load(A + o_h, mask=m_h, other=0.0).to(tl.float32)
    b_a = tl.cumsum(b_dt * b_A[None, :], axis=0)
    o_out = (i_b * H + o_h[None, :]) * TP + o_t[:, None]
    tl.store(dt_out + o_out, b_dt, mask=m_h[None, :])
    tl.store(a_out + o_out, b_a, mask=m_h[None, :])


@triton.heuristics(
    {
        "USE_INITIAL_STATE": lambda args: args["h0"] is not None,
        "HAS_RESETS": lambda args: args["resets"] is not None,
    }
)
@triton.jit(do_not_specialize=["T"])
def ssd_chunk_state_fwd_kernel(
    x,
    Bm,
    dt_p,
    a_cs,
    h0,
    resets,
    states,
    s_h0b,
    T,
    H: tl.constexpr,
    G: tl.constexpr,
    P: tl.constexpr,
    N: tl.constexpr,
    TP: tl.constexpr,
    NC: tl.constexpr,
    CHUNK: tl.constexpr,
    BK: tl.constexpr,
    BP: tl.constexpr,
    BN: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
    HAS_RESETS: tl.constexpr,
):
    i_n, i_p, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    i_g = i_h // (H // G)
    o_p = i_p * BP + tl.arange(0, BP)
    o_n = i_n * BN + tl.arange(0, BN)
    m_p, m_n = o_p < P, o_n < N
    m_pn = m_p[:, None] & m_n[None, :]
    o_pn = o_p[:, None] * N + o_n[None, :]
    if USE_INITIAL_STATE:
        b_s = tl.load(h0 + i_b * s_h0b + i_h * P * N + o_pn, mask=m_pn, other=0.0).to(tl.float32)
    else:
        b_s = tl.zeros([BP, BN], dtype=tl.float32)
    if HAS_RESETS:
        b_s0 = b_s
    for i_c in range(NC):
        if HAS_RESETS:
            # packed rows: a flagged chunk starts a sequence, from the row's initial state
            b_s = tl.where(tl.load(resets + i_b * NC + i_c) != 0, b_s0, b_s)
        tl.store(states + ((i_b * (NC + 1) + i_c) * H + i_h) * P * N + o_pn, b_s, mask=m_pn)
        b_alast = tl.load(a_cs + i_bh * TP + i_c * CHUNK + CHUNK - 1)
        b_acc = tl.zeros([BP, BN], dtype=tl.float32)
        for k0 in range(0, CHUNK, BK):
            o_t = i_c * CHUNK + k0 + tl.arange(0, BK)
            m_t = o_t < T
            # x_kᵀ [BP, BK] and B_k [BK, BN]
            b_xt = tl.load(
                x + ((i_b * T + o_t[None, :]) * H + i_h) * P + o_p[:, None], mask=m_p[:, None] & m_t[None, :], other=0.0
            )
            b_B = tl.load(
                Bm + ((i_b * T + o_t[:, None]) * G + i_g) * N + o_n[None, :],
                mask=m_t[:, None] & m_n[None, :],
                other=0.0,
            )
            b_w = tl.exp(b_alast - tl.load(a_cs + i_bh * TP + o_t)) * tl.load(dt_p + i_bh * TP + o_t)  # [BK]
            b_acc += _dot(b_xt, (b_B * b_w[:, None]).to(b_xt.dtype))
        b_s = b_s * tl.exp(b_alast) + b_acc
    tl.store(states + ((i_b * (NC + 1) + NC) * H + i_h) * P * N + o_pn, b_s, mask=m_pn)


@triton.heuristics(
    {
        "HAS_D": lambda args: args["D"] is not None,
        "HAS_Z": lambda args: args["z"] is not None,
        "USE_STATE_OFFSET": lambda args: args["h_off"] is not None,
        "USE_Y_OFFSET": lambda args: args["y_off"] is not None,
    }
)
@triton.jit(do_not_specialize=["T"])
def ssd_chunk_scan_fwd_kernel(
    x,
    Bm,
    Cm,
    dt_p,
    a_cs,
    states,
    D,
    z,
    h_off,
    y_off,
    y,
    y_pre,
    s_hob,
    s_yob,
    T,
    H: tl.constexpr,
    G: tl.constexpr,
    P: tl.constexpr,
    N: tl.constexpr,
    TP: tl.constexpr,
    NC: tl.constexpr,
    CHUNK: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,
    BP: tl.constexpr,
    BN: tl.constexpr,
    D_HAS_HDIM: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    USE_STATE_OFFSET: tl.constexpr,
    USE_Y_OFFSET: tl.constexpr,
):
    i_mp, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    NP = (P + BP - 1) // BP
    i_m, i_p = i_mp // NP, i_mp % NP
    i_b, i_h = i_bh // H, i_bh % H
    i_g = i_h // (H // G)
    o_m = i_c * CHUNK + i_m * BM + tl.arange(0, BM)
    o_p = i_p * BP + tl.arange(0, BP)
    o_n = tl.arange(0, BN)
    m_m, m_p, m_n = o_m < T, o_p < P, o_n < N
    b_am = tl.load(a_cs + i_bh * TP + o_m)  # [BM]
    b_C = tl.load(
        Cm + ((i_b * T + o_m[:, None]) * G + i_g) * N + o_n[None, :], mask=m_m[:, None] & m_n[None, :], other=0.0
    )
    DT = b_C.dtype
    # inter-chunk: e^{a_q} C_q · s_c, plus the undecayed offset C_q · h'
    m_np = m_n[:, None] & m_p[None, :]
    o_np = o_p[None, :] * N + o_n[:, None]
    b_s = tl.load(states + ((i_b * (NC + 1) + i_c) * H + i_h) * P * N + o_np, mask=m_np, other=0.0)  # [BN, BP]
    b_acc = _dot((b_C * tl.exp(b_am)[:, None]).to(DT), b_s.to(DT))
    if USE_STATE_OFFSET:
        b_ho = tl.load(h_off + i_b * s_hob + i_h * P * N + o_np, mask=m_np, other=0.0)
        b_acc += _dot(b_C, b_ho.to(DT))
    # intra-chunk: causal (C Bᵀ ∘ decay) Δ x over the key blocks up to the diagonal
    for k0 in range(0, CHUNK, BK):
        if k0 < (i_m + 1) * BM:
            o_k = i_c * CHUNK + k0 + tl.arange(0, BK)
            m_k = o_k < T
            b_Bt = tl.load(
                Bm + ((i_b * T + o_k[None, :]) * G + i_g) * N + o_n[:, None],
                mask=m_n[:, None] & m_k[None, :],
                other=0.0,
            )
            b_x = tl.load(
                x + ((i_b * T + o_k[:, None]) * H + i_h) * P + o_p[None, :], mask=m_k[:, None] & m_p[None, :], other=0.0
            )
            b_ak = tl.load(a_cs + i_bh * TP + o_k)
            b_dtk = tl.load(dt_p + i_bh * TP + o_k)
            b_cb = _dot(b_C, b_Bt.to(DT))  # [BM, BK]
            b_seg = tl.where(o_m[:, None] >= o_k[None, :], b_am[:, None] - b_ak[None, :], float("-inf"))
            b_cb = b_cb * tl.exp(b_seg) * b_dtk[None, :]
            b_acc += _dot(b_cb.to(b_x.dtype), b_x)
    m_mp = m_m[:, None] & m_p[None, :]
    o_y = ((i_b * T + o_m[:, None]) * H + i_h) * P + o_p[None, :]
    if HAS_D:
        b_xm = tl.load(x + o_y, mask=m_mp, other=0.0).to(tl.float32)
        if D_HAS_HDIM:
            b_D = tl.load(D + i_h * P + o_p, mask=m_p, other=0.0).to(tl.float32)
        else:
            b_D = tl.load(D + i_h + 0 * o_p).to(tl.float32)
        b_acc += b_xm * b_D[None, :]
    if USE_Y_OFFSET:
        b_acc += tl.load(y_off + i_b * s_yob + i_h * P + o_p, mask=m_p, other=0.0).to(tl.float32)[None, :]
    if HAS_Z:
        tl.store(y_pre + o_y, b_acc.to(y_pre.dtype.element_ty), mask=m_mp)
        b_z = tl.load(z + o_y, mask=m_mp, other=0.0).to(tl.float32)
        b_acc = b_acc * b_z * tl.sigmoid(b_z)
    tl.store(y + o_y, b_acc.to(y.dtype.element_ty), mask=m_mp)


@triton.jit
def ssd_gate_bwd_kernel(do, z, y_pre, dy, dz, n_elem, BLOCK: tl.constexpr):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < n_elem
    b_do = tl.load(do + o, mask=m, other=0.0).to(tl.float32)
    b_z = tl.load(z + o, mask=m, other=0.0).to(tl.float32)
    b_y = tl.load(y_pre + o, mask=m, other=0.0).to(tl.float32)
    b_sig = tl.sigmoid(b_z)
    tl.store(dy + o, (b_do * b_z * b_sig).to(dy.dtype.element_ty), mask=m)
    tl.store(dz + o, (b_do * b_y * b_sig * (1.0 + b_z * (1.0 - b_sig))).to(dz.dtype.element_ty), mask=m)


@triton.heuristics(
    {
        "USE_FINAL_STATE_GRAD": lambda args: args["dht"] is not None,
        "USE_STATE_OFFSET": lambda args: args["dh_off"] is not None,
        "HAS_RESETS": lambda args: args["resets"] is not None,
    }
)
@triton.jit(do_not_specialize=["T"])
def ssd_chunk_state_bwd_kernel(
    dy,
    Cm,
    a_cs,
    states,
    resets,
    dht,
    dstates,
    dh0,
    dh_off,
    dlast,
    T,
    H: tl.constexpr,
    G: tl.constexpr,
    P: tl.constexpr,
    N: tl.constexpr,
    TP: tl.constexpr,
    NC: tl.constexpr,
    CHUNK: tl.constexpr,
    BK: tl.constexpr,
    BP: tl.constexpr,
    BN: tl.constexpr,
    USE_FINAL_STATE_GRAD: tl.constexpr,
    USE_STATE_OFFSET: tl.constexpr,
    HAS_RESETS: tl.constexpr,
):
    i_n, i_p, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    NB = ((P + BP - 1) // BP) * ((N + BN - 1) // BN)
    i_b, i_h = i_bh // H, i_bh % H
    i_g = i_h // (H // G)
    o_p = i_p * BP + tl.arange(0, BP)
    o_n = i_n * BN + tl.arange(0, BN)
    m_p, m_n = o_p < P, o_n < N
    m_pn = m_p[:, None] & m_n[None, :]
    o_pn = o_p[:, None] * N + o_n[None, :]
    # b_ds: gradient of the state leaving the current chunk (G_{c+1})
    if USE_FINAL_STATE_GRAD:
        b_ds = tl.load(dht + i_bh * P * N + o_pn, mask=m_pn, other=0.0).to(tl.float32)
    else:
        b_ds = tl.zeros([BP, BN], dtype=tl.float32)
    if USE_STATE_OFFSET:
        b_dho = tl.zeros([BP, BN], dtype=tl.float32)
    if HAS_RESETS:
        b_dh0 = tl.zeros([BP, BN], dtype=tl.float32)
    for i in range(NC):
        i_c = NC - 1 - i
        tl.store(dstates + ((i_b * NC + i_c) * H + i_h) * P * N + o_pn, b_ds, mask=m_pn)
        # ∂L/∂a_last of the chunk = <G_{c+1}, s_{c+1}> (chunk states and state passing together)
        b_send = tl.load(states + ((i_b * (NC + 1) + i_c + 1) * H + i_h) * P * N + o_pn, mask=m_pn, other=0.0)
        tl.store(dlast + (i_bh * NC + i_c) * NB + i_p * ((N + BN - 1) // BN) + i_n, tl.sum(b_ds * b_send))
        b_alast = tl.load(a_cs + i_bh * TP + i_c * CHUNK + CHUNK - 1)
        b_acc = tl.zeros([BP, BN], dtype=tl.float32)
        for k0 in range(0, CHUNK, BK):
            o_t = i_c * CHUNK + k0 + tl.arange(0, BK)
            m_t = o_t < T
            b_dyt = tl.load(
                dy + ((i_b * T + o_t[None, :]) * H + i_h) * P + o_p[:, None],
                mask=m_p[:, None] & m_t[None, :],
                other=0.0,
            )
            b_C = tl.load(
                Cm + ((i_b * T + o_t[:, None]) * G + i_g) * N + o_n[None, :],
                mask=m_t[:, None] & m_n[None, :],
                other=0.0,
            )
            b_a = tl.load(a_cs + i_bh * TP + o_t)
            b_acc += _dot(b_dyt, (b_C * tl.exp(b_a)[:, None]).to(b_dyt.dtype))
            if USE_STATE_OFFSET:
                b_dho += _dot(b_dyt, b_C.to(b_dyt.dtype))
        b_ds = b_acc + tl.exp(b_alast) * b_ds
        if HAS_RESETS:
            # a flagged chunk read h0: its entering gradient goes to dh0, none to the previous chunk's end (that
            # chunk's dstates and dlast are then 0)
            b_r = tl.load(resets + i_b * NC + i_c) != 0
            b_dh0 += tl.where(b_r, b_ds, 0.0)
            b_ds = tl.where(b_r, 0.0, b_ds)
    if HAS_RESETS:
        b_ds += b_dh0
    tl.store(dh0 + i_bh * P * N + o_pn, b_ds, mask=m_pn)
    if USE_STATE_OFFSET:
        tl.store(dh_off + i_bh * P * N + o_pn, b_dho, mask=m_pn)


@triton.heuristics(
    {"HAS_D": lambda args: args["D"] is not None, "NEED_DY_SUM": lambda args: args["dy_sum"] is not None}
)
@triton.jit(do_not_specialize=["T"])
def ssd_chunk_scan_bwd_dx_kernel(
    x,
    Bm,
    Cm,
    dt_p,
    a_cs,
    dy,
    dstates,
    D,
    dx,
    dB,
    ddt,
    da,
    dD,
    dy_sum,
    T,
    H: tl.constexpr,
    G: tl.constexpr,
    P: tl.constexpr,
    N: tl.constexpr,
    TP: tl.constexpr,
    NC: tl.constexpr,
    CHUNK: tl.constexpr,
    HPP: tl.constexpr,
    BK: tl.constexpr,
    BQ: tl.constexpr,
    BP: tl.constexpr,
    BN: tl.constexpr,
    D_HAS_HDIM: tl.constexpr,
    HAS_D: tl.constexpr,
    NEED_DY_SUM: tl.constexpr,
):
    """Key side: one block of positions k, all heads of a head split; gives dx, dB, direct ∂Δ and -∂a_k terms."""
    i_k, i_c, i_bgs = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    NS = H // G // HPP
    NK = CHUNK // BK
    i_b, i_g, i_s = i_bgs // (G * NS), (i_bgs // NS) % G, i_bgs % NS
    o_k = i_c * CHUNK + i_k * BK + tl.arange(0, BK)
    o_p = tl.arange(0, BP)
    o_n = tl.arange(0, BN)
    m_k, m_p, m_n = o_k < T, o_p < P, o_n < N
    m_kp = m_k[:, None] & m_p[None, :]
    b_B = tl.load(
        Bm + ((i_b * T + o_k[:, None]) * G + i_g) * N + o_n[None, :], mask=m_k[:, None] & m_n[None, :], other=0.0
    )
    DT = b_B.dtype
    b_dB = tl.zeros([BK, BN], dtype=tl.float32)
    for j in range(HPP):
        i_h = i_g * (H // G) + i_s * HPP + j
        i_bh = i_b * H + i_h
        o_x = ((i_b * T + o_k[:, None]) * H + i_h) * P + o_p[None, :]
        b_x = tl.load(x + o_x, mask=m_kp, other=0.0)
        b_ak = tl.load(a_cs + i_bh * TP + o_k)
        b_dtk = tl.load(dt_p + i_bh * TP + o_k)
        b_alast = tl.load(a_cs + i_bh * TP + i_c * CHUNK + CHUNK - 1)
        # 1. through the chunk state: s_{c+1} ∋ e^{a_last - a_k} Δ_k x_k B_kᵀ, with upstream G_{c+1}
        b_G = tl.load(
            dstates + ((i_b * NC + i_c) * H + i_h) * P * N + o_p[:, None] * N + o_n[None, :],
            mask=m_p[:, None] & m_n[None, :],
            other=0.0,
        ).to(DT)  # [BP, BN]
        b_w = tl.exp(b_alast - b_ak)  # [BK]
        b_GB = _dot(b_B, tl.trans(b_G))  # [BK, BP]
        b_dx = b_GB * b_w[:, None]
        b_dB += _dot(b_x.to(DT), b_G) * (b_w * b_dtk)[:, None]
        b_t = b_w * tl.sum(b_x.to(tl.float32) * b_GB, axis=1)
        b_ddt = b_t
        b_da = -b_t * b_dtk
        # 2. intra-chunk: queries q >= k
        for q0 in range(0, CHUNK, BQ):
            if q0 + BQ > i_k * BK:
                o_q = i_c * CHUNK + q0 + tl.arange(0, BQ)
                m_q = o_q < T
                b_C = tl.load(
                    Cm + ((i_b * T + o_q[:, None]) * G + i_g) * N + o_n[None, :],
                    mask=m_q[:, None] & m_n[None, :],
                    other=0.0,
                )
                b_dy = tl.load(
                    dy + ((i_b * T + o_q[:, None]) * H + i_h) * P + o_p[None, :],
                    mask=m_q[:, None] & m_p[None, :],
                    other=0.0,
                )
                b_aq = tl.load(a_cs + i_bh * TP + o_q)
                b_seg = tl.where(o_q[None, :] >= o_k[:, None], b_aq[None, :] - b_ak[:, None], float("-inf"))
                b_decay = tl.exp(b_seg)  # [BK, BQ]
                b_S = _dot(b_B, tl.trans(b_C.to(DT))) * b_decay
                b_dx += _dot(b_S.to(b_dy.dtype), b_dy)
                b_gx = _dot(b_x, tl.trans(b_dy.to(b_x.dtype)))  # [BK, BQ]: x_k · dy_q
                b_Sg = tl.sum(b_S * b_gx, axis=1)
                b_ddt += b_Sg
                b_da -= b_Sg * b_dtk
                b_dB += _dot((b_decay * b_gx * b_dtk[:, None]).to(DT), b_C.to(DT))
        b_dx = b_dx * b_dtk[:, None]
        if HAS_D or NEED_DY_SUM:
            b_dyk = tl.load(dy + o_x, mask=m_kp, other=0.0).to(tl.float32)
            o_part = ((i_b * NC + i_c) * NK + i_k) * H * P + i_h * P + o_p
            if HAS_D:
                if D_HAS_HDIM:
                    b_D = tl.load(D + i_h * P + o_p, mask=m_p, other=0.0).to(tl.float32)
                else:
                    b_D = tl.load(D + i_h + 0 * o_p).to(tl.float32)
                b_dx += b_dyk * b_D[None, :]
                tl.store(dD + o_part, tl.sum(b_dyk * b_x.to(tl.float32), axis=0), mask=m_p)
            if NEED_DY_SUM:
                tl.store(dy_sum + o_part, tl.sum(b_dyk, axis=0), mask=m_p)
        tl.store(dx + o_x, b_dx.to(dx.dtype.element_ty), mask=m_kp)
        tl.store(ddt + i_bh * TP + o_k, b_ddt)
        tl.store(da + i_bh * TP + o_k, b_da)
    o_dB = ((i_b * T + o_k[:, None]) * G * NS + i_g * NS + i_s) * N + o_n[None, :]
    tl.store(dB + o_dB, b_dB, mask=m_k[:, None] & m_n[None, :])


@triton.jit(do_not_specialize=["T"])
def ssd_chunk_scan_bwd_dc_kernel(
    x,
    Bm,
    Cm,
    dt_p,
    a_cs,
    dy,
    states,
    dC,
    da,
    T,
    H: tl.constexpr,
    G: tl.constexpr,
    P: tl.constexpr,
    N: tl.constexpr,
    TP: tl.constexpr,
    NC: tl.constexpr,
    CHUNK: tl.constexpr,
    HPP: tl.constexpr,
    BK: tl.constexpr,
    BQ: tl.constexpr,
    BP: tl.constexpr,
    BN: tl.constexpr,
):
    """Query side: one block of positions q, all heads of a head split; gives dC and the +∂a_q terms.

    dC's h' term ĝ·h' is not here: _add_dc_state_offset adds it as one GEMM over all positions.
    """
    i_q, i_c, i_bgs = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    NS = H // G // HPP
    i_b, i_g, i_s = i_bgs // (G * NS), (i_bgs // NS) % G, i_bgs % NS
    o_q = i_c * CHUNK + i_q * BQ + tl.arange(0, BQ)
    o_p = tl.arange(0, BP)
    o_n = tl.arange(0, BN)
    m_q, m_p, m_n = o_q < T, o_p < P, o_n < N
    m_pn = m_p[:, None] & m_n[None, :]
    o_pn = o_p[:, None] * N + o_n[None, :]
    b_C = tl.load(
        Cm + ((i_b * T + o_q[:, None]) * G + i_g) * N + o_n[None, :], mask=m_q[:, None] & m_n[None, :], other=0.0
    )
    DT = b_C.dtype
    b_dC = tl.zeros([BQ, BN], dtype=tl.float32)
    for j in range(HPP):
        i_h = i_g * (H // G) + i_s * HPP + j
        i_bh = i_b * H + i_h
        b_dy = tl.load(
            dy + ((i_b * T + o_q[:, None]) * H + i_h) * P + o_p[None, :], mask=m_q[:, None] & m_p[None, :], other=0.0
        )
        b_aq = tl.load(a_cs + i_bh * TP + o_q)
        # 1. inter-chunk term e^{a_q} s_c C_q
        b_s = tl.load(states + ((i_b * (NC + 1) + i_c) * H + i_h) * P * N + o_pn, mask=m_pn, other=0.0)
        b_gs = _dot(b_dy.to(DT), b_s.to(DT))  # [BQ, BN]
        b_eq = tl.exp(b_aq)
        b_dC += b_gs * b_eq[:, None]
        b_da = b_eq * tl.sum(b_gs * b_C.to(tl.float32), axis=1)
        # 2. intra-chunk: keys k <= q
        for k0 in range(0, CHUNK, BK):
            if k0 < (i_q + 1) * BQ:
                o_k = i_c * CHUNK + k0 + tl.arange(0, BK)
                m_k = o_k < T
                b_B = tl.load(
                    Bm + ((i_b * T + o_k[:, None]) * G + i_g) * N + o_n[None, :],
                    mask=m_k[:, None] & m_n[None, :],
                    other=0.0,
                )
                b_x = tl.load(
                    x + ((i_b * T + o_k[:, None]) * H + i_h) * P + o_p[None, :],
                    mask=m_k[:, None] & m_p[None, :],
                    other=0.0,
                )
                b_ak = tl.load(a_cs + i_bh * TP + o_k)
                b_dtk = tl.load(dt_p + i_bh * TP + o_k)
                b_seg = tl.where(o_q[:, None] >= o_k[None, :], b_aq[:, None] - b_ak[None, :], float("-inf"))
                b_gx = _dot(b_dy.to(b_x.dtype), tl.trans(b_x))  # [BQ, BK]
                b_W = tl.exp(b_seg) * b_gx * b_dtk[None, :]
                b_dC += _dot(b_W.to(DT), b_B.to(DT))
                b_cb = _dot(b_C, tl.trans(b_B.to(DT)))
                b_da += tl.sum(b_cb * b_W, axis=1)
        tl.store(da + i_bh * TP + o_q, b_da)
    o_dC = ((i_b * T + o_q[:, None]) * G * NS + i_g * NS + i_s) * N + o_n[None, :]
    tl.store(dC + o_dC, b_dC, mask=m_q[:, None] & m_n[None, :])


@triton.heuristics({"HAS_BIAS": lambda args: args["dt_bias"] is not None})
@triton.jit(do_not_specialize=["T"])
def ssd_chunk_cumsum_bwd_kernel(
    dt,
    dt_bias,
    dt_p,
    ddt_direct,
    da_k,
    da_q,
    dlast,
    A,
    ddt,
    dA_part,
    ddt_bias_part,
    T,
    H: tl.constexpr,
    TP: tl.constexpr,
    NC: tl.constexpr,
    NB: tl.constexpr,
    BNB: tl.constexpr,
    CHUNK: tl.constexpr,
    BH: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    i_c, i_b, i_hb = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    o_t = i_c * CHUNK + tl.arange(0, CHUNK)
    o_h = i_hb * BH + tl.arange(0, BH)
    m_t, m_h = o_t < T, o_h < H
    m = m_t[:, None] & m_h[None, :]
    o_p = (i_b * H + o_h[None, :]) * TP + o_t[:, None]
    b_da = tl.load(da_k + o_p, mask=m_h[None, :], other=0.0) + tl.load(da_q + o_p, mask=m_h[None, :], other=0.0)
    o_nb = tl.arange(0, BNB)
    o_l = ((i_b * H + o_h[:, None]) * NC + i_c) * NB + o_nb[None, :]
    b_dlast = tl.sum(tl.load(dlast + o_l, mask=m_h[:, None] & (o_nb < NB)[None, :], other=0.0), axis=1)  # [BH]
    # ∂L/∂(Δ_k A) = Σ_{q >= k} ∂L/∂a_q (reverse cumsum); a_last's gradient reaches every step of the chunk
    b_r = tl.sum(b_da, axis=0)[None, :] - tl.cumsum(b_da, axis=0) + b_da + b_dlast[None, :]
    b_A = tl.load(A + o_h, mask=m_h, other=0.0).to(tl.float32)
    b_dtp = tl.load(dt_p + o_p, mask=m_h[None, :], other=0.0)
    b_ddt = tl.load(ddt_direct + o_p, mask=m_h[None, :], other=0.0) + b_A[None, :] * b_r
    tl.store(dA_part + (i_b * NC + i_c) * H + o_h, tl.sum(b_dtp * b_r, axis=0), mask=m_h)
    if SOFTPLUS:
        b_raw = tl.load(dt + (i_b * T + o_t[:, None]) * H + o_h[None, :], mask=m, other=0.0).to(tl.float32)
        if HAS_BIAS:
            b_raw += tl.load(dt_bias + o_h, mask=m_h, other=0.0).to(tl.float32)[None, :]
        b_ddt = tl.where(b_raw <= 20.0, b_ddt * tl.sigmoid(b_raw), b_ddt)
    b_ddt = tl.where(m, b_ddt, 0.0)
    tl.store(ddt + (i_b * T + o_t[:, None]) * H + o_h[None, :], b_ddt.to(ddt.dtype.element_ty), mask=m)
    if HAS_BIAS:
        tl.store(ddt_bias_part + (i_b * NC + i_c) * H + o_h, tl.sum(b_ddt, axis=0), mask=m_h)


@triton.heuristics(
    {
        "HAS_D": lambda args: args["D"] is not None,
        "HAS_Z": lambda args: args["z"] is not None,
        "HAS_BIAS": lambda args: args["dt_bias"] is not None,
        "USE_STATE_OFFSET": lambda args: args["h_off"] is not None,
        "USE_Y_OFFSET": lambda args: args["y_off"] is not None,
        "HAS_OFF_IDX": lambda args: args["off_idx"] is not None,
    }
)
@triton.jit
def ssd_state_update_fwd_kernel(
    state,
    x,
    dt,
    A,
    Bm,
    Cm,
    D,
    z,
    dt_bias,
    h_off,
    y_off,
    off_idx,
    y,
    s_xb,
    s_xh,
    s_dtb,
    s_dth,
    s_Bb,
    s_Bg,
    s_Cb,
    s_Cg,
    s_zb,
    s_zh,
    s_hob,
    s_yob,
    H: tl.constexpr,
    G: tl.constexpr,
    P: tl.constexpr,
    N: tl.constexpr,
    BP: tl.constexpr,
    BN: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    D_HAS_HDIM: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    USE_STATE_OFFSET: tl.constexpr,
    USE_Y_OFFSET: tl.constexpr,
    HAS_OFF_IDX: tl.constexpr,
    A_IS_LOG: tl.constexpr,
):
    i_p, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    # the row of the per-row offsets: the batch row, or its entry in the offset table (rows sharing an adapter read
    # the same entry, from cache)
    i_o = i_b
    if HAS_OFF_IDX:
        i_o = tl.load(off_idx + i_b).to(tl.int64)
    i_g = i_h // (H // G)
    o_p = i_p * BP + tl.arange(0, BP)
    o_n = tl.arange(0, BN)
    m_p, m_n = o_p < P, o_n < N
    m_pn = m_p[:, None] & m_n[None, :]
    o_pn = o_p[:, None] * N + o_n[None, :]
    b_dt = tl.load(dt + i_b * s_dtb + i_h * s_dth + 0 * o_p).to(tl.float32)  # [BP], one value
    if HAS_BIAS:
        b_dt += tl.load(dt_bias + i_h + 0 * o_p).to(tl.float32)
    if SOFTPLUS:
        b_dt = tl.where(b_dt <= 20.0, tl.log(1.0 + tl.exp(b_dt)), b_dt)
    b_A = tl.load(A + i_h + 0 * o_p).to(tl.float32)
    if A_IS_LOG:
        b_A = -tl.exp(b_A)
    b_dA = tl.exp(b_dt * b_A)
    b_x = tl.load(x + i_b * s_xb + i_h * s_xh + o_p, mask=m_p, other=0.0).to(tl.float32)
    b_B = tl.load(Bm + i_b * s_Bb + i_g * s_Bg + o_n, mask=m_n, other=0.0).to(tl.float32)
    b_C = tl.load(Cm + i_b * s_Cb + i_g * s_Cg + o_n, mask=m_n, other=0.0).to(tl.float32)
    p_s = state + i_bh * P * N + o_pn
    b_s = tl.load(p_s, mask=m_pn, other=0.0).to(tl.float32)
    b_s = b_s * b_dA[:, None] + (b_dt * b_x)[:, None] * b_B[None, :]
    tl.store(p_s, b_s.to(state.dtype.element_ty), mask=m_pn)
    if USE_STATE_OFFSET:
        b_s += tl.load(h_off + i_o * s_hob + i_h * P * N + o_pn, mask=m_pn, other=0.0).to(tl.float32)
    b_y = tl.sum(b_s * b_C[None, :], axis=1)
    if HAS_D:
        if D_HAS_HDIM:
            b_D = tl.load(D + i_h * P + o_p, mask=m_p, other=0.0).to(tl.float32)
        else:
            b_D = tl.load(D + i_h + 0 * o_p).to(tl.float32)
        b_y += b_D * b_x
    if USE_Y_OFFSET:
        b_y += tl.load(y_off + i_o * s_yob + i_h * P + o_p, mask=m_p, other=0.0).to(tl.float32)
    if HAS_Z:
        b_z = tl.load(z + i_b * s_zb + i_h * s_zh + o_p, mask=m_p, other=0.0).to(tl.float32)
        b_y = b_y * b_z * tl.sigmoid(b_z)
    tl.store(y + i_bh * P + o_p, b_y.to(y.dtype.element_ty), mask=m_p)


def _contig(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


def _batch_stride(t: torch.Tensor | None, ndim: int) -> int:
    """0 for a tensor shared over the batch (one dim short), else the batch stride of a contiguous tensor."""
    if t is None or t.dim() == ndim - 1:
        return 0
    return t[0].numel()


def _blocks(chunk_size: int, P: int, N: int) -> dict[str, int]:
    return {
        "BK": min(64, chunk_size),
        "BPF": _pow2(P),
        "BNF": _pow2(N),
        "BP": min(64, _pow2(P)),
        "BN": min(64, _pow2(N)),
    }


def _h_off_for_dots(h_off: torch.Tensor | None, C: torch.Tensor) -> torch.Tensor | None:
    # the kernels round h' to C's dtype before their dots anyway: cast once here, so each tile loads half the bytes
    return None if h_off is None else h_off.to(C.dtype)


def _chunk_resets(resets: torch.Tensor | None, seqlen: int, chunk_size: int) -> torch.Tensor | None:
    """resets [B, ceil(L / RESET_ALIGN)] -> int8 [B, NC], 1 where a chunk starts at a flagged position (chunk_size
    divides RESET_ALIGN, so every flag falls on a chunk start)."""
    if resets is None:
        return None
    flags = torch.zeros(resets.shape[0], triton.cdiv(seqlen, chunk_size), dtype=torch.int8, device=resets.device)
    flags[:, :: RESET_ALIGN // chunk_size] = resets
    return flags


def _chunk_states(x, B, dt_p, a_cs, h0, chunk_size, resets=None):
    """The states entering each chunk, [B, NC + 1, H, P, N] fp32 (states[:, NC] is the final state); ``resets``: the
    chunk flags of ``_chunk_resets``."""
    batch, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    NC = triton.cdiv(T, chunk_size)
    blk = _blocks(chunk_size, P, N)
    states = torch.empty(batch, NC + 1, H, P, N, device=x.device, dtype=torch.float32)
    BP, BN = blk["BP"], blk["BN"]
    ssd_chunk_state_fwd_kernel[(triton.cdiv(N, BN), triton.cdiv(P, BP), batch * H)](
        x, B, dt_p, a_cs, h0, resets, states, _batch_stride(h0, 4), T,
        H=H, G=G, P=P, N=N, TP=NC * chunk_size, NC=NC, CHUNK=chunk_size, BK=blk["BK"], BP=BP, BN=BN,
    )  # fmt: skip
    return states


def _ssd_fwd(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, h0, h_off, y_off, resets=None):
    batch, T, H, P = x.shape
    h_off = _h_off_for_dots(h_off, C)
    G, N = B.shape[2], B.shape[3]
    NC = triton.cdiv(T, chunk_size)
    TP = NC * chunk_size
    blk = _blocks(chunk_size, P, N)
    dt_p = torch.empty(batch, H, TP, device=x.device, dtype=torch.float32)
    a_cs = torch.empty_like(dt_p)
    BH = min(16, _pow2(H))
    ssd_chunk_cumsum_fwd_kernel[(NC, batch, triton.cdiv(H, BH))](
        dt, A, dt_bias, dt_p, a_cs, T, H=H, TP=TP, CHUNK=chunk_size, BH=BH, SOFTPLUS=dt_softplus
    )
    states = _chunk_states(x, B, dt_p, a_cs, h0, chunk_size, resets)
    y = torch.empty_like(x)
    y_pre = torch.empty_like(x) if z is not None else None
    BM, BPs = blk["BK"], min(64, blk["BPF"])
    ssd_chunk_scan_fwd_kernel[(triton.cdiv(chunk_size, BM) * triton.cdiv(P, BPs), NC, batch * H)](
        x, B, C, dt_p, a_cs, states, D, z, h_off, y_off, y, y_pre,
        _batch_stride(h_off, 4), _batch_stride(y_off, 3), T,
        H=H, G=G, P=P, N=N, TP=TP, NC=NC, CHUNK=chunk_size, BM=BM, BK=blk["BK"], BP=BPs, BN=blk["BNF"],
        D_HAS_HDIM=D is not None and D.dim() == 2, num_warps=FWD_NUM_WARPS,
    )  # fmt: skip
    return y, y_pre, dt_p, a_cs, states


def _add_dc_state_offset(dC: torch.Tensor, dy: torch.Tensor, h_off: torch.Tensor) -> None:
    """dC[b, t, g] += Σ_{h in group g} ĝ[b, t, h] · h'[(b,) h], as GEMMs over the (head, p) axis, in place.

    h' never decays, so this product needs no per-position factor: a GEMM over all rows reads ĝ once at the memory
    roofline, where the same dot inside the dC kernel ran at that kernel's lower efficiency (docs/kernels.md).
    """
    batch, T, H, P = dy.shape
    G, N = dC.shape[2], dC.shape[3]
    K = H // G * P
    h_off = h_off.to(dy.dtype)
    if h_off.dim() == 3:
        g = dy.reshape(batch * T, G, K).transpose(0, 1)  # [G, B*T, K], a strided view (no copy)
        dC += torch.bmm(g, h_off.reshape(G, K, N)).transpose(0, 1).reshape(batch, T, G, N)
        return
    for i in range(batch):  # per-row h' [B, H, P, N]: one matmul over (B, G) would copy ĝ
        dC[i] += torch.bmm(dy[i].reshape(T, G, K).transpose(0, 1), h_off[i].reshape(G, K, N)).transpose(0, 1)


def _ssd_bwd(do, dht, x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, h0, h_off, y_off, y_pre, dt_p, a_cs,
             states, resets=None):  # fmt: skip
    batch, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    NC = triton.cdiv(T, chunk_size)
    TP = NC * chunk_size
    blk = _blocks(chunk_size, P, N)
    dz = None
    if z is not None:
        dy = torch.empty_like(x)
        dz = torch.empty_like(z)
        BLOCK = 1024
        ssd_gate_bwd_kernel[(triton.cdiv(do.numel(), BLOCK),)](do, z, y_pre, dy, dz, do.numel(), BLOCK=BLOCK)
    else:
        dy = do
    # 1. reverse state passing: dstates[:, c] = ∂L/∂s_{c+1}; dh0 per batch row. dh' = Σ_t ĝ_tᵀ C_t accumulates in the
    # same loop (a second dot on the ĝ and C tiles it loads anyway; measured faster than a separate GEMM kernel).
    BP, BN = blk["BP"], blk["BN"]
    NB = triton.cdiv(P, BP) * triton.cdiv(N, BN)
    dstates = torch.empty(batch, NC, H, P, N, device=x.device, dtype=torch.float32)
    dh0 = torch.empty(batch, H, P, N, device=x.device, dtype=torch.float32)
    dh_off = torch.empty_like(dh0) if h_off is not None else None
    dlast = torch.empty(batch, H, NC, NB, device=x.device, dtype=torch.float32)
    ssd_chunk_state_bwd_kernel[(triton.cdiv(N, BN), triton.cdiv(P, BP), batch * H)](
        dy, C, a_cs, states, resets, dht, dstates, dh0, dh_off, dlast, T,
        H=H, G=G, P=P, N=N, TP=TP, NC=NC, CHUNK=chunk_size, BK=blk["BK"], BP=BP, BN=BN,
    )  # fmt: skip
    # 2. key side (dx, dB) and query side (dC); programs loop over HPP heads of one group
    HPP = _heads_per_program(H, G)
    NS = H // G // HPP
    BK = blk["BK"]
    NK = chunk_size // BK
    dx = torch.empty_like(x)
    dB = torch.empty(batch, T, G, NS, N, device=x.device, dtype=torch.float32)
    dC = torch.empty_like(dB)
    ddt_direct = torch.empty(batch, H, TP, device=x.device, dtype=torch.float32)
    da_k = torch.empty_like(ddt_direct)
    da_q = torch.empty_like(ddt_direct)
    dD_part = torch.empty(batch, NC, NK, H, P, device=x.device, dtype=torch.float32) if D is not None else None
    dy_sum = torch.empty(batch, NC, NK, H, P, device=x.device, dtype=torch.float32) if y_off is not None else None
    grid = (NK, NC, batch * G * NS)
    common = {
        "H": H,
        "G": G,
        "P": P,
        "N": N,
        "TP": TP,
        "NC": NC,
        "CHUNK": chunk_size,
        "HPP": HPP,
        "BK": BK,
        "BQ": BK,
        "BP": blk["BPF"],
        "BN": blk["BNF"],
    }
    stages = _bwd_stages(x, B, C)
    ssd_chunk_scan_bwd_dx_kernel[grid](
        x, B, C, dt_p, a_cs, dy, dstates, D, dx, dB, ddt_direct, da_k, dD_part, dy_sum, T,
        D_HAS_HDIM=D is not None and D.dim() == 2, num_warps=BWD_NUM_WARPS, num_stages=stages, **common,
    )  # fmt: skip
    ssd_chunk_scan_bwd_dc_kernel[grid](
        x, B, C, dt_p, a_cs, dy, states, dC, da_q, T, num_warps=BWD_NUM_WARPS, num_stages=stages, **common
    )  # fmt: skip
    # 3. ∂a → ∂Δ, ∂A through the chunk cumsum, then through softplus and dt_bias
    ddt = torch.empty_like(dt)
    dA_part = torch.empty(batch, NC, H, device=x.device, dtype=torch.float32)
    ddt_bias_part = torch.empty_like(dA_part) if dt_bias is not None else None
    BH = min(16, _pow2(H))
    ssd_chunk_cumsum_bwd_kernel[(NC, batch, triton.cdiv(H, BH))](
        dt, dt_bias, dt_p, ddt_direct, da_k, da_q, dlast, A, ddt, dA_part, ddt_bias_part, T,
        H=H, TP=TP, NC=NC, NB=NB, BNB=triton.next_power_of_2(NB), CHUNK=chunk_size, BH=BH, SOFTPLUS=dt_softplus,
    )  # fmt: skip
    dA = dA_part.sum((0, 1)).to(A.dtype)
    dB = dB.sum(3).to(B.dtype)
    dC = dC.sum(3)
    if h_off is not None:
        _add_dc_state_offset(dC, dy, h_off)
    dC = dC.to(C.dtype)
    ddt_bias = ddt_bias_part.sum((0, 1)).to(dt_bias.dtype) if dt_bias is not None else None
    dD = None
    if D is not None:
        dD = dD_part.sum((0, 1, 2))  # [H, P]
        dD = (dD if D.dim() == 2 else dD.sum(-1)).to(D.dtype)
    dh0_out = None
    if h0 is not None:
        dh0_out = (dh0 if h0.dim() == 4 else dh0.sum(0)).to(h0.dtype)
    dh_off_out = None
    if h_off is not None:
        dh_off_out = (dh_off if h_off.dim() == 4 else dh_off.sum(0)).to(h_off.dtype)
    dy_off = None
    if y_off is not None:
        dy_off = dy_sum.sum((1, 2))  # [B, H, P]
        dy_off = (dy_off if y_off.dim() == 3 else dy_off.sum(0)).to(y_off.dtype)
    return dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dh0_out, dh_off_out, dy_off


class SSDScanFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, dt_bias, h0, h_off, y_off, chunk_size, dt_softplus, resets=None):
        x, dt, A, B, C, D, z, dt_bias, h0, h_off, y_off = map(
            _contig, (x, dt, A, B, C, D, z, dt_bias, h0, h_off, y_off)
        )
        resets = _chunk_resets(resets, x.shape[1], chunk_size)
        y, y_pre, dt_p, a_cs, states = _ssd_fwd(
            x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, h0, h_off, y_off, resets
        )
        ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, h0, h_off, y_off, y_pre, dt_p, a_cs, states, resets)
        ctx.chunk_size, ctx.dt_softplus = chunk_size, dt_softplus
        ctx.set_materialize_grads(False)
        final = states[:, -1].clone()  # [B, H, P, N]
        return y, final

    @staticmethod
    def backward(ctx, do, dht):
        x, dt, A, B, C, D, z, dt_bias, h0, h_off, y_off, y_pre, dt_p, a_cs, states, resets = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(x)
        grads = _ssd_bwd(
            do.contiguous(), None if dht is None else dht.contiguous(), x, dt, A, B, C, ctx.chunk_size,
            D, z, dt_bias, ctx.dt_softplus, h0, h_off, y_off, y_pre, dt_p, a_cs, states, resets,
        )  # fmt: skip
        return (*grads, None, None, None)


def _chunk_size(
    op: str,
    chunk_size: int | None,
    batch: int,
    seqlen: int,
    device: torch.device,
    headdim: int,
    resets: torch.Tensor | None = None,
) -> int:
    """The scan's chunk size (None: 256, or 64 for short sequences or with resets), checked with the sequence, the
    head dim and the resets (then checked too)."""
    if resets is not None:
        check_resets(op, resets, batch, seqlen)
        chunk_size = reset_chunk_size(op, chunk_size)
    if chunk_size is None:
        chunk_size = 256 if seqlen > 512 else 64
    if chunk_size < _MIN_BLOCK or chunk_size & (chunk_size - 1):
        raise ValueError(f"{op}: chunk_size must be a power of two >= {_MIN_BLOCK}, got {chunk_size}")
    if seqlen == 0:
        raise ValueError(f"{op}: sequence length must be positive, got 0")
    if device.type == "cuda" and headdim < SSD_MIN_HEADDIM_CUDA:
        raise ValueError(
            f"{op}: headdim {headdim} < {SSD_MIN_HEADDIM_CUDA} is not supported on CUDA (the backward's kernels were "
            "never run below it on the GPU); use backend='torch'"
        )
    return chunk_size


def _conv_split(xbc, w, bias, conv0, mask, d: int, groups: int):
    """silu(conv(xbc)) masked at padded positions, split into contiguous x [B, L, H*P] and B_t, C_t [B, L, G, N]
    (what ``SSDScanFunction`` makes of the mixer's conv output)."""
    from ssmtune.ops.conv_fused import conv_fwd

    out = conv_fwd(xbc, w, bias, conv0, True, True).transpose(1, 2)  # [B, L, D+2GN], contiguous
    if mask is not None:
        out = (out * mask[:, :, None]).to(out.dtype)
    batch, seqlen, _ = out.shape
    n = (out.shape[2] - d) // 2
    x, B, C = torch.split(out, [d, n, n], dim=-1)
    return x.contiguous(), *(t.reshape(batch, seqlen, groups, -1).contiguous() for t in (B, C))


class ConvSSDScanFunction(torch.autograd.Function):
    """The mixer's causal conv + SiLU and the SSD scan, keeping the conv's input rather than its output for the
    backward: x, B_t, C_t ((D+2GN) values per token) are recomputed by the conv's forward kernel there, and the chunk
    states from them, bit for bit, as mamba_ssm's combined op does. The conv input is a view of the in_proj output
    that the gated norm keeps anyway."""

    # False keeps the fp32 chunk states instead (the A/B switch of a timing: one chunk-state kernel less per backward)
    recompute_states = True

    @staticmethod
    def forward(ctx, xbc, weight, bias, conv0, mask, dt, A, D, dt_bias, h0, h_off, y_off, chunk_size, dt_softplus,
                headdim, groups, resets=None):  # fmt: skip
        w, conv0, dt, A, D, dt_bias, h0, h_off, y_off = map(
            _contig, (weight, conv0, dt, A, D, dt_bias, h0, h_off, y_off)
        )
        batch, _, seqlen = xbc.shape
        d = dt.shape[2] * headdim
        x, B, C = _conv_split(xbc, w, bias, conv0, mask, d, groups)
        x = x.view(batch, seqlen, -1, headdim)
        resets = _chunk_resets(resets, seqlen, chunk_size)
        y, _, dt_p, a_cs, states = _ssd_fwd(
            x, dt, A, B, C, chunk_size, D, None, dt_bias, dt_softplus, h0, h_off, y_off, resets
        )
        # the chunk states (fp32, H·P·N per chunk: more than the conv input at chunk sizes up to 256) are recomputed
        # too, by their own forward kernel; the chunk scan is not
        kept = None if ConvSSDScanFunction.recompute_states else states
        ctx.save_for_backward(xbc, w, bias, conv0, mask, dt, A, D, dt_bias, h0, h_off, y_off, dt_p, a_cs, kept, resets)
        ctx.chunk_size, ctx.dt_softplus, ctx.headdim, ctx.groups = chunk_size, dt_softplus, headdim, groups
        ctx.weight_dtype = weight.dtype
        return y  # no final state: a training forward (the mixers' only caller) has no cache to fill

    @staticmethod
    def backward(ctx, do):
        from ssmtune.ops.conv_fused import conv_bwd

        xbc, w, bias, conv0, mask, dt, A, D, dt_bias, h0, h_off, y_off, dt_p, a_cs, states, resets = ctx.saved_tensors
        batch, _, seqlen = xbc.shape
        d = dt.shape[2] * ctx.headdim
        x, B, C = _conv_split(xbc, w, bias, conv0, mask, d, ctx.groups)
        x = x.view(batch, seqlen, -1, ctx.headdim)
        if states is None:
            states = _chunk_states(x, B, dt_p, a_cs, h0, ctx.chunk_size, resets)
        dx, ddt, dA, dB, dC, dD, _, ddt_bias, dh0, dh_off, dy_off = _ssd_bwd(
            do.contiguous(), None, x, dt, A, B, C, ctx.chunk_size, D, None,
            dt_bias, ctx.dt_softplus, h0, h_off, y_off, None, dt_p, a_cs, states, resets,
        )  # fmt: skip
        needs = tuple(ctx.needs_input_grad[:4])
        dxbc = dw = dbias = dconv0 = None
        if any(needs):
            # the gradient autograd hands the conv on the unfused path: split's backward concatenates, the mask
            # multiplies
            dout = torch.cat([dx.view(batch, seqlen, d), dB.flatten(2), dC.flatten(2)], dim=-1)
            if mask is not None:
                dout = (dout * mask[:, :, None]).to(dout.dtype)
            dxbc, dw, dbias, dconv0 = conv_bwd(dout.transpose(1, 2), xbc, w, bias, conv0, True, ctx.weight_dtype, needs)
        return dxbc, dw, dbias, dconv0, None, ddt, dA, dD, ddt_bias, dh0, dh_off, dy_off, None, None, None, None, None


@torch.compiler.disable
def conv_ssd_scan_triton(
    xbc: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    dt: torch.Tensor,
    A: torch.Tensor,
    *,
    headdim: int,
    ngroups: int,
    conv_initial_state: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    state_offset: torch.Tensor | None = None,
    y_offset: torch.Tensor | None = None,
    resets: torch.Tensor | None = None,
) -> torch.Tensor:
    """``ssd_scan_triton`` of x, B_t, C_t split from ``causal_conv1d_triton(xbc, weight, bias, activation="silu")``
    (zeroed where ``mask`` [B, L] is 0), with the conv recomputed in the backward instead of its output kept.

    xbc [B, D+2GN, L] (any strides; the mixers pass the time-major view of in_proj's output), weight [D+2GN, K],
    dt [B, L, H], D = H · headdim; the rest (``resets`` too) as ``ssd_scan_triton``. Returns y [B, L, H, headdim],
    with the values and gradients of the unfused ops.
    """
    chunk_size = _chunk_size("conv_ssd_scan_triton", chunk_size, *xbc.shape[::2], xbc.device, headdim, resets)
    if mask is not None:
        mask = mask[:, -xbc.shape[2] :]
    return ConvSSDScanFunction.apply(
        xbc, weight, bias, conv_initial_state, mask, dt, A, D, dt_bias, initial_state, state_offset, y_offset,
        chunk_size, dt_softplus, headdim, ngroups, resets,
    )  # fmt: skip


@torch.compiler.disable
def ssd_scan_triton(
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
    """Chunked SSD scan (Triton), differentiable in every tensor input. Semantics of ``ssd_scan_ref``.

    Args:
        x (torch.Tensor): shape [B, L, H, P]
        dt (torch.Tensor): shape [B, L, H]
        A (torch.Tensor): shape [H]
        B (torch.Tensor): shape [B, L, G, N]; head i reads group i // (H / G)
        C (torch.Tensor): shape [B, L, G, N]
        chunk_size (int | None): power of two >= 16; None picks 256 (64 for short sequences and with ``resets``)
        D (torch.Tensor | None): shape [H] or [H, P]
        z (torch.Tensor | None): shape [B, L, H, P], gate y · silu(z)
        dt_bias (torch.Tensor | None): shape [H]
        initial_state (torch.Tensor | None): h0, shape [H, P, N] or [B, H, P, N]
        state_offset (torch.Tensor | None): h', shape [H, P, N] or [B, H, P, N]
        y_offset (torch.Tensor | None): y', shape [H, P] or [B, H, P]
        resets (torch.Tensor | None): bool [B, ceil(L / RESET_ALIGN)], packed rows (``varlen.py``); chunk_size must
            then divide RESET_ALIGN, so that each reset restarts the state between two chunks
    Returns:
        y [B, L, H, P] in x's dtype, and h_L [B, H, P, N] in fp32 when ``return_final_state``.
    """
    if x.device.type != "cuda" and x.device.type != "cpu":
        raise ValueError(f"ssd_scan_triton: unsupported device {x.device}")
    chunk_size = _chunk_size("ssd_scan_triton", chunk_size, *x.shape[:2], x.device, x.shape[-1], resets)
    y, final = SSDScanFunction.apply(
        x, dt, A, B, C, D, z, dt_bias, initial_state, state_offset, y_offset, chunk_size, dt_softplus, resets
    )
    return (y, final) if return_final_state else y


@torch.compiler.disable
def ssd_state_update_triton(
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
    tile: tuple[int, int] | None = None,
) -> torch.Tensor:
    """One decode step (Triton). ``state`` [B, H, P, N] is updated in place (un-offset); returns y [B, H, P].

    x, z [B, H, P]; dt [B, H]; A [H]; B, C [B, G, N]; D [H] or [H, P]; dt_bias [H];
    state_offset [H, P, N] or [B, H, P, N]; y_offset [H, P] or [B, H, P]; ``offset_index`` (int32 [B]): per-row
    offsets are tables [n, ...] and row b reads entry ``offset_index[b]``; ``A_is_log``: A holds A_log, the kernel uses
    A = -exp(A_log); ``tile``: (rows of P per program, warps), default ``launch.decode_tile``. Not
    differentiable.
    """
    if not state.is_contiguous():
        raise ValueError(
            f"ssd_state_update_triton: state must be contiguous (updated in place), got strides {state.stride()}"
        )
    batch, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    # the per-row inputs are read through their strides: in a decode step x, B_t, C_t are column slices of the conv
    # output and dt one of in_proj's, which a copy per step would cost a kernel each
    x, dt, B, C, z = (layout.unit_last(t) for t in (x, dt, B, C, z))
    A, D, dt_bias, h_off, y_off, off_idx = map(_contig, (A, D, dt_bias, state_offset, y_offset, offset_index))
    y = torch.empty(batch, H, P, dtype=x.dtype, device=x.device)
    BP, warps = launch.decode_tile(P, N, x.device) if tile is None else tile
    zs = (0, 0) if z is None else z.stride()[:2]
    ssd_state_update_fwd_kernel[(triton.cdiv(P, BP), batch * H)](
        state, x, dt, A, B, C, D, z, dt_bias, h_off, y_off, off_idx, y, *x.stride()[:2], *dt.stride(), *B.stride()[:2],
        *C.stride()[:2], *zs, _batch_stride(h_off, 4), _batch_stride(y_off, 3),
        H=H, G=G, P=P, N=N, BP=BP, BN=_pow2(N), SOFTPLUS=dt_softplus, D_HAS_HDIM=D is not None and D.dim() == 2,
        A_IS_LOG=A_is_log, num_warps=warps,
    )  # fmt: skip
    return y


__all__ = ["conv_ssd_scan_triton", "ssd_scan_triton", "ssd_state_update_triton"]
