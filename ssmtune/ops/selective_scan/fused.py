"""Mamba-1 (S6) selective scan in Triton: fused forward and backward with initial state and state offsets.

Semantics are those of ``selective_scan_ref`` / ``selective_state_update_ref`` in ``naive.py`` (METHODS.md §2, §4.1-4.3,
§5.1); design notes and measurements are in ``docs/kernels-mamba1.md``.

One program owns one batch row and a block of channels. It keeps the state h [BLOCK_D, N] in fp32 registers and walks
the sequence in tiles of BLOCK_L steps; inside a tile the recurrence h_t = Ā_t h_{t-1} + B̄_t u_t is evaluated with
``tl.associative_scan`` over the time axis of a [BLOCK_D, N, BLOCK_L] tile. The forward stores the state at the start
of every tile (when gradients are needed); the backward walks the tiles in reverse, recomputes h inside a tile from
that checkpoint and runs the adjoint recurrence λ_t = Ā_{t+1} λ_{t+1} + ĝ_t C_t as a reverse scan.

Time loops are ``while`` loops with a runtime bound: one compiled kernel serves every sequence length, and the CPU
interpreter (``TRITON_INTERPRET=1``) accepts them, which it does not for ``range`` over a runtime bound (triton 3.6).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)

# Optional override of the launch configuration, e.g. {"BLOCK_L": 32, "BLOCK_D_FWD": 8}; used by the benchmark.
CONFIG_OVERRIDE: dict[str, int] = {}


@triton.jit
def _scan_combine(a_l, b_l, a_r, b_r):
    # (a_l, b_l) is the earlier step: h = a_r * (a_l * h0 + b_l) + b_r
    return a_l * a_r, b_r + a_r * b_l


@triton.jit
def _softplus(x):
    # torch.nn.functional.softplus with threshold 20
    return tl.where(x <= 20.0, tl.log(1.0 + tl.exp(x)), x)


@triton.heuristics(
    {
        "HAS_D": lambda args: args["D"] is not None,
        "HAS_Z": lambda args: args["z"] is not None,
        "HAS_DELTA_BIAS": lambda args: args["delta_bias"] is not None,
        "USE_INITIAL_STATE": lambda args: args["h0"] is not None,
        "USE_STATE_OFFSET": lambda args: args["h_off"] is not None,
        "USE_Y_OFFSET": lambda args: args["y_off"] is not None,
        "STORE_FINAL_STATE": lambda args: args["ht"] is not None,
        "STORE_CHECKPOINTS": lambda args: args["h_ckpt"] is not None,
    }
)
@triton.jit(do_not_specialize=["L", "NT"])
def selective_scan_fwd_kernel(
    u,
    delta,
    A,
    B,
    C,
    D,
    z,
    delta_bias,
    h0,
    h_off,
    y_off,
    y,
    ht,
    h_ckpt,
    stride_h0_b,
    stride_hoff_b,
    stride_yoff_b,
    L,
    NT,
    DIM,
    N: tl.constexpr,
    DELTA_SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_DELTA_BIAS: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
    USE_STATE_OFFSET: tl.constexpr,
    USE_Y_OFFSET: tl.constexpr,
    STORE_FINAL_STATE: tl.constexpr,
    STORE_CHECKPOINTS: tl.constexpr,
):
    i_d, i_b = tl.program_id(0), tl.program_id(1)
    i_b = i_b.to(tl.int64)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    o_n = tl.arange(0, BLOCK_N)
    o_l = tl.arange(0, BLOCK_L)
    m_d = o_d < DIM
    m_n = o_n < N
    m_dn = m_d[:, None] & m_n[None, :]
    o_dn = o_d[:, None] * N + o_n[None, :]

    # exp(Δ A) is evaluated as exp2(Δ · A log2 e)
    b_A = tl.load(A + o_dn, mask=m_dn, other=0.0).to(tl.float32) * LOG2E  # [BLOCK_D, BLOCK_N]
    if HAS_D:
        b_D = tl.load(D + o_d, mask=m_d, other=0.0).to(tl.float32)
    if HAS_DELTA_BIAS:
        b_db = tl.load(delta_bias + o_d, mask=m_d, other=0.0).to(tl.float32)
    if USE_INITIAL_STATE:
        b_h = tl.load(h0 + i_b * stride_h0_b + o_dn, mask=m_dn, other=0.0).to(tl.float32)
    else:
        b_h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    if USE_STATE_OFFSET:
        b_hoff = tl.load(h_off + i_b * stride_hoff_b + o_dn, mask=m_dn, other=0.0).to(tl.float32)
    if USE_Y_OFFSET:
        b_yoff = tl.load(y_off + i_b * stride_yoff_b + o_d, mask=m_d, other=0.0).to(tl.float32)

    p_x = i_b * DIM * L + o_d[:, None].to(tl.int64) * L  # [BLOCK_D, 1] row starts in [B, D, L]
    p_bc = i_b * N * L + o_n[:, None].to(tl.int64) * L  # [BLOCK_N, 1] row starts in [B, N, L]
    p_ck = ((i_b * DIM + o_d[:, None].to(tl.int64)) * NT) * N + o_n[None, :]  # [BLOCK_D, BLOCK_N] in [B, D, NT, N]

    i_t = 0
    while i_t < NT:
        o_t = i_t * BLOCK_L + o_l
        m_t = o_t < L
        m_x = m_d[:, None] & m_t[None, :]
        m_bc = m_n[:, None] & m_t[None, :]
        if STORE_CHECKPOINTS:
            tl.store(h_ckpt + p_ck + i_t * N, b_h, mask=m_dn)
        b_u = tl.load(u + p_x + o_t[None, :], mask=m_x, other=0.0).to(tl.float32)  # [BLOCK_D, BLOCK_L]
        b_dt = tl.load(delta + p_x + o_t[None, :], mask=m_x, other=0.0).to(tl.float32)
        if HAS_DELTA_BIAS:
            b_dt += b_db[:, None]
        if DELTA_SOFTPLUS:
            b_dt = _softplus(b_dt)
        # padded steps get Ā = 1, B̄u = 0, so the last column of the scan is the state after the last real step
        b_dt = tl.where(m_x, b_dt, 0.0)
        b_B = tl.load(B + p_bc + o_t[None, :], mask=m_bc, other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_L]
        b_C = tl.load(C + p_bc + o_t[None, :], mask=m_bc, other=0.0).to(tl.float32)

        b_dA = tl.exp2(b_dt[:, None, :] * b_A[:, :, None])  # [BLOCK_D, BLOCK_N, BLOCK_L]
        b_dBu = (b_dt * b_u)[:, None, :] * b_B[None, :, :]
        b_pA, b_hs = tl.associative_scan((b_dA, b_dBu), axis=2, combine_fn=_scan_combine)
        b_hs = b_hs + b_pA * b_h[:, :, None]
        if USE_STATE_OFFSET:
            b_y = tl.sum((b_hs + b_hoff[:, :, None]) * b_C[None, :, :], axis=1)  # [BLOCK_D, BLOCK_L]
        else:
            b_y = tl.sum(b_hs * b_C[None, :, :], axis=1)
        if HAS_D:
            b_y += b_D[:, None] * b_u
        if USE_Y_OFFSET:
            b_y += b_yoff[:, None]
        if HAS_Z:
            b_z = tl.load(z + p_x + o_t[None, :], mask=m_x, other=0.0).to(tl.float32)
            b_y = b_y * b_z * tl.sigmoid(b_z)
        tl.store(y + p_x + o_t[None, :], b_y.to(y.dtype.element_ty), mask=m_x)
        b_h = tl.sum(tl.where(o_l[None, None, :] == BLOCK_L - 1, b_hs, 0.0), axis=2)
        i_t += 1

    if STORE_FINAL_STATE:
        tl.store(ht + i_b * DIM * N + o_dn, b_h, mask=m_dn)


@triton.heuristics(
    {
        "HAS_D": lambda args: args["D"] is not None,
        "HAS_Z": lambda args: args["z"] is not None,
        "HAS_DELTA_BIAS": lambda args: args["delta_bias"] is not None,
        "USE_STATE_OFFSET": lambda args: args["h_off"] is not None,
        "USE_Y_OFFSET": lambda args: args["y_off"] is not None,
        "USE_FINAL_STATE_GRADIENT": lambda args: args["dht"] is not None,
        "STORE_INITIAL_STATE_GRADIENT": lambda args: args["dh0"] is not None,
    }
)
@triton.jit(do_not_specialize=["L", "NT"])
def selective_scan_bwd_kernel(
    u,
    delta,
    A,
    B,
    C,
    D,
    z,
    delta_bias,
    h_off,
    y_off,
    h_ckpt,
    dy,
    dht,
    du,
    ddelta,
    dA,
    dB,
    dC,
    dD,
    dz,
    ddelta_bias,
    dh0,
    dh_off,
    dy_off,
    stride_hoff_b,
    stride_yoff_b,
    L,
    NT,
    B_SIZE,
    DIM,
    N: tl.constexpr,
    DELTA_SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_DELTA_BIAS: tl.constexpr,
    USE_STATE_OFFSET: tl.constexpr,
    USE_Y_OFFSET: tl.constexpr,
    USE_FINAL_STATE_GRADIENT: tl.constexpr,
    STORE_INITIAL_STATE_GRADIENT: tl.constexpr,
):
    i_d, i_b = tl.program_id(0), tl.program_id(1)
    i_b = i_b.to(tl.int64)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    o_n = tl.arange(0, BLOCK_N)
    o_l = tl.arange(0, BLOCK_L)
    m_d = o_d < DIM
    m_n = o_n < N
    m_dn = m_d[:, None] & m_n[None, :]
    o_dn = o_d[:, None] * N + o_n[None, :]

    b_A = tl.load(A + o_dn, mask=m_dn, other=0.0).to(tl.float32)  # [BLOCK_D, BLOCK_N]
    b_A2 = b_A * LOG2E
    if HAS_D:
        b_D = tl.load(D + o_d, mask=m_d, other=0.0).to(tl.float32)
    if HAS_DELTA_BIAS:
        b_db = tl.load(delta_bias + o_d, mask=m_d, other=0.0).to(tl.float32)
    if USE_STATE_OFFSET:
        b_hoff = tl.load(h_off + i_b * stride_hoff_b + o_dn, mask=m_dn, other=0.0).to(tl.float32)
    if USE_Y_OFFSET:
        b_yoff = tl.load(y_off + i_b * stride_yoff_b + o_d, mask=m_d, other=0.0).to(tl.float32)
    # λ at the first step of the tile processed last (the one to the right); starts as ∂L/∂h_L
    if USE_FINAL_STATE_GRADIENT:
        b_lam = tl.load(dht + i_b * DIM * N + o_dn, mask=m_dn, other=0.0).to(tl.float32)
    else:
        b_lam = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    # sums over time are accumulated per tile position and reduced once after the loop (no per-tile cross-lane sums)
    b_dA_acc = tl.zeros([BLOCK_D, BLOCK_N, BLOCK_L], dtype=tl.float32)
    b_dhoff_acc = tl.zeros([BLOCK_D, BLOCK_N, BLOCK_L], dtype=tl.float32)
    b_dD_acc = tl.zeros([BLOCK_D, BLOCK_L], dtype=tl.float32)
    b_dyoff_acc = tl.zeros([BLOCK_D, BLOCK_L], dtype=tl.float32)
    b_ddb_acc = tl.zeros([BLOCK_D, BLOCK_L], dtype=tl.float32)

    p_x = i_b * DIM * L + o_d[:, None].to(tl.int64) * L  # [BLOCK_D, 1]
    p_bc = i_b * N * L + o_n[:, None].to(tl.int64) * L  # [BLOCK_N, 1]
    p_dbc = (i_d * B_SIZE + i_b) * N * L + o_n[:, None].to(tl.int64) * L  # [BLOCK_N, 1] in [ND, B, N, L]
    p_ck = ((i_b * DIM + o_d[:, None].to(tl.int64)) * NT) * N + o_n[None, :]  # [BLOCK_D, BLOCK_N]

    i_t = NT - 1
    while i_t >= 0:
        o_t = i_t * BLOCK_L + o_l
        m_t = o_t < L
        m_x = m_d[:, None] & m_t[None, :]
        m_bc = m_n[:, None] & m_t[None, :]
        b_h = tl.load(h_ckpt + p_ck + i_t * N, mask=m_dn, other=0.0)  # [BLOCK_D, BLOCK_N] state before the tile
        b_u = tl.load(u + p_x + o_t[None, :], mask=m_x, other=0.0).to(tl.float32)  # [BLOCK_D, BLOCK_L]
        b_dtr = tl.load(delta + p_x + o_t[None, :], mask=m_x, other=0.0).to(tl.float32)
        if HAS_DELTA_BIAS:
            b_dtr += b_db[:, None]
        if DELTA_SOFTPLUS:
            b_dt = tl.where(m_x, _softplus(b_dtr), 0.0)
        else:
            b_dt = tl.where(m_x, b_dtr, 0.0)
        b_B = tl.load(B + p_bc + o_t[None, :], mask=m_bc, other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_L]
        b_C = tl.load(C + p_bc + o_t[None, :], mask=m_bc, other=0.0).to(tl.float32)
        b_g = tl.load(dy + p_x + o_t[None, :], mask=m_x, other=0.0).to(tl.float32)  # [BLOCK_D, BLOCK_L]

        # 1. recompute h_t inside the tile from the checkpoint
        b_dA = tl.exp2(b_dt[:, None, :] * b_A2[:, :, None])  # [BLOCK_D, BLOCK_N, BLOCK_L]
        b_dBu = (b_dt * b_u)[:, None, :] * b_B[None, :, :]
        b_pA, b_hs = tl.associative_scan((b_dA, b_dBu), axis=2, combine_fn=_scan_combine)
        b_hs = b_hs + b_pA * b_h[:, :, None]
        if USE_STATE_OFFSET:
            b_hy = b_hs + b_hoff[:, :, None]
        else:
            b_hy = b_hs

        # 2. gate: ĝ = g · silu(z), dz = g · ŷ · silu'(z) with ŷ the pre-gate output
        if HAS_Z:
            b_z = tl.load(z + p_x + o_t[None, :], mask=m_x, other=0.0).to(tl.float32)
            b_yp = tl.sum(b_hy * b_C[None, :, :], axis=1)  # [BLOCK_D, BLOCK_L]
            if HAS_D:
                b_yp += b_D[:, None] * b_u
            if USE_Y_OFFSET:
                b_yp += b_yoff[:, None]
            b_sig = tl.sigmoid(b_z)
            b_dz = b_g * b_yp * b_sig * (1.0 + b_z * (1.0 - b_sig))
            tl.store(dz + p_x + o_t[None, :], b_dz.to(dz.dtype.element_ty), mask=m_x)
            b_g = b_g * b_z * b_sig

        # 3. adjoint: λ_t = Ā_{t+1} λ_{t+1} + ĝ_t C_t, with Ā_{t+1} read one step ahead (1 past the end)
        b_mu = b_g[:, None, :] * b_C[None, :, :]  # [BLOCK_D, BLOCK_N, BLOCK_L]
        m_xn = m_d[:, None] & (o_t[None, :] + 1 < L)
        b_dtn = tl.load(delta + p_x + o_t[None, :] + 1, mask=m_xn, other=0.0).to(tl.float32)
        if HAS_DELTA_BIAS:
            b_dtn += b_db[:, None]
        if DELTA_SOFTPLUS:
            b_dtn = _softplus(b_dtn)
        b_dtn = tl.where(m_xn, b_dtn, 0.0)
        b_dAn = tl.exp2(b_dtn[:, None, :] * b_A2[:, :, None])
        b_pAr, b_lams = tl.associative_scan((b_dAn, b_mu), axis=2, combine_fn=_scan_combine, reverse=True)
        b_lams = b_lams + b_pAr * b_lam[:, :, None]
        b_lam = tl.sum(tl.where(o_l[None, None, :] == 0, b_lams, 0.0), axis=2)

        # 4. local gradients; λ_t ⊙ Ā_t h_{t-1} = λ_t ⊙ (h_t - B̄_t u_t) avoids a shifted state
        b_lB = tl.sum(b_lams * b_B[None, :, :], axis=1)  # [BLOCK_D, BLOCK_L]
        b_term = b_lams * (b_hs - b_dBu)  # [BLOCK_D, BLOCK_N, BLOCK_L]
        b_ddt = b_u * b_lB + tl.sum(b_term * b_A[:, :, None], axis=1)
        b_du = b_dt * b_lB
        if HAS_D:
            b_du += b_g * b_D[:, None]
            b_dD_acc += b_g * b_u
        b_dA_acc += b_term * b_dt[:, None, :]
        if DELTA_SOFTPLUS:
            b_ddt = b_ddt * tl.sigmoid(b_dtr)
        b_ddt = tl.where(m_x, b_ddt, 0.0)
        if HAS_DELTA_BIAS:
            b_ddb_acc += b_ddt
        if USE_STATE_OFFSET:
            b_dhoff_acc += b_mu
        if USE_Y_OFFSET:
            b_dyoff_acc += b_g
        tl.store(du + p_x + o_t[None, :], b_du.to(du.dtype.element_ty), mask=m_x)
        tl.store(ddelta + p_x + o_t[None, :], b_ddt.to(ddelta.dtype.element_ty), mask=m_x)
        # per-channel-block partial sums of dB and dC, reduced over blocks by the launcher
        b_dB = tl.sum(b_lams * (b_dt * b_u)[:, None, :], axis=0)  # [BLOCK_N, BLOCK_L]
        b_dC = tl.sum(b_hy * b_g[:, None, :], axis=0)
        tl.store(dB + p_dbc + o_t[None, :], b_dB, mask=m_bc)
        tl.store(dC + p_dbc + o_t[None, :], b_dC, mask=m_bc)
        i_t -= 1

    tl.store(dA + i_b * DIM * N + o_dn, tl.sum(b_dA_acc, axis=2), mask=m_dn)
    if STORE_INITIAL_STATE_GRADIENT:
        # ∂L/∂h_0 = Ā_1 ⊙ λ_1 (METHODS §5.1); Ā_1 = 1 when L = 0
        m_d0 = (m_d & (tl.zeros_like(o_d) < L))[:, None]
        b_dt0 = tl.load(delta + p_x, mask=m_d0, other=0.0).to(tl.float32)  # [BLOCK_D, 1]
        if HAS_DELTA_BIAS:
            b_dt0 += b_db[:, None]
        if DELTA_SOFTPLUS:
            b_dt0 = _softplus(b_dt0)
        b_dt0 = tl.where(m_d0, b_dt0, 0.0)
        tl.store(dh0 + i_b * DIM * N + o_dn, tl.exp2(b_dt0 * b_A2) * b_lam, mask=m_dn)
    if USE_STATE_OFFSET:
        tl.store(dh_off + i_b * DIM * N + o_dn, tl.sum(b_dhoff_acc, axis=2), mask=m_dn)
    if HAS_D:
        tl.store(dD + i_b * DIM + o_d, tl.sum(b_dD_acc, axis=1), mask=m_d)
    if USE_Y_OFFSET:
        tl.store(dy_off + i_b * DIM + o_d, tl.sum(b_dyoff_acc, axis=1), mask=m_d)
    if HAS_DELTA_BIAS:
        tl.store(ddelta_bias + i_b * DIM + o_d, tl.sum(b_ddb_acc, axis=1), mask=m_d)


@triton.jit
def _fwd_nloop_state(
    i_n, b_h, b_hn, b_y, b_dt, b_dtu, b_Bn, b_Cn, A, h_off, o_d, o_n, o_l, m_d, off_hoff,
    N: tl.constexpr, BLOCK_L: tl.constexpr, USE_STATE_OFFSET: tl.constexpr,
):  # fmt: skip
    """State n of one forward tile: scan h_n from the carried state, add C_n (h_n + h'_n) to y, keep the last h_n."""
    m_sel = (o_n == i_n)[None, :]  # [1, BLOCK_N]
    b_An = tl.load(A + o_d * N + i_n, mask=m_d, other=0.0).to(tl.float32) * LOG2E  # [BLOCK_D]
    b_pA, b_hs = tl.associative_scan(
        (tl.exp2(b_dt * b_An[:, None]), b_dtu * b_Bn.to(tl.float32)), axis=1, combine_fn=_scan_combine
    )
    b_hs += b_pA * tl.sum(tl.where(m_sel, b_h, 0.0), axis=1)[:, None]
    b_last = tl.sum(tl.where(o_l[None, :] == BLOCK_L - 1, b_hs, 0.0), axis=1)  # [BLOCK_D]
    b_hn = tl.where(m_sel, b_last[:, None], b_hn)
    if USE_STATE_OFFSET:
        b_hs += tl.load(h_off + off_hoff + o_d * N + i_n, mask=m_d, other=0.0)[:, None]
    b_y += b_hs * b_Cn.to(tl.float32)
    return b_hn, b_y


@triton.jit
def _bwd_nloop_state(
    i_n, b_lam, b_lam_new, b_lB, b_lhA, b_dA_acc, b_dhoff_acc, b_dt, b_dtn, b_dtu, b_g, b_Bn, b_Cn,
    A, h_off, h_start, dB, dC, p_bc, o_t, m_t, o_d, o_n, o_l, m_d, off_hoff,
    L, N: tl.constexpr, USE_STATE_OFFSET: tl.constexpr,
):  # fmt: skip
    """State n of one backward tile: recompute h_n, run the adjoint λ_n, accumulate the local gradients."""
    m_sel = (o_n == i_n)[None, :]
    b_An = tl.load(A + o_d * N + i_n, mask=m_d, other=0.0).to(tl.float32)  # [BLOCK_D]
    b_An2 = b_An * LOG2E
    b_h = tl.load(h_start + i_n, mask=m_d, other=0.0)  # [BLOCK_D] state before the tile
    # 1. recompute h_n inside the tile
    b_dBu = b_dtu * b_Bn
    b_pA, b_hs = tl.associative_scan((tl.exp2(b_dt * b_An2[:, None]), b_dBu), axis=1, combine_fn=_scan_combine)
    b_hs += b_pA * b_h[:, None]
    # 2. adjoint λ_t = Ā_{t+1} λ_{t+1} + ĝ_t C_t, carried in from the tile to the right
    b_mu = b_g * b_Cn
    b_pAr, b_lams = tl.associative_scan(
        (tl.exp2(b_dtn * b_An2[:, None]), b_mu), axis=1, combine_fn=_scan_combine, reverse=True
    )
    b_lams += b_pAr * tl.sum(tl.where(m_sel, b_lam, 0.0), axis=1)[:, None]
    b_first = tl.sum(tl.where(o_l[None, :] == 0, b_lams, 0.0), axis=1)
    b_lam_new = tl.where(m_sel, b_first[:, None], b_lam_new)
    # 3. local gradients; λ_t ⊙ Ā_t h_{t-1} = λ_t ⊙ (h_t - B̄_t u_t)
    b_term = b_lams * (b_hs - b_dBu)
    b_lB += b_lams * b_Bn
    b_lhA += b_term * b_An[:, None]
    b_dA_acc = tl.where(m_sel, b_dA_acc + tl.sum(b_term * b_dt, axis=1)[:, None], b_dA_acc)
    if USE_STATE_OFFSET:
        b_hs += tl.load(h_off + off_hoff + o_d * N + i_n, mask=m_d, other=0.0)[:, None]
        b_dhoff_acc = tl.where(m_sel, b_dhoff_acc + tl.sum(b_mu, axis=1)[:, None], b_dhoff_acc)
    p_dbc = p_bc + i_n * L + o_t
    tl.atomic_add(dB + p_dbc, tl.sum(b_lams * b_dtu, axis=0), mask=m_t, sem="relaxed")
    tl.atomic_add(dC + p_dbc, tl.sum(b_hs * b_g, axis=0), mask=m_t, sem="relaxed")
    return b_lB, b_lhA, b_lam_new, b_dA_acc, b_dhoff_acc


@triton.heuristics(
    {
        "HAS_D": lambda args: args["D"] is not None,
        "HAS_Z": lambda args: args["z"] is not None,
        "HAS_DELTA_BIAS": lambda args: args["delta_bias"] is not None,
        "USE_INITIAL_STATE": lambda args: args["h0"] is not None,
        "USE_STATE_OFFSET": lambda args: args["h_off"] is not None,
        "USE_Y_OFFSET": lambda args: args["y_off"] is not None,
        "STORE_FINAL_STATE": lambda args: args["ht"] is not None,
        "STORE_CHECKPOINTS": lambda args: args["h_ckpt"] is not None,
        "STORE_Y_PRE": lambda args: args["y_pre"] is not None,
    }
)
@triton.jit(do_not_specialize=["L", "NT"])
def selective_scan_fwd_nloop_kernel(
    u,
    delta,
    A,
    B,
    C,
    D,
    z,
    delta_bias,
    h0,
    h_off,
    y_off,
    y,
    y_pre,
    ht,
    h_ckpt,
    stride_h0_b,
    stride_hoff_b,
    stride_yoff_b,
    L,
    NT,
    DIM,
    N: tl.constexpr,
    DELTA_SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_DELTA_BIAS: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
    USE_STATE_OFFSET: tl.constexpr,
    USE_Y_OFFSET: tl.constexpr,
    STORE_FINAL_STATE: tl.constexpr,
    STORE_CHECKPOINTS: tl.constexpr,
    STORE_Y_PRE: tl.constexpr,
    UNROLL_N: tl.constexpr = False,
):
    # Same semantics as selective_scan_fwd_kernel, other work split: a long [BLOCK_D, BLOCK_L] time tile and a loop
    # over the N states, one 2-D scan per state (mamba_ssm's order). The carried states live in a [BLOCK_D, BLOCK_N]
    # register tile; state n is read and written through a one-hot mask.
    i_d, i_b = tl.program_id(0), tl.program_id(1)
    i_b = i_b.to(tl.int64)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    o_n = tl.arange(0, BLOCK_N)
    o_l = tl.arange(0, BLOCK_L)
    m_d = o_d < DIM
    m_n = o_n < N
    m_dn = m_d[:, None] & m_n[None, :]
    o_dn = o_d[:, None] * N + o_n[None, :]

    if HAS_D:
        b_D = tl.load(D + o_d, mask=m_d, other=0.0).to(tl.float32)
    if HAS_DELTA_BIAS:
        b_db = tl.load(delta_bias + o_d, mask=m_d, other=0.0).to(tl.float32)
    if USE_INITIAL_STATE:
        b_h = tl.load(h0 + i_b * stride_h0_b + o_dn, mask=m_dn, other=0.0).to(tl.float32)
    else:
        b_h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    if USE_Y_OFFSET:
        b_yoff = tl.load(y_off + i_b * stride_yoff_b + o_d, mask=m_d, other=0.0).to(tl.float32)

    p_x = i_b * DIM * L + o_d[:, None].to(tl.int64) * L  # [BLOCK_D, 1] row starts in [B, D, L]
    p_bc = i_b * N * L  # row n of [B, N, L] starts at p_bc + n * L
    p_ck = ((i_b * DIM + o_d[:, None].to(tl.int64)) * NT) * N + o_n[None, :]  # [BLOCK_D, BLOCK_N] in [B, D, NT, N]

    i_t = 0
    while i_t < NT:
        o_t = i_t * BLOCK_L + o_l
        m_t = o_t < L
        m_x = m_d[:, None] & m_t[None, :]
        if STORE_CHECKPOINTS:
            tl.store(h_ckpt + p_ck + i_t * N, b_h, mask=m_dn)
        b_u = tl.load(u + p_x + o_t[None, :], mask=m_x, other=0.0).to(tl.float32)  # [BLOCK_D, BLOCK_L]
        b_dt = tl.load(delta + p_x + o_t[None, :], mask=m_x, other=0.0).to(tl.float32)
        if HAS_DELTA_BIAS:
            b_dt += b_db[:, None]
        if DELTA_SOFTPLUS:
            b_dt = _softplus(b_dt)
        # padded steps get Ā = 1, B̄u = 0, so the last column of a scan is the state after the last real step
        b_dt = tl.where(m_x, b_dt, 0.0)
        b_dtu = b_dt * b_u
        b_y = tl.zeros([BLOCK_D, BLOCK_L], dtype=tl.float32)
        b_hn = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
        if UNROLL_N:
            # every state's loads and scan in one straight-line block: the compiler may interleave them
            for i_n in tl.static_range(N):
                b_Bn = tl.load(B + p_bc + i_n * L + o_t[None, :], mask=m_t[None, :], other=0.0)
                b_Cn = tl.load(C + p_bc + i_n * L + o_t[None, :], mask=m_t[None, :], other=0.0)
                b_hn, b_y = _fwd_nloop_state(
                    i_n, b_h, b_hn, b_y, b_dt, b_dtu, b_Bn, b_Cn, A, h_off, o_d, o_n, o_l, m_d,
                    i_b * stride_hoff_b, N, BLOCK_L, USE_STATE_OFFSET,
                )  # fmt: skip
        else:
            # B_n, C_n of the next state are loaded before the current one is used, so the loads overlap the scan
            b_Bn = tl.load(B + p_bc + o_t[None, :], mask=m_t[None, :], other=0.0)
            b_Cn = tl.load(C + p_bc + o_t[None, :], mask=m_t[None, :], other=0.0)
            for i_n in range(N):
                m_next = m_t[None, :] & (i_n + 1 < N)
                b_Bx = tl.load(B + p_bc + (i_n + 1) * L + o_t[None, :], mask=m_next, other=0.0)
                b_Cx = tl.load(C + p_bc + (i_n + 1) * L + o_t[None, :], mask=m_next, other=0.0)
                b_hn, b_y = _fwd_nloop_state(
                    i_n, b_h, b_hn, b_y, b_dt, b_dtu, b_Bn, b_Cn, A, h_off, o_d, o_n, o_l, m_d,
                    i_b * stride_hoff_b, N, BLOCK_L, USE_STATE_OFFSET,
                )  # fmt: skip
                b_Bn, b_Cn = b_Bx, b_Cx
        b_h = b_hn
        if HAS_D:
            b_y += b_D[:, None] * b_u
        if USE_Y_OFFSET:
            b_y += b_yoff[:, None]
        if HAS_Z:
            if STORE_Y_PRE:
                # the backward needs the pre-gate output for dz; saving it is cheaper than a second pass over N
                tl.store(y_pre + p_x + o_t[None, :], b_y.to(y_pre.dtype.element_ty), mask=m_x)
            b_z = tl.load(z + p_x + o_t[None, :], mask=m_x, other=0.0).to(tl.float32)
            b_y = b_y * b_z * tl.sigmoid(b_z)
        tl.store(y + p_x + o_t[None, :], b_y.to(y.dtype.element_ty), mask=m_x)
        i_t += 1

    if STORE_FINAL_STATE:
        tl.store(ht + i_b * DIM * N + o_dn, b_h, mask=m_dn)


@triton.heuristics(
    {
        "HAS_D": lambda args: args["D"] is not None,
        "HAS_Z": lambda args: args["z"] is not None,
        "HAS_DELTA_BIAS": lambda args: args["delta_bias"] is not None,
        "USE_STATE_OFFSET": lambda args: args["h_off"] is not None,
        "USE_Y_OFFSET": lambda args: args["y_off"] is not None,
        "USE_FINAL_STATE_GRADIENT": lambda args: args["dht"] is not None,
        "STORE_INITIAL_STATE_GRADIENT": lambda args: args["dh0"] is not None,
    }
)
@triton.jit(do_not_specialize=["L", "NT"])
def selective_scan_bwd_nloop_kernel(
    u,
    delta,
    A,
    B,
    C,
    D,
    z,
    delta_bias,
    h_off,
    y_off,
    h_ckpt,
    y_pre,
    dy,
    dht,
    du,
    ddelta,
    dA,
    dB,
    dC,
    dD,
    dz,
    ddelta_bias,
    dh0,
    dh_off,
    dy_off,
    stride_hoff_b,
    stride_yoff_b,
    L,
    NT,
    DIM,
    N: tl.constexpr,
    DELTA_SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_DELTA_BIAS: tl.constexpr,
    USE_STATE_OFFSET: tl.constexpr,
    USE_Y_OFFSET: tl.constexpr,
    USE_FINAL_STATE_GRADIENT: tl.constexpr,
    STORE_INITIAL_STATE_GRADIENT: tl.constexpr,
    UNROLL_N: tl.constexpr = False,
):
    # Backward of selective_scan_fwd_nloop_kernel: tiles in reverse, and per tile a loop over the N states that
    # recomputes h_n from the checkpoint and runs the adjoint λ_n as a reverse scan (formulas: selective_scan_bwd_kernel).
    # dB and dC are sums over all channels: fp32 atomic adds into [B, N, L] (as mamba_ssm; the order is not fixed).
    i_d, i_b = tl.program_id(0), tl.program_id(1)
    i_b = i_b.to(tl.int64)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    o_n = tl.arange(0, BLOCK_N)
    o_l = tl.arange(0, BLOCK_L)
    m_d = o_d < DIM
    m_n = o_n < N
    m_dn = m_d[:, None] & m_n[None, :]
    o_dn = o_d[:, None] * N + o_n[None, :]

    if HAS_D:
        b_D = tl.load(D + o_d, mask=m_d, other=0.0).to(tl.float32)
    if HAS_DELTA_BIAS:
        b_db = tl.load(delta_bias + o_d, mask=m_d, other=0.0).to(tl.float32)
    if USE_FINAL_STATE_GRADIENT:
        b_lam = tl.load(dht + i_b * DIM * N + o_dn, mask=m_dn, other=0.0).to(tl.float32)
    else:
        b_lam = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    b_dA_acc = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    b_dhoff_acc = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    b_dD_acc = tl.zeros([BLOCK_D, BLOCK_L], dtype=tl.float32)
    b_dyoff_acc = tl.zeros([BLOCK_D, BLOCK_L], dtype=tl.float32)
    b_ddb_acc = tl.zeros([BLOCK_D, BLOCK_L], dtype=tl.float32)

    p_x = i_b * DIM * L + o_d[:, None].to(tl.int64) * L  # [BLOCK_D, 1]
    p_bc = i_b * N * L
    p_ck = ((i_b * DIM + o_d.to(tl.int64)) * NT) * N  # [BLOCK_D]

    i_t = NT - 1
    while i_t >= 0:
        o_t = i_t * BLOCK_L + o_l
        m_t = o_t < L
        m_x = m_d[:, None] & m_t[None, :]
        b_u = tl.load(u + p_x + o_t[None, :], mask=m_x, other=0.0).to(tl.float32)  # [BLOCK_D, BLOCK_L]
        b_dtr = tl.load(delta + p_x + o_t[None, :], mask=m_x, other=0.0).to(tl.float32)
        if HAS_DELTA_BIAS:
            b_dtr += b_db[:, None]
        if DELTA_SOFTPLUS:
            b_dt = tl.where(m_x, _softplus(b_dtr), 0.0)
        else:
            b_dt = tl.where(m_x, b_dtr, 0.0)
        # Δ one step ahead, for Ā_{t+1} in the adjoint (0 past the end: Ā = 1)
        m_xn = m_d[:, None] & (o_t[None, :] + 1 < L)
        b_dtn = tl.load(delta + p_x + o_t[None, :] + 1, mask=m_xn, other=0.0).to(tl.float32)
        if HAS_DELTA_BIAS:
            b_dtn += b_db[:, None]
        if DELTA_SOFTPLUS:
            b_dtn = _softplus(b_dtn)
        b_dtn = tl.where(m_xn, b_dtn, 0.0)
        b_g = tl.load(dy + p_x + o_t[None, :], mask=m_x, other=0.0).to(tl.float32)
        if HAS_Z:
            b_z = tl.load(z + p_x + o_t[None, :], mask=m_x, other=0.0).to(tl.float32)
            b_yp = tl.load(y_pre + p_x + o_t[None, :], mask=m_x, other=0.0).to(tl.float32)
            b_sig = tl.sigmoid(b_z)
            b_dz = b_g * b_yp * b_sig * (1.0 + b_z * (1.0 - b_sig))
            tl.store(dz + p_x + o_t[None, :], b_dz.to(dz.dtype.element_ty), mask=m_x)
            b_g = b_g * b_z * b_sig
        b_dtu = b_dt * b_u
        b_lB = tl.zeros([BLOCK_D, BLOCK_L], dtype=tl.float32)  # Σ_n λ_n B_n
        b_lhA = tl.zeros([BLOCK_D, BLOCK_L], dtype=tl.float32)  # Σ_n A_n λ_n (h_n - B̄_n u)
        b_lam_new = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
        p_ck_t = p_ck + i_t * N
        if UNROLL_N:
            for i_n in tl.static_range(N):
                b_Bn = tl.load(B + p_bc + i_n * L + o_t[None, :], mask=m_t[None, :], other=0.0).to(tl.float32)
                b_Cn = tl.load(C + p_bc + i_n * L + o_t[None, :], mask=m_t[None, :], other=0.0).to(tl.float32)
                b_lB, b_lhA, b_lam_new, b_dA_acc, b_dhoff_acc = _bwd_nloop_state(
                    i_n, b_lam, b_lam_new, b_lB, b_lhA, b_dA_acc, b_dhoff_acc, b_dt, b_dtn, b_dtu, b_g, b_Bn, b_Cn,
                    A, h_off, h_ckpt + p_ck_t, dB, dC, p_bc, o_t, m_t, o_d, o_n, o_l, m_d, i_b * stride_hoff_b,
                    L, N, USE_STATE_OFFSET,
                )  # fmt: skip
        else:
            b_Bx = tl.load(B + p_bc + o_t[None, :], mask=m_t[None, :], other=0.0)
            b_Cx = tl.load(C + p_bc + o_t[None, :], mask=m_t[None, :], other=0.0)
            for i_n in range(N):
                b_Bn, b_Cn = b_Bx.to(tl.float32), b_Cx.to(tl.float32)
                # prefetch the next state's B_n, C_n (see the forward)
                m_next = m_t[None, :] & (i_n + 1 < N)
                b_Bx = tl.load(B + p_bc + (i_n + 1) * L + o_t[None, :], mask=m_next, other=0.0)
                b_Cx = tl.load(C + p_bc + (i_n + 1) * L + o_t[None, :], mask=m_next, other=0.0)
                b_lB, b_lhA, b_lam_new, b_dA_acc, b_dhoff_acc = _bwd_nloop_state(
                    i_n, b_lam, b_lam_new, b_lB, b_lhA, b_dA_acc, b_dhoff_acc, b_dt, b_dtn, b_dtu, b_g, b_Bn, b_Cn,
                    A, h_off, h_ckpt + p_ck_t, dB, dC, p_bc, o_t, m_t, o_d, o_n, o_l, m_d, i_b * stride_hoff_b,
                    L, N, USE_STATE_OFFSET,
                )  # fmt: skip
        b_lam = b_lam_new
        b_ddt = b_u * b_lB + b_lhA
        b_du = b_dt * b_lB
        if HAS_D:
            b_du += b_g * b_D[:, None]
            b_dD_acc += b_g * b_u
        if DELTA_SOFTPLUS:
            b_ddt = b_ddt * tl.sigmoid(b_dtr)
        b_ddt = tl.where(m_x, b_ddt, 0.0)
        if HAS_DELTA_BIAS:
            b_ddb_acc += b_ddt
        if USE_Y_OFFSET:
            b_dyoff_acc += b_g
        tl.store(du + p_x + o_t[None, :], b_du.to(du.dtype.element_ty), mask=m_x)
        tl.store(ddelta + p_x + o_t[None, :], b_ddt.to(ddelta.dtype.element_ty), mask=m_x)
        i_t -= 1

    tl.store(dA + i_b * DIM * N + o_dn, b_dA_acc, mask=m_dn)
    if STORE_INITIAL_STATE_GRADIENT:
        # ∂L/∂h_0 = Ā_1 ⊙ λ_1 (METHODS §5.1); Ā_1 = 1 when L = 0
        b_A2 = tl.load(A + o_dn, mask=m_dn, other=0.0).to(tl.float32) * LOG2E
        m_d0 = (m_d & (tl.zeros_like(o_d) < L))[:, None]
        b_dt0 = tl.load(delta + p_x, mask=m_d0, other=0.0).to(tl.float32)  # [BLOCK_D, 1]
        if HAS_DELTA_BIAS:
            b_dt0 += b_db[:, None]
        if DELTA_SOFTPLUS:
            b_dt0 = _softplus(b_dt0)
        b_dt0 = tl.where(m_d0, b_dt0, 0.0)
        tl.store(dh0 + i_b * DIM * N + o_dn, tl.exp2(b_dt0 * b_A2) * b_lam, mask=m_dn)
    if USE_STATE_OFFSET:
        tl.store(dh_off + i_b * DIM * N + o_dn, b_dhoff_acc, mask=m_dn)
    if HAS_D:
        tl.store(dD + i_b * DIM + o_d, tl.sum(b_dD_acc, axis=1), mask=m_d)
    if USE_Y_OFFSET:
        tl.store(dy_off + i_b * DIM + o_d, tl.sum(b_dyoff_acc, axis=1), mask=m_d)
    if HAS_DELTA_BIAS:
        tl.store(ddelta_bias + i_b * DIM + o_d, tl.sum(b_ddb_acc, axis=1), mask=m_d)


@triton.heuristics(
    {
        "HAS_D": lambda args: args["D"] is not None,
        "HAS_Z": lambda args: args["z"] is not None,
        "HAS_DT_BIAS": lambda args: args["dt_bias"] is not None,
        "USE_STATE_OFFSET": lambda args: args["h_off"] is not None,
        "USE_Y_OFFSET": lambda args: args["y_off"] is not None,
    }
)
@triton.jit
def selective_state_update_fwd_kernel(
    state,
    x,
    dt,
    A,
    B,
    C,
    D,
    z,
    dt_bias,
    h_off,
    y_off,
    y,
    stride_hoff_b,
    stride_yoff_b,
    DIM,
    N: tl.constexpr,
    DT_SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_DT_BIAS: tl.constexpr,
    USE_STATE_OFFSET: tl.constexpr,
    USE_Y_OFFSET: tl.constexpr,
):
    i_d, i_b = tl.program_id(0), tl.program_id(1)
    i_b = i_b.to(tl.int64)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    o_n = tl.arange(0, BLOCK_N)
    m_d = o_d < DIM
    m_n = o_n < N
    m_dn = m_d[:, None] & m_n[None, :]
    o_dn = o_d[:, None] * N + o_n[None, :]
    p_s = state + i_b * DIM * N + o_dn

    b_s = tl.load(p_s, mask=m_dn, other=0.0).to(tl.float32)  # [BLOCK_D, BLOCK_N]
    b_x = tl.load(x + i_b * DIM + o_d, mask=m_d, other=0.0).to(tl.float32)  # [BLOCK_D]
    b_dt = tl.load(dt + i_b * DIM + o_d, mask=m_d, other=0.0).to(tl.float32)
    if HAS_DT_BIAS:
        b_dt += tl.load(dt_bias + o_d, mask=m_d, other=0.0).to(tl.float32)
    if DT_SOFTPLUS:
        b_dt = _softplus(b_dt)
    b_A = tl.load(A + o_dn, mask=m_dn, other=0.0).to(tl.float32)
    b_B = tl.load(B + i_b * N + o_n, mask=m_n, other=0.0).to(tl.float32)  # [BLOCK_N]
    b_C = tl.load(C + i_b * N + o_n, mask=m_n, other=0.0).to(tl.float32)
    b_s = tl.exp(b_dt[:, None] * b_A) * b_s + (b_dt * b_x)[:, None] * b_B[None, :]
    tl.store(p_s, b_s.to(state.dtype.element_ty), mask=m_dn)
    # the cache keeps the un-offset state; h' only enters the read-out
    if USE_STATE_OFFSET:
        b_s += tl.load(h_off + i_b * stride_hoff_b + o_dn, mask=m_dn, other=0.0).to(tl.float32)
    b_y = tl.sum(b_s * b_C[None, :], axis=1)  # [BLOCK_D]
    if HAS_D:
        b_y += tl.load(D + o_d, mask=m_d, other=0.0).to(tl.float32) * b_x
    if USE_Y_OFFSET:
        b_y += tl.load(y_off + i_b * stride_yoff_b + o_d, mask=m_d, other=0.0).to(tl.float32)
    if HAS_Z:
        b_z = tl.load(z + i_b * DIM + o_d, mask=m_d, other=0.0).to(tl.float32)
        b_y = b_y * b_z * tl.sigmoid(b_z)
    tl.store(y + i_b * DIM + o_d, b_y.to(y.dtype.element_ty), mask=m_d)


def _config(dim: int, dstate: int, seqlen: int = 1 << 30) -> dict[str, int]:
    """Launch configuration. ``ALGO`` 1: n-loop kernels (a long [BLOCK_D, BLOCK_L] time tile, a loop over the states);
    ``ALGO`` 0: tile kernels (a short [BLOCK_D, N, BLOCK_L] tile, all states at once)."""
    block_n = triton.next_power_of_2(max(dstate, 1))
    algo = CONFIG_OVERRIDE.get("ALGO", 1)
    cap = triton.next_power_of_2(max(dim, 1))
    if algo == 1:
        # BLOCK_L: the sequence (rounded up to a power of two) up to a cap; one compiled kernel per BLOCK_L.
        # H100 sweep (docs/kernels-mamba1.md): short tiles on one warp, one channel per program, won
        block_l = min(CONFIG_OVERRIDE.get("BLOCK_L", 128), max(16, triton.next_power_of_2(max(seqlen, 1))))
        warps = 1
        # forward and backward tiles are independent except for BLOCK_L (the checkpoints sit at tile starts)
        cfg = {
            "ALGO": 1,
            "BLOCK_N": block_n,
            "BLOCK_L": block_l,
            "BLOCK_D_FWD": 1,
            "BLOCK_D_BWD": 2,
            "WARPS_FWD": warps,
            "WARPS_BWD": warps,
            # unrolled state loops (straight-line code per state): more registers, more independent work per warp;
            # only for small N, where the code stays small. Off until a GPU sweep says otherwise.
            "UNROLL_FWD": int(bool(CONFIG_OVERRIDE.get("UNROLL_FWD", 0)) and block_n <= 32),
            "UNROLL_BWD": int(bool(CONFIG_OVERRIDE.get("UNROLL_BWD", 0)) and block_n <= 32),
        }
    else:
        block_l = CONFIG_OVERRIDE.get("BLOCK_L", 16 if block_n <= 64 else 8)
        # H100 sweep (docs/kernels-mamba1.md): small tiles on 2 warps beat larger tiles and more warps
        tile_fwd = CONFIG_OVERRIDE.get("TILE_FWD", 1024)
        tile_bwd = CONFIG_OVERRIDE.get("TILE_BWD", 1024)
        cfg = {
            "ALGO": 0,
            "BLOCK_N": block_n,
            "BLOCK_L": block_l,
            "BLOCK_D_FWD": min(cap, max(1, tile_fwd // (block_n * block_l))),
            "BLOCK_D_BWD": min(cap, max(1, tile_bwd // (block_n * block_l))),
            "WARPS_FWD": 2,
            "WARPS_BWD": 2,
        }
    resolved = ("ALGO", "BLOCK_L", "UNROLL_FWD", "UNROLL_BWD")  # taken from the override above, with their limits
    cfg.update({k: v for k, v in CONFIG_OVERRIDE.items() if k in cfg and k not in resolved})
    cfg["BLOCK_D_FWD"] = min(cap, cfg["BLOCK_D_FWD"])
    cfg["BLOCK_D_BWD"] = min(cap, cfg["BLOCK_D_BWD"])
    return cfg


def _batch_stride(t: torch.Tensor | None, ndim: int) -> int:
    """Batch stride of an optional tensor that is either shared (``ndim - 1`` dims, stride 0) or per batch row."""
    if t is None or t.dim() == ndim - 1:
        return 0
    return t.stride(0)


def selective_scan_fwd(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    initial_state: torch.Tensor | None,
    state_offset: torch.Tensor | None,
    y_offset: torch.Tensor | None,
    output_final_state: bool,
    store_checkpoints: bool,
    cfg: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Launch the forward kernel. Returns y [B, D, L], h_L [B, D, N] (fp32) or None, checkpoints [B, D, NT, N] or
    None, and the pre-gate output [B, D, L] (n-loop kernels with z and checkpoints only) or None."""
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    cfg = cfg or _config(dim, dstate, seqlen)
    nt = triton.cdiv(seqlen, cfg["BLOCK_L"])
    y = torch.empty_like(u)  # [B, D, L]
    ht = torch.empty(batch, dim, dstate, device=u.device, dtype=torch.float32) if output_final_state else None
    h_ckpt = torch.empty(batch, dim, nt, dstate, device=u.device, dtype=torch.float32) if store_checkpoints else None
    grid = (triton.cdiv(dim, cfg["BLOCK_D_FWD"]), batch)
    common = {
        "DIM": dim, "N": dstate, "DELTA_SOFTPLUS": delta_softplus,
        "BLOCK_D": cfg["BLOCK_D_FWD"], "BLOCK_N": cfg["BLOCK_N"], "BLOCK_L": cfg["BLOCK_L"], "num_warps": cfg["WARPS_FWD"],
    }  # fmt: skip
    strides = (_batch_stride(initial_state, 3), _batch_stride(state_offset, 3), _batch_stride(y_offset, 2))
    y_pre = None
    if cfg["ALGO"] == 1:
        y_pre = torch.empty_like(u) if (z is not None and store_checkpoints) else None
        selective_scan_fwd_nloop_kernel[grid](
            u, delta, A, B, C, D, z, delta_bias, initial_state, state_offset, y_offset, y, y_pre, ht, h_ckpt,
            *strides, seqlen, nt, UNROLL_N=bool(cfg["UNROLL_FWD"]), **common,
        )  # fmt: skip
    else:
        selective_scan_fwd_kernel[grid](
            u, delta, A, B, C, D, z, delta_bias, initial_state, state_offset, y_offset, y, ht, h_ckpt,
            *strides, seqlen, nt, **common,
        )  # fmt: skip
    return y, ht, h_ckpt, y_pre


def selective_scan_bwd(
    dy: torch.Tensor,
    dht: torch.Tensor | None,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    initial_state: torch.Tensor | None,
    state_offset: torch.Tensor | None,
    y_offset: torch.Tensor | None,
    h_ckpt: torch.Tensor,
    y_pre: torch.Tensor | None = None,
    cfg: dict[str, int] | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """Launch the backward kernel and reduce the partial sums (over channel blocks for dB/dC, over batch otherwise).
    ``cfg`` must be the forward's configuration (its checkpoints and saved tensors depend on it)."""
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    cfg = cfg or _config(dim, dstate, seqlen)
    nt = h_ckpt.shape[2]
    nblocks = triton.cdiv(dim, cfg["BLOCK_D_BWD"])
    f32 = {"device": u.device, "dtype": torch.float32}
    du = torch.empty_like(u)  # [B, D, L]
    ddelta = torch.empty_like(delta)  # [B, D, L]
    dz = torch.empty_like(z) if z is not None else None
    dA = torch.empty(batch, dim, dstate, **f32)
    dD = torch.empty(batch, dim, **f32) if D is not None else None
    ddelta_bias = torch.empty(batch, dim, **f32) if delta_bias is not None else None
    dh0 = torch.empty(batch, dim, dstate, **f32) if initial_state is not None else None
    dh_off = torch.empty(batch, dim, dstate, **f32) if state_offset is not None else None
    dy_off = torch.empty(batch, dim, **f32) if y_offset is not None else None
    grid = (nblocks, batch)
    common = {
        "DIM": dim, "N": dstate, "DELTA_SOFTPLUS": delta_softplus,
        "BLOCK_D": cfg["BLOCK_D_BWD"], "BLOCK_N": cfg["BLOCK_N"], "BLOCK_L": cfg["BLOCK_L"], "num_warps": cfg["WARPS_BWD"],
    }  # fmt: skip
    if cfg["ALGO"] == 1:
        # summed over channel programs by atomic adds
        dB = torch.zeros(batch, dstate, seqlen, **f32)
        dC = torch.zeros(batch, dstate, seqlen, **f32)
        selective_scan_bwd_nloop_kernel[grid](
            u, delta, A, B, C, D, z, delta_bias, state_offset, y_offset, h_ckpt, y_pre, dy, dht,
            du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dh0, dh_off, dy_off,
            _batch_stride(state_offset, 3), _batch_stride(y_offset, 2), seqlen, nt, UNROLL_N=bool(cfg["UNROLL_BWD"]),
            **common,
        )  # fmt: skip
    else:
        # per-channel-block partial sums, reduced here (deterministic)
        dB = torch.empty(nblocks, batch, dstate, seqlen, **f32)
        dC = torch.empty(nblocks, batch, dstate, seqlen, **f32)
        selective_scan_bwd_kernel[grid](
            u, delta, A, B, C, D, z, delta_bias, state_offset, y_offset, h_ckpt, dy, dht,
            du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dh0, dh_off, dy_off,
            _batch_stride(state_offset, 3), _batch_stride(y_offset, 2), seqlen, nt, batch, **common,
        )  # fmt: skip
        dB, dC = dB.sum(0), dC.sum(0)

    def _reduce(g: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
        # shared parameters get the sum over the batch
        if g is None or like is None:
            return None
        return (g.sum(0) if like.dim() < g.dim() else g).to(like.dtype)

    return (
        du,
        ddelta,
        dA.sum(0).to(A.dtype),
        dB.to(B.dtype),
        dC.to(C.dtype),
        _reduce(dD, D),
        dz,
        _reduce(ddelta_bias, delta_bias),
        _reduce(dh0, initial_state),
        _reduce(dh_off, state_offset),
        _reduce(dy_off, y_offset),
    )


def _contig(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.contiguous() if t is not None else None


class SelectiveScanFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, state_offset, y_offset,
        return_final_state,
    ):  # fmt: skip
        # the backward must use the forward's configuration even if CONFIG_OVERRIDE changes in between
        ctx.cfg = _config(u.shape[1], A.shape[1], u.shape[2])
        y, ht, h_ckpt, y_pre = selective_scan_fwd(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, state_offset, y_offset,
            output_final_state=return_final_state, store_checkpoints=True, cfg=ctx.cfg,
        )  # fmt: skip
        ctx.save_for_backward(
            u, delta, A, B, C, D, z, delta_bias, initial_state, state_offset, y_offset, h_ckpt, y_pre
        )  # fmt: skip
        ctx.delta_softplus = delta_softplus
        ctx.set_materialize_grads(False)
        return (y, ht) if return_final_state else y

    @staticmethod
    def backward(ctx, dy, dht=None):
        u, delta, A, B, C, D, z, delta_bias, initial_state, state_offset, y_offset, h_ckpt, y_pre = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(u)
        grads = selective_scan_bwd(
            dy.contiguous(), _contig(dht), u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus,
            initial_state, state_offset, y_offset, h_ckpt, y_pre, cfg=ctx.cfg,
        )  # fmt: skip
        du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dh0, dh_off, dy_off = grads
        return du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, None, dh0, dh_off, dy_off, None


@torch.compiler.disable
def selective_scan_triton(
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
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fused Mamba-1 selective scan (Triton), forward and backward.

    Args:
        u (torch.Tensor): shape [B, D, L], fp32/bf16/fp16
        delta (torch.Tensor): shape [B, D, L]
        A (torch.Tensor): shape [D, N], N <= 256
        B (torch.Tensor): shape [B, N, L]
        C (torch.Tensor): shape [B, N, L]
        D (torch.Tensor | None): shape [D]
        z (torch.Tensor | None): shape [B, D, L], gate: y · silu(z)
        delta_bias (torch.Tensor | None): shape [D]
        delta_softplus (bool): Δ = softplus(delta + delta_bias)
        initial_state (torch.Tensor | None): h_0, shape [D, N] or [B, D, N]
        state_offset (torch.Tensor | None): h', shape [D, N] or [B, D, N]
        y_offset (torch.Tensor | None): y', shape [D] or [B, D]
        return_final_state (bool): also return h_L
    Returns:
        y [B, D, L] in u's dtype, and h_L [B, D, N] in fp32 when ``return_final_state``.
    """
    if A.shape[1] > 256:
        raise ValueError(f"selective_scan_triton: state size N must be <= 256, got {A.shape[1]}")
    args = [_contig(t) for t in (u, delta, A, B, C, D, z, delta_bias, initial_state, state_offset, y_offset)]
    u, delta, A, B, C, D, z, delta_bias, initial_state, state_offset, y_offset = args
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args):
        return SelectiveScanFunction.apply(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, state_offset, y_offset,
            return_final_state,
        )  # fmt: skip
    y, ht, _, _ = selective_scan_fwd(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, state_offset, y_offset,
        output_final_state=return_final_state, store_checkpoints=False,
    )  # fmt: skip
    return (y, ht) if return_final_state else y


@torch.compiler.disable
def selective_state_update_triton(
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
) -> torch.Tensor:
    """One decode step (Triton); ``state`` is updated in place with the un-offset state. No autograd.

    Args:
        state (torch.Tensor): shape [B, D, N], contiguous, updated in place
        x (torch.Tensor): shape [B, D]
        dt (torch.Tensor): shape [B, D]
        A (torch.Tensor): shape [D, N]
        B (torch.Tensor): shape [B, N]
        C (torch.Tensor): shape [B, N]
        D (torch.Tensor | None): shape [D]
        z (torch.Tensor | None): shape [B, D]
        dt_bias (torch.Tensor | None): shape [D]
        state_offset (torch.Tensor | None): h', shape [D, N] or [B, D, N]
        y_offset (torch.Tensor | None): y', shape [D] or [B, D]
    Returns:
        y [B, D] in x's dtype.
    """
    if not state.is_contiguous():
        raise ValueError(f"selective_state_update_triton: state must be contiguous, got strides {state.stride()}")
    batch, dim = x.shape
    dstate = A.shape[1]
    x, dt, A, B, C, D, z, dt_bias, state_offset, y_offset = [
        _contig(t) for t in (x, dt, A, B, C, D, z, dt_bias, state_offset, y_offset)
    ]
    y = torch.empty_like(x)  # [B, D]
    block_n = triton.next_power_of_2(dstate)
    block_d = min(triton.next_power_of_2(dim), max(1, 2048 // block_n))
    grid = (triton.cdiv(dim, block_d), batch)
    selective_state_update_fwd_kernel[grid](
        state, x, dt, A, B, C, D, z, dt_bias, state_offset, y_offset, y,
        _batch_stride(state_offset, 3), _batch_stride(y_offset, 2),
        DIM=dim, N=dstate, DT_SOFTPLUS=dt_softplus, BLOCK_D=block_d, BLOCK_N=block_n,
    )  # fmt: skip
    return y
