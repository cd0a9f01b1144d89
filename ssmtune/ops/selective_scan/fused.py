"""Mamba-1 (S6) selective scan in Triton: fused forward and backward with initial state and state offsets.

Semantics are those of ``selective_scan_ref`` / ``selective_state_update_ref`` in ``naive.py``
(docs/methods.md §2, §4.1-4.3, §8.1); design notes and measurements are in ``docs/kernels.md``.

One program owns one batch row and a block of BLOCK_D channels. It walks the sequence in [BLOCK_D, BLOCK_L] time tiles
and, inside a tile, loops over the N states (mamba_ssm's order of work): per state, the recurrence
h_t = Ā_t h_{t-1} + B̄_t u_t is one ``tl.associative_scan`` along time, seeded with the state carried from the previous
tile, and C_t (h_t + h') is added to y. The carried states go through a small fp32 scratch [B, D, 2, N] (double-buffered
by tile parity, one barrier per tile). With gradients, the forward stores the state every BLOCK_L_BWD steps (the
backward's tile, shorter than the forward's); the backward walks its tiles in reverse, recomputes h_n inside a tile from
that checkpoint and runs the adjoint recurrence λ_t = Ā_{t+1} λ_{t+1} + ĝ_t C_t per state as a forward scan over inputs
loaded in reversed time order, then one ``tl.gather`` puts λ back in time order. State-offset (h) stays out of the
backward kernel: its gradient dh' = Σ_t ĝ_t C_tᵀ and C's term h'ᵀ ĝ_t are two small GEMMs per tile of the gated dy ĝ
in ``state_offset_grad_kernel``, after it (the cross-lane reduction per state and tile that it replaces cost
more).

Packed rows (``resets``, a constexpr HAS_RESETS: without them the kernels compile as before): a step that restarts its
row is the scan pair (0, Ā_t h_0 + B̄_t u_t) inside the tile (README.md); in the backward the adjoint's Ā one step before
a restart is 0 and ∂L/∂h_0 gains Ā_t λ_t there.

Time loops are ``while`` loops with a runtime bound, which the CPU interpreter (``TRITON_INTERPRET=1``) accepts, unlike
``range`` over a runtime bound (triton 3.6). L is specialised on divisibility by 16 (vectorised loads): two compiled
kernels per configuration cover every length.

Removed after GPU sweeps (B 8, L 2048, D 1536, N 16, bf16, fwd / fwd+bwd ms; docs/kernels.md):
- H100, 2026-11-23, against these kernels' predecessors (0.788 / 3.282): the earlier tile kernels, all N states scanned
  at once in a [BLOCK_D, N, BLOCK_L] tile (1.249 / 4.900 at their default, 1.49-1.67 / 8.3-8.7 with other tiles), and
  state loops unrolled with ``tl.static_range`` (forward unrolled 0.972 / 3.490, both 0.973 / 7.702);
- H200, 2026-12-02: carried states in a register tile read and written through cross-lane reductions
  (0.648 / 2.707 with L specialised, against 0.542 / 2.069 through the scratch at the same 128-step tiles), and the
  adjoint as ``associative_scan(reverse=True)``, which triton 3.6 lowers with flips of both operands (3.813 against
  2.069 ms fwd+bwd).

The launch configuration (tile lengths, channels per program, warps) has measured defaults (``_config``); the
``config`` argument of ``selective_scan_triton`` overrides them, for tuning on other hardware.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ssmtune.ops import launch, layout, varlen

LOG2E = tl.constexpr(1.4426950408889634)
RESET_ALIGN = tl.constexpr(varlen.RESET_ALIGN)  # packed rows: a sequence starts at a multiple of it (varlen.py)

# Keys of the ``config`` override (another key raises ValueError). BLOCK_L and BLOCK_D_* must be powers of two.
CONFIG_KEYS = ("BLOCK_L", "BLOCK_D_FWD", "BLOCK_D_BWD", "WARPS_FWD", "WARPS_BWD", "BLOCK_L_BWD")


@triton.jit
def _scan_combine(a_l, b_l, a_r, b_r):
    # (a_l, b_l) is the earlier step: h = a_r * (a_l * h0 + b_l) + b_r
    return a_l * a_r, b_r + a_r * b_l


@triton.jit
def _softplus(x):
    # torch.nn.functional.softplus with threshold 20
    return tl.where(x <= 20.0, tl.log(1.0 + tl.exp(x)), x)


@triton.jit
def _reset_flags(resets, i_b, NR, o_t, L):
    """[BLOCK_L] True at the positions o_t whose step reads the row's initial state (a flag at position 0 changes
    nothing and is left out, so that the row start stays the one place the carried-in state enters)."""
    m_r = (o_t % RESET_ALIGN == 0) & (o_t > 0) & (o_t < L)
    return tl.load(resets + i_b * NR + o_t // RESET_ALIGN, mask=m_r, other=0) != 0


@triton.jit
def _reset_pairs(b_a, b_x, b_rst, h0, off_h0, i_n, o_d, m_d, N: tl.constexpr, USE_INITIAL_STATE: tl.constexpr):
    """A flagged step h_t = Ā_t h_0 + B̄_t u_t as the scan pair (0, Ā_t h_0 + B̄_t u_t): it forgets the state before."""
    if USE_INITIAL_STATE:
        b_h0n = tl.load(h0 + off_h0 + o_d * N + i_n, mask=m_d, other=0.0).to(tl.float32)  # [BLOCK_D]
        b_x = tl.where(b_rst[None, :], b_x + b_a * b_h0n[:, None], b_x)
    return tl.where(b_rst[None, :], 0.0, b_a), b_x


@triton.jit
def _fwd_nloop_state(
    i_n, b_y, b_dt, b_dtu, b_Bn, b_Cn, A, h_off, h_ckpt, p_cin, p_cout, p_ck, o_d, o_l, o_t, m_d, off_hoff, L,
    b_rst, h0, off_h0, N: tl.constexpr, BLOCK_L: tl.constexpr, CKPT_L: tl.constexpr, USE_STATE_OFFSET: tl.constexpr,
    STORE_CHECKPOINTS: tl.constexpr, HAS_RESETS: tl.constexpr, USE_INITIAL_STATE: tl.constexpr,
):  # fmt: skip
    """State n of one forward tile: scan h_n from the carried state, add C_n (h_n + h'_n) to y, pass the last h_n on."""
    b_An = tl.load(A + o_d * N + i_n, mask=m_d, other=0.0).to(tl.float32) * LOG2E  # [BLOCK_D]
    b_a = tl.exp2(b_dt * b_An[:, None])
    b_x = b_dtu * b_Bn.to(tl.float32)
    if HAS_RESETS:
        b_a, b_x = _reset_pairs(b_a, b_x, b_rst, h0, off_h0, i_n, o_d, m_d, N, USE_INITIAL_STATE)
    b_pA, b_hs = tl.associative_scan((b_a, b_x), axis=1, combine_fn=_scan_combine)
    # The carried state goes through the [B, D, 2, N] scratch (double-buffered by tile parity): a broadcast load and a
    # one-lane store, where reading and writing a register tile took two cross-lane reductions per state.
    b_hs += b_pA * tl.load(p_cin + o_d * 2 * N + i_n, mask=m_d, other=0.0)[:, None]
    m_last = m_d[:, None] & (o_l[None, :] == BLOCK_L - 1)
    tl.store(p_cout + (o_d * 2 * N + i_n)[:, None] + 0 * o_l[None, :], b_hs, mask=m_last)
    if STORE_CHECKPOINTS and BLOCK_L > CKPT_L:
        # the backward's tiles are shorter: store the states at their starts inside this tile (the slot at the tile's
        # own start is written from the scratch by the caller)
        m_ck = ((o_l % CKPT_L) == CKPT_L - 1) & (o_l < BLOCK_L - 1) & (o_t + 1 < L)
        tl.store(h_ckpt + p_ck + ((o_l // CKPT_L + 1) * N + i_n)[None, :], b_hs, mask=m_d[:, None] & m_ck[None, :])
    if USE_STATE_OFFSET:
        b_hs += tl.load(h_off + off_hoff + o_d * N + i_n, mask=m_d, other=0.0)[:, None]
    b_y += b_hs * b_Cn.to(tl.float32)
    return b_y


@triton.jit
def _bwd_nloop_state(
    i_n, b_lB, b_lhA, b_dA_acc, b_dh0_acc, b_dt, b_dtn, b_dtu, b_g, b_gr, b_Bn, b_Cn, b_rst, b_rstn, h0, off_h0,
    A, h_start, dB, dC, p_bc, p_cin, p_cout, o_t, m_t, o_d, o_n, o_l, m_d, L, N: tl.constexpr, BLOCK_L: tl.constexpr,
    HAS_RESETS: tl.constexpr, USE_INITIAL_STATE: tl.constexpr, STORE_INITIAL_STATE_GRADIENT: tl.constexpr,
):  # fmt: skip
    """State n of one backward tile: recompute h_n, run the adjoint λ_n, accumulate the local gradients."""
    m_sel = (o_n == i_n)[None, :]
    b_An = tl.load(A + o_d * N + i_n, mask=m_d, other=0.0).to(tl.float32)  # [BLOCK_D]
    b_An2 = b_An * LOG2E
    b_h = tl.load(h_start + i_n, mask=m_d, other=0.0)  # [BLOCK_D] state before the tile
    # 1. recompute h_n inside the tile
    b_dBu = b_dtu * b_Bn
    b_a = tl.exp2(b_dt * b_An2[:, None])
    if HAS_RESETS:
        # packed rows: the forward's pairs; h_t - B̄_t u_t below is then Ā_t h_0 at a restart, as the local gradients
        # of Ā_t there need
        b_as, b_xs = _reset_pairs(b_a, b_dBu, b_rst, h0, off_h0, i_n, o_d, m_d, N, USE_INITIAL_STATE)
    else:
        b_as, b_xs = b_a, b_dBu
    b_pA, b_hs = tl.associative_scan((b_as, b_xs), axis=1, combine_fn=_scan_combine)
    b_hs += b_pA * b_h[:, None]
    # 2. adjoint λ_t = Ā_{t+1} λ_{t+1} + ĝ_t C_t, carried in from the tile to the right. Its inputs (Δ_{t+1}, ĝ, C)
    # come in reversed time order, so it is a forward scan, and one gather puts λ back in time order: triton 3.6
    # lowers reverse=True as flips of both operands before and after the scan, 5 shuffles per element each.
    b_mu = b_gr * b_Cn  # reversed
    b_ar = tl.exp2(b_dtn * b_An2[:, None])
    if HAS_RESETS:
        b_ar = tl.where(b_rstn[None, :], 0.0, b_ar)  # a restart at t + 1 does not read h_t: λ_t gets nothing from it
    b_pAr, b_lams = tl.associative_scan((b_ar, b_mu), axis=1, combine_fn=_scan_combine)
    # λ carried through a scratch, as h in the forward
    b_lams += b_pAr * tl.load(p_cin + o_d * 2 * N + i_n, mask=m_d, other=0.0)[:, None]
    b_lams = tl.gather(b_lams, tl.broadcast_to((BLOCK_L - 1 - o_l)[None, :], b_lams.shape), axis=1)
    if HAS_RESETS and STORE_INITIAL_STATE_GRADIENT:
        # a restart at t reads h_0: ∂L/∂h_0 += Ā_t λ_t
        b_dh0_t = tl.sum(tl.where(b_rst[None, :], b_a * b_lams, 0.0), axis=1)
        b_dh0_acc = tl.where(m_sel, b_dh0_acc + b_dh0_t[:, None], b_dh0_acc)
    m_first = m_d[:, None] & (o_l[None, :] == 0)
    tl.store(p_cout + (o_d * 2 * N + i_n)[:, None] + 0 * o_l[None, :], b_lams, mask=m_first)
    # 3. local gradients; λ_t ⊙ Ā_t h_{t-1} = λ_t ⊙ (h_t - B̄_t u_t)
    b_term = b_lams * (b_hs - b_dBu)
    b_lB += b_lams * b_Bn
    b_lhA += b_term * b_An[:, None]
    b_dA_acc = tl.where(m_sel, b_dA_acc + tl.sum(b_term * b_dt, axis=1)[:, None], b_dA_acc)
    p_dbc = p_bc + i_n * L + o_t
    tl.atomic_add(dB + p_dbc, tl.sum(b_lams * b_dtu, axis=0), mask=m_t, sem="relaxed")
    tl.atomic_add(dC + p_dbc, tl.sum(b_hs * b_g, axis=0), mask=m_t, sem="relaxed")
    return b_lB, b_lhA, b_dA_acc, b_dh0_acc


# L is specialised (divisible by 16 or not): with 16-aligned rows the loads vectorise, which took the H200 forward
# from 0.787 to 0.648 ms; tile counts are not
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
        "HAS_RESETS": lambda args: args["resets"] is not None,
    }
)
@triton.jit(do_not_specialize=["NT", "NTC", "NR"])
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
    h_carry,
    resets,
    stride_h0_b,
    stride_hoff_b,
    stride_yoff_b,
    L,
    NT,
    NTC,
    NR,
    DIM,
    N: tl.constexpr,
    DELTA_SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
    CKPT_L: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_DELTA_BIAS: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
    USE_STATE_OFFSET: tl.constexpr,
    USE_Y_OFFSET: tl.constexpr,
    STORE_FINAL_STATE: tl.constexpr,
    STORE_CHECKPOINTS: tl.constexpr,
    STORE_Y_PRE: tl.constexpr,
    HAS_RESETS: tl.constexpr,
):
    # A [BLOCK_D, BLOCK_L] time tile and a loop over the N states, one scan along time per state (mamba_ssm's order).
    # The carried states live in the scratch h_carry [B, D, 2, N]; checkpoints (for the backward) every CKPT_L steps.
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
    p_ck = (i_b * DIM + o_d[:, None].to(tl.int64)) * NTC * N  # [BLOCK_D, 1] row starts in [B, D, NTC, N]
    p_carry = h_carry + i_b * DIM * 2 * N  # [D, 2, N] of this batch row
    o_c = o_d[:, None] * 2 * N + o_n[None, :]  # [BLOCK_D, BLOCK_N] in p_carry
    tl.store(p_carry + o_c, b_h, mask=m_dn)

    i_t = 0
    while i_t < NT:
        o_t = i_t * BLOCK_L + o_l
        m_t = o_t < L
        m_x = m_d[:, None] & m_t[None, :]
        p_cin = p_carry + (i_t % 2) * N
        p_cout = p_carry + ((i_t + 1) % 2) * N
        # the previous tile's one-lane stores must be visible to every lane (and warp) before they are read
        tl.debug_barrier()
        p_ck_t = p_ck + i_t * (BLOCK_L // CKPT_L) * N  # this tile's first checkpoint slot
        if STORE_CHECKPOINTS:
            tl.store(h_ckpt + p_ck_t + o_n[None, :], tl.load(p_cin + o_c, mask=m_dn, other=0.0), mask=m_dn)
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
        b_rst = None
        if HAS_RESETS:
            b_rst = _reset_flags(resets, i_b, NR, o_t, L)  # packed rows: the restarts inside this tile
        # B_n, C_n of the next state are loaded before the current one is used, so the loads overlap the scan
        b_Bn = tl.load(B + p_bc + o_t[None, :], mask=m_t[None, :], other=0.0)
        b_Cn = tl.load(C + p_bc + o_t[None, :], mask=m_t[None, :], other=0.0)
        for i_n in range(N):
            m_next = m_t[None, :] & (i_n + 1 < N)
            b_Bx = tl.load(B + p_bc + (i_n + 1) * L + o_t[None, :], mask=m_next, other=0.0)
            b_Cx = tl.load(C + p_bc + (i_n + 1) * L + o_t[None, :], mask=m_next, other=0.0)
            b_y = _fwd_nloop_state(
                i_n, b_y, b_dt, b_dtu, b_Bn, b_Cn, A, h_off, h_ckpt, p_cin, p_cout, p_ck_t, o_d, o_l, o_t, m_d,
                i_b * stride_hoff_b, L, b_rst, h0, i_b * stride_h0_b, N, BLOCK_L, CKPT_L, USE_STATE_OFFSET,
                STORE_CHECKPOINTS, HAS_RESETS, USE_INITIAL_STATE,
            )  # fmt: skip
            b_Bn, b_Cn = b_Bx, b_Cx
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
        tl.debug_barrier()
        tl.store(ht + i_b * DIM * N + o_dn, tl.load(p_carry + (NT % 2) * N + o_c, mask=m_dn, other=0.0), mask=m_dn)


@triton.heuristics(
    {
        "HAS_D": lambda args: args["D"] is not None,
        "HAS_Z": lambda args: args["z"] is not None,
        "HAS_DELTA_BIAS": lambda args: args["delta_bias"] is not None,
        "USE_Y_OFFSET": lambda args: args["y_off"] is not None,
        "USE_FINAL_STATE_GRADIENT": lambda args: args["dht"] is not None,
        "STORE_INITIAL_STATE_GRADIENT": lambda args: args["dh0"] is not None,
        "HAS_RESETS": lambda args: args["resets"] is not None,
        "USE_INITIAL_STATE": lambda args: args["h0"] is not None,
    }
)
@triton.jit(do_not_specialize=["NT", "NR"])
def selective_scan_bwd_nloop_kernel(
    u,
    delta,
    A,
    B,
    C,
    D,
    z,
    delta_bias,
    y_off,
    h_ckpt,
    y_pre,
    dy,
    dht,
    lam_carry,
    resets,
    h0,
    du,
    ddelta,
    dA,
    dB,
    dC,
    dD,
    dz,
    ddelta_bias,
    dh0,
    dy_off,
    stride_yoff_b,
    stride_h0_b,
    L,
    NT,
    NR,
    DIM,
    N: tl.constexpr,
    DELTA_SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_DELTA_BIAS: tl.constexpr,
    USE_Y_OFFSET: tl.constexpr,
    USE_FINAL_STATE_GRADIENT: tl.constexpr,
    STORE_INITIAL_STATE_GRADIENT: tl.constexpr,
    HAS_RESETS: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
):
    # Backward of selective_scan_fwd_nloop_kernel: tiles in reverse, and per tile a loop over the N states that
    # recomputes h_n from the checkpoint and runs the adjoint λ_n as a reverse scan (formulas: docs/kernels.md).
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
    b_dh0_acc = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)  # the restarts' terms of ∂L/∂h_0 (packed rows)
    b_dD_acc = tl.zeros([BLOCK_D, BLOCK_L], dtype=tl.float32)
    b_dyoff_acc = tl.zeros([BLOCK_D, BLOCK_L], dtype=tl.float32)
    b_ddb_acc = tl.zeros([BLOCK_D, BLOCK_L], dtype=tl.float32)

    p_x = i_b * DIM * L + o_d[:, None].to(tl.int64) * L  # [BLOCK_D, 1]
    p_bc = i_b * N * L
    p_ck = ((i_b * DIM + o_d.to(tl.int64)) * NT) * N  # [BLOCK_D]
    p_carry = lam_carry + i_b * DIM * 2 * N  # λ's scratch [D, 2, N] of this batch row (as h's in the forward)
    o_c = o_d[:, None] * 2 * N + o_n[None, :]
    tl.store(p_carry + o_c, b_lam, mask=m_dn)

    i_t = NT - 1
    while i_t >= 0:
        o_t = i_t * BLOCK_L + o_l
        m_t = o_t < L
        m_x = m_d[:, None] & m_t[None, :]
        p_cin = p_carry + ((NT - 1 - i_t) % 2) * N
        p_cout = p_carry + ((NT - i_t) % 2) * N
        tl.debug_barrier()  # the previous tile's one-lane stores, visible to every lane
        b_u = tl.load(u + p_x + o_t[None, :], mask=m_x, other=0.0).to(tl.float32)  # [BLOCK_D, BLOCK_L]
        b_dtr = tl.load(delta + p_x + o_t[None, :], mask=m_x, other=0.0).to(tl.float32)
        if HAS_DELTA_BIAS:
            b_dtr += b_db[:, None]
        if DELTA_SOFTPLUS:
            b_dt = tl.where(m_x, _softplus(b_dtr), 0.0)
        else:
            b_dt = tl.where(m_x, b_dtr, 0.0)
        # the adjoint's inputs (Δ_{t+1}, ĝ, C) in reversed time order
        o_tr = i_t * BLOCK_L + (BLOCK_L - 1 - o_l)
        m_tr = o_tr < L
        # Δ one step ahead, for Ā_{t+1} in the adjoint (0 past the end: Ā = 1)
        m_xn = m_d[:, None] & (o_tr[None, :] + 1 < L)
        b_dtn = tl.load(delta + p_x + o_tr[None, :] + 1, mask=m_xn, other=0.0).to(tl.float32)
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
        b_gr = tl.gather(b_g, tl.broadcast_to((BLOCK_L - 1 - o_l)[None, :], b_g.shape), axis=1)
        b_dtu = b_dt * b_u
        b_lB = tl.zeros([BLOCK_D, BLOCK_L], dtype=tl.float32)  # Σ_n λ_n B_n
        b_lhA = tl.zeros([BLOCK_D, BLOCK_L], dtype=tl.float32)  # Σ_n A_n λ_n (h_n - B̄_n u)
        b_rst, b_rstn = None, None
        if HAS_RESETS:
            # the restarts in the tile, in time order, and one step ahead in reversed order (for Ā_{t+1})
            b_rst = _reset_flags(resets, i_b, NR, o_t, L)
            b_rstn = _reset_flags(resets, i_b, NR, o_tr + 1, L)
        p_ck_t = p_ck + i_t * N
        b_Bx = tl.load(B + p_bc + o_t[None, :], mask=m_t[None, :], other=0.0)
        b_Cx = tl.load(C + p_bc + o_tr[None, :], mask=m_tr[None, :], other=0.0)
        for i_n in range(N):
            b_Bn, b_Cn = b_Bx.to(tl.float32), b_Cx.to(tl.float32)
            # prefetch the next state's B_n, C_n (see the forward)
            m_next = i_n + 1 < N
            b_Bx = tl.load(B + p_bc + (i_n + 1) * L + o_t[None, :], mask=m_t[None, :] & m_next, other=0.0)
            b_Cx = tl.load(C + p_bc + (i_n + 1) * L + o_tr[None, :], mask=m_tr[None, :] & m_next, other=0.0)
            b_lB, b_lhA, b_dA_acc, b_dh0_acc = _bwd_nloop_state(
                i_n, b_lB, b_lhA, b_dA_acc, b_dh0_acc, b_dt, b_dtn, b_dtu, b_g, b_gr, b_Bn, b_Cn, b_rst, b_rstn,
                h0, i_b * stride_h0_b, A, h_ckpt + p_ck_t, dB, dC, p_bc, p_cin, p_cout, o_t, m_t, o_d, o_n, o_l, m_d,
                L, N, BLOCK_L, HAS_RESETS, USE_INITIAL_STATE, STORE_INITIAL_STATE_GRADIENT,
            )  # fmt: skip
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
        # ∂L/∂h_0 = Ā_1 ⊙ λ_1 (docs/methods.md §8.1); Ā_1 = 1 when L = 0
        tl.debug_barrier()
        b_lam = tl.load(p_carry + (NT % 2) * N + o_c, mask=m_dn, other=0.0)  # λ_1
        b_A2 = tl.load(A + o_dn, mask=m_dn, other=0.0).to(tl.float32) * LOG2E
        m_d0 = (m_d & (tl.zeros_like(o_d) < L))[:, None]
        b_dt0 = tl.load(delta + p_x, mask=m_d0, other=0.0).to(tl.float32)  # [BLOCK_D, 1]
        if HAS_DELTA_BIAS:
            b_dt0 += b_db[:, None]
        if DELTA_SOFTPLUS:
            b_dt0 = _softplus(b_dt0)
        b_dt0 = tl.where(m_d0, b_dt0, 0.0)
        b_dh0 = tl.exp2(b_dt0 * b_A2) * b_lam
        if HAS_RESETS:
            b_dh0 += b_dh0_acc
        tl.store(dh0 + i_b * DIM * N + o_dn, b_dh0, mask=m_dn)
    if HAS_D:
        tl.store(dD + i_b * DIM + o_d, tl.sum(b_dD_acc, axis=1), mask=m_d)
    if USE_Y_OFFSET:
        tl.store(dy_off + i_b * DIM + o_d, tl.sum(b_dyoff_acc, axis=1), mask=m_d)
    if HAS_DELTA_BIAS:
        tl.store(ddelta_bias + i_b * DIM + o_d, tl.sum(b_ddb_acc, axis=1), mask=m_d)


@triton.heuristics({"HAS_Z": lambda args: args["z"] is not None})
@triton.jit(do_not_specialize=["D_SPLIT"])
def state_offset_grad_kernel(
    dy,
    z,
    C,
    h_off,
    dh_part,
    dC,
    stride_hoff_b,
    L,
    DIM,
    D_SPLIT,
    N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
    HAS_Z: tl.constexpr,
    DC_TF32: tl.constexpr,
):
    # State-offset (h)'s terms of the backward (y_t = C_t (h_t + h')), two small GEMMs per [BLOCK_D, BLOCK_L] tile of
    # the gated dy ĝ, recomputed from dy and z as the backward kernel computes it (no stored copy). One program owns
    # BLOCK_L steps of one batch row and D_SPLIT channels, BLOCK_D at a time: dh' = Σ_t ĝ_t C_tᵀ is this tile's
    # partial sum per channel block, stored to dh_part [L tiles, B, D, N] and summed after in a fixed order, and C's
    # term h'ᵀ ĝ_t, summed over the program's channels in registers, goes to dC by one fp32 atomic add per element
    # (channel splits share dC, as the backward kernel's channel blocks do). tf32x3 dots: fp32 accuracy on tensor
    # cores (a bf16 ĝ lost it). DC_TF32 (bf16 C): C's term in one tf32 pass, since dC is rounded to bf16,
    # which keeps 8 significant bits to tf32's 11 (H200: the kernel 0.117 -> 0.088 ms). dh' stays tf32x3.
    i_l, i_b, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = i_b.to(tl.int64)
    o_t = i_l * BLOCK_L + tl.arange(0, BLOCK_L)
    o_n = tl.arange(0, BLOCK_N)
    o_k = tl.arange(0, BLOCK_D)
    m_t = o_t < L
    m_n = o_n < N
    m_c = m_n[:, None] & m_t[None, :]
    p_c = i_b * N * L + o_n[:, None] * L + o_t[None, :]  # [BLOCK_N, BLOCK_L] in [B, N, L]
    b_CT = tl.trans(tl.load(C + p_c, mask=m_c, other=0.0).to(tl.float32))  # [BLOCK_L, BLOCK_N]
    b_dc = tl.zeros([BLOCK_N, BLOCK_L], dtype=tl.float32)
    p_h = h_off + i_b * stride_hoff_b + o_k[:, None] * N + o_n[None, :]  # [BLOCK_D, BLOCK_N] of channel block 0
    p_part = dh_part + (i_l * tl.num_programs(1) + i_b) * DIM * N + o_k[:, None] * N + o_n[None, :]
    p_x = i_b * DIM * L + o_k[:, None].to(tl.int64) * L + o_t[None, :]  # [BLOCK_D, BLOCK_L] in [B, D, L]
    i_d = i_s * D_SPLIT
    d_end = tl.minimum(i_d + D_SPLIT, DIM)
    # the next channel block's dy and z are loaded before this one's dots, so the loads overlap them
    m_x = ((i_d + o_k) < d_end)[:, None] & m_t[None, :]
    b_dyx = tl.load(dy + p_x + i_d * L, mask=m_x, other=0.0)
    if HAS_Z:
        b_zx = tl.load(z + p_x + i_d * L, mask=m_x, other=0.0)
    while i_d < d_end:
        b_g = b_dyx.to(tl.float32)
        if HAS_Z:
            b_z = b_zx.to(tl.float32)
            b_g = b_g * b_z * tl.sigmoid(b_z)
        m_x = ((i_d + BLOCK_D + o_k) < d_end)[:, None] & m_t[None, :]
        b_dyx = tl.load(dy + p_x + (i_d + BLOCK_D) * L, mask=m_x, other=0.0)
        if HAS_Z:
            b_zx = tl.load(z + p_x + (i_d + BLOCK_D) * L, mask=m_x, other=0.0)
        m_dn = ((i_d + o_k) < d_end)[:, None] & m_n[None, :]
        b_h = tl.load(p_h + i_d * N, mask=m_dn, other=0.0).to(tl.float32)  # [BLOCK_D, BLOCK_N]
        if DC_TF32:
            b_dc += tl.dot(tl.trans(b_h), b_g, input_precision="tf32")
        else:
            b_dc += tl.dot(tl.trans(b_h), b_g, input_precision="tf32x3")
        tl.store(p_part + i_d * N, tl.dot(b_g, b_CT, input_precision="tf32x3"), mask=m_dn)
        i_d += BLOCK_D
    tl.atomic_add(dC + p_c, b_dc, mask=m_c, sem="relaxed")


@triton.heuristics(
    {
        "HAS_D": lambda args: args["D"] is not None,
        "HAS_Z": lambda args: args["z"] is not None,
        "HAS_DT_BIAS": lambda args: args["dt_bias"] is not None,
        "USE_STATE_OFFSET": lambda args: args["h_off"] is not None,
        "USE_Y_OFFSET": lambda args: args["y_off"] is not None,
        "HAS_OFF_IDX": lambda args: args["off_idx"] is not None,
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
    off_idx,
    y,
    stride_x_b,
    stride_dt_b,
    stride_B_b,
    stride_C_b,
    stride_z_b,
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
    HAS_OFF_IDX: tl.constexpr,
    A_IS_LOG: tl.constexpr,
):
    i_d, i_b = tl.program_id(0), tl.program_id(1)
    i_b = i_b.to(tl.int64)
    # the row of the per-row offsets: the batch row, or its entry in the offset table (rows sharing an adapter read
    # the same entry, from cache)
    i_o = i_b
    if HAS_OFF_IDX:
        i_o = tl.load(off_idx + i_b).to(tl.int64)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    o_n = tl.arange(0, BLOCK_N)
    m_d = o_d < DIM
    m_n = o_n < N
    m_dn = m_d[:, None] & m_n[None, :]
    o_dn = o_d[:, None] * N + o_n[None, :]
    p_s = state + i_b * DIM * N + o_dn

    b_s = tl.load(p_s, mask=m_dn, other=0.0).to(tl.float32)  # [BLOCK_D, BLOCK_N]
    b_x = tl.load(x + i_b * stride_x_b + o_d, mask=m_d, other=0.0).to(tl.float32)  # [BLOCK_D]
    b_dt = tl.load(dt + i_b * stride_dt_b + o_d, mask=m_d, other=0.0).to(tl.float32)
    if HAS_DT_BIAS:
        b_dt += tl.load(dt_bias + o_d, mask=m_d, other=0.0).to(tl.float32)
    if DT_SOFTPLUS:
        b_dt = _softplus(b_dt)
    b_A = tl.load(A + o_dn, mask=m_dn, other=0.0).to(tl.float32)
    if A_IS_LOG:
        b_A = -tl.exp(b_A)
    b_B = tl.load(B + i_b * stride_B_b + o_n, mask=m_n, other=0.0).to(tl.float32)  # [BLOCK_N]
    b_C = tl.load(C + i_b * stride_C_b + o_n, mask=m_n, other=0.0).to(tl.float32)
    b_s = tl.exp(b_dt[:, None] * b_A) * b_s + (b_dt * b_x)[:, None] * b_B[None, :]
    tl.store(p_s, b_s.to(state.dtype.element_ty), mask=m_dn)
    # the cache keeps the un-offset state; h' only enters the read-out
    if USE_STATE_OFFSET:
        b_s += tl.load(h_off + i_o * stride_hoff_b + o_dn, mask=m_dn, other=0.0).to(tl.float32)
    b_y = tl.sum(b_s * b_C[None, :], axis=1)  # [BLOCK_D]
    if HAS_D:
        b_y += tl.load(D + o_d, mask=m_d, other=0.0).to(tl.float32) * b_x
    if USE_Y_OFFSET:
        b_y += tl.load(y_off + i_o * stride_yoff_b + o_d, mask=m_d, other=0.0).to(tl.float32)
    if HAS_Z:
        b_z = tl.load(z + i_b * stride_z_b + o_d, mask=m_d, other=0.0).to(tl.float32)
        b_y = b_y * b_z * tl.sigmoid(b_z)
    tl.store(y + i_b * DIM + o_d, b_y.to(y.dtype.element_ty), mask=m_d)


def _config(
    dim: int, dstate: int, seqlen: int = 1 << 30, training: bool = True, override: dict[str, int] | None = None
) -> dict[str, int]:
    """Launch configuration: the defaults below, then ``override`` (keys ``CONFIG_KEYS``). ``training``: the
    forward stores checkpoints for a backward (``False``: an inference forward, which takes longer tiles)."""
    override = override or {}
    unknown = sorted(set(override) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"selective scan config: unknown key(s) {unknown}; allowed keys: {', '.join(CONFIG_KEYS)}")
    cap = triton.next_power_of_2(max(dim, 1))
    # BLOCK_L (forward tile) and BLOCK_L_BWD (backward tile = checkpoint spacing): the sequence rounded up to a power of
    # two, capped; BLOCK_L_BWD <= BLOCK_L. H200 sweeps (docs/kernels.md), B 8, L 2048, D 1536:
    # the inference forward is fastest with 512-step tiles (0.388 ms; 0.433 at 256, 0.541 at 128), a training forward
    # (which also stores a checkpoint every BLOCK_L_BWD steps) with 256 (fwd+bwd 1.98 ms; 2.06 at 512), the backward
    # with 128-step tiles and two channels per program; one warp each.
    seq = max(16, triton.next_power_of_2(max(seqlen, 1)))
    block_l = min(override.get("BLOCK_L", 256 if training else 512), seq)
    cfg = {
        "BLOCK_N": triton.next_power_of_2(max(dstate, 1)),
        "BLOCK_L": block_l,
        "BLOCK_L_BWD": min(override.get("BLOCK_L_BWD", 128), block_l),
        "BLOCK_D_FWD": 1,
        "BLOCK_D_BWD": 2,
        "WARPS_FWD": 1,
        "WARPS_BWD": 1,
    }
    cfg.update({k: v for k, v in override.items() if k not in ("BLOCK_L", "BLOCK_L_BWD")})
    cfg["BLOCK_D_FWD"] = min(cap, cfg["BLOCK_D_FWD"])
    cfg["BLOCK_D_BWD"] = min(cap, cfg["BLOCK_D_BWD"])
    return cfg


def _reset_bytes(resets: torch.Tensor | None) -> torch.Tensor | None:
    """The kernels read the packed rows' bool flags [B, NR] as bytes (the same memory when contiguous)."""
    return None if resets is None else resets.contiguous().view(torch.uint8)


def _reset_stride(resets: torch.Tensor | None) -> int:
    """Flags per row (the row stride of the contiguous flags; 0 without them)."""
    return 0 if resets is None else resets.shape[1]


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
    resets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Launch the forward kernel. Returns y [B, D, L], h_L [B, D, N] (fp32) or None, checkpoints [B, D, NT, N] or
    None, and the pre-gate output [B, D, L] (with z and checkpoints only) or None. ``resets``: the packed rows' flags
    as a contiguous uint8 [B, ceil(L / RESET_ALIGN)] (``_reset_bytes``) or None."""
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    cfg = cfg or _config(dim, dstate, seqlen, training=store_checkpoints)
    nt = triton.cdiv(seqlen, cfg["BLOCK_L"])
    ntc = triton.cdiv(seqlen, cfg["BLOCK_L_BWD"])  # checkpoints: the state at the start of every backward tile
    f32 = {"device": u.device, "dtype": torch.float32}
    y = torch.empty_like(u)  # [B, D, L]
    ht = torch.empty(batch, dim, dstate, **f32) if output_final_state else None
    h_ckpt = torch.empty(batch, dim, ntc, dstate, **f32) if store_checkpoints else None
    grid = (triton.cdiv(dim, cfg["BLOCK_D_FWD"]), batch)
    common = {
        "DIM": dim, "N": dstate, "DELTA_SOFTPLUS": delta_softplus,
        "BLOCK_D": cfg["BLOCK_D_FWD"], "BLOCK_N": cfg["BLOCK_N"], "BLOCK_L": cfg["BLOCK_L"], "num_warps": cfg["WARPS_FWD"],
    }  # fmt: skip
    strides = (_batch_stride(initial_state, 3), _batch_stride(state_offset, 3), _batch_stride(y_offset, 2))
    y_pre = torch.empty_like(u) if (z is not None and store_checkpoints) else None
    h_carry = torch.empty(batch, dim, 2, dstate, **f32)  # the carried state, double-buffered by tile parity
    selective_scan_fwd_nloop_kernel[grid](
        u, delta, A, B, C, D, z, delta_bias, initial_state, state_offset, y_offset, y, y_pre, ht, h_ckpt, h_carry,
        resets, *strides, seqlen, nt, ntc, _reset_stride(resets), CKPT_L=cfg["BLOCK_L_BWD"], **common,
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
    resets: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """Launch the backward kernel and reduce the per-row gradients of shared parameters over the batch.
    ``cfg`` must be the forward's configuration (its checkpoints and saved tensors depend on it); ``resets`` the
    forward's (uint8, ``_reset_bytes``)."""
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    cfg = cfg or _config(dim, dstate, seqlen)
    nt = h_ckpt.shape[2]
    f32 = {"device": u.device, "dtype": torch.float32}
    du = torch.empty_like(u)  # [B, D, L]
    ddelta = torch.empty_like(delta)  # [B, D, L]
    dz = torch.empty_like(z) if z is not None else None
    dA = torch.empty(batch, dim, dstate, **f32)
    dD = torch.empty(batch, dim, **f32) if D is not None else None
    ddelta_bias = torch.empty(batch, dim, **f32) if delta_bias is not None else None
    dh0 = torch.empty(batch, dim, dstate, **f32) if initial_state is not None else None
    dy_off = torch.empty(batch, dim, **f32) if y_offset is not None else None
    grid = (triton.cdiv(dim, cfg["BLOCK_D_BWD"]), batch)
    common = {
        "DIM": dim, "N": dstate, "DELTA_SOFTPLUS": delta_softplus,
        "BLOCK_D": cfg["BLOCK_D_BWD"], "BLOCK_N": cfg["BLOCK_N"], "BLOCK_L": cfg["BLOCK_L_BWD"],
        "num_warps": cfg["WARPS_BWD"],
    }  # fmt: skip
    # summed over channel programs by fp32 atomic adds (the order is not fixed: dB/dC may differ in the last bits)
    dB = torch.zeros(batch, dstate, seqlen, **f32)
    dC = torch.zeros(batch, dstate, seqlen, **f32)
    lam_carry = torch.empty(batch, dim, 2, dstate, **f32)  # the carried adjoint, as h_carry in the forward
    selective_scan_bwd_nloop_kernel[grid](
        u, delta, A, B, C, D, z, delta_bias, y_offset, h_ckpt, y_pre, dy, dht, lam_carry,
        resets, initial_state if resets is not None else None,  # h_0 is read at the restarts only
        du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dh0, dy_off, _batch_stride(y_offset, 2),
        _batch_stride(initial_state, 3), seqlen, nt, _reset_stride(resets), **common,
    )  # fmt: skip

    # h' stays out of the backward kernel: its two terms are GEMMs after it
    dh_off = state_offset_grad(dy, z, C, state_offset, dC) if state_offset is not None else None

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


# state_offset_grad_kernel's launch: a program per BLOCK_L steps of a batch row and a split of the channels, which it
# walks BLOCK_D at a time; the channels are split so that about PROGRAMS programs run (small batches need the splits
# to fill the GPU; large ones get fewer, longer programs, which prefetch)
STATE_OFFSET_GRAD_CONFIG = {"BLOCK_D": 64, "BLOCK_L": 64, "WARPS": 4, "PROGRAMS": 1024}


def state_offset_grad(
    dy: torch.Tensor,
    z: torch.Tensor | None,
    C: torch.Tensor,
    state_offset: torch.Tensor,
    dC: torch.Tensor,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """State-offset (h)'s terms of the backward, which the backward kernel leaves out: returns dh' in fp32, shaped as
    ``state_offset`` ([D, N] shared: summed over the batch too; or [B, D, N]), and adds h'ᵀ ĝ_t to ``dC`` [B, N, L]
    (fp32) in place. ``dy``, ``z``, ``C`` are the scan's contiguous [B, *, L] operands; ``config`` overrides keys of
    ``STATE_OFFSET_GRAD_CONFIG``."""
    batch, dim, seqlen = dy.shape
    dstate = C.shape[1]
    cfg = {**STATE_OFFSET_GRAD_CONFIG, **(config or {})}
    block_l = min(cfg["BLOCK_L"], max(16, triton.next_power_of_2(seqlen)))  # tl.dot needs 16 rows and columns
    block_d = min(cfg["BLOCK_D"], max(16, triton.next_power_of_2(dim)))
    n_l = triton.cdiv(seqlen, block_l)
    dh_part = torch.empty(n_l, batch, dim, dstate, device=dy.device, dtype=torch.float32)
    # the partial sums over the L tiles, and over the batch for a shared h', in one reduction
    dims = (0, 1) if state_offset.dim() == 2 else 0
    if n_l == 0 or dim == 0:
        return dh_part.sum(dims)  # L = 0: zeros
    n_blocks = triton.cdiv(dim, block_d)
    n_split = max(1, min(n_blocks, cfg["PROGRAMS"] // (n_l * batch)))
    d_split = triton.cdiv(n_blocks, n_split) * block_d  # whole channel blocks per split
    state_offset_grad_kernel[(n_l, batch, triton.cdiv(dim, d_split))](
        dy, z, C, state_offset, dh_part, dC, _batch_stride(state_offset, 3), seqlen, dim, d_split, N=dstate,
        BLOCK_D=block_d, BLOCK_N=max(16, triton.next_power_of_2(dstate)), BLOCK_L=block_l,
        DC_TF32=C.dtype == torch.bfloat16, num_warps=cfg["WARPS"],
    )  # fmt: skip
    return dh_part.sum(dims)


def _contig(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.contiguous() if t is not None else None


class SelectiveScanFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, state_offset, y_offset,
        return_final_state, config, resets=None,
    ):  # fmt: skip
        # the backward uses the forward's configuration (its checkpoints and saved tensors depend on it)
        ctx.cfg = _config(u.shape[1], A.shape[1], u.shape[2], override=config)
        y, ht, h_ckpt, y_pre = selective_scan_fwd(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, state_offset, y_offset,
            output_final_state=return_final_state, store_checkpoints=True, cfg=ctx.cfg, resets=resets,
        )  # fmt: skip
        ctx.save_for_backward(
            u, delta, A, B, C, D, z, delta_bias, initial_state, state_offset, y_offset, h_ckpt, y_pre, resets
        )  # fmt: skip
        ctx.delta_softplus = delta_softplus
        ctx.set_materialize_grads(False)
        return (y, ht) if return_final_state else y

    @staticmethod
    def backward(ctx, dy, dht=None):
        saved = ctx.saved_tensors
        u, delta, A, B, C, D, z, delta_bias, initial_state, state_offset, y_offset, h_ckpt, y_pre, resets = saved
        if dy is None:
            dy = torch.zeros_like(u)
        grads = selective_scan_bwd(
            layout.contiguous_rows(dy), _contig(dht), u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus,
            initial_state, state_offset, y_offset, h_ckpt, y_pre, cfg=ctx.cfg, resets=resets,
        )  # fmt: skip
        du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dh0, dh_off, dy_off = grads
        return du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, None, dh0, dh_off, dy_off, None, None, None


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
    resets: torch.Tensor | None = None,
    config: dict[str, int] | None = None,
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
        resets (torch.Tensor | None): bool [B, ceil(L / RESET_ALIGN)], packed rows (``varlen.py``): where
            resets[b, r], the step at position r · RESET_ALIGN reads row b's initial state (zeros without one)
        config (dict | None): launch configuration overriding the defaults, keys ``CONFIG_KEYS``, e.g.
            ``{"BLOCK_L": 128, "WARPS_BWD": 2}`` (for tuning; results are the same up to rounding)
    Returns:
        y [B, D, L] in u's dtype, and h_L [B, D, N] in fp32 when ``return_final_state``.
    """
    if A.shape[1] > 256:
        raise ValueError(f"selective_scan_triton: state size N must be <= 256, got {A.shape[1]}")
    if resets is not None:
        varlen.check_resets("selective_scan_triton", resets, u.shape[0], u.shape[2])
        if resets.device != u.device:
            raise ValueError(f"selective_scan_triton: resets must be on {u.device}, got {resets.device}")
        resets = _reset_bytes(resets)
    args = (u, delta, A, B, C, D, z, delta_bias, initial_state, state_offset, y_offset)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args)
    # [B, *, L] operands that are time-major views (the mixer's) go through the tiled transpose, as do their gradients
    u, delta, B, C, z = (layout.channel_major(t) for t in (u, delta, B, C, z))
    A, D, delta_bias, initial_state, state_offset, y_offset = map(
        _contig, (A, D, delta_bias, initial_state, state_offset, y_offset)
    )
    if needs_grad:
        return SelectiveScanFunction.apply(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, state_offset, y_offset,
            return_final_state, config, resets,
        )  # fmt: skip
    cfg = _config(u.shape[1], A.shape[1], u.shape[2], training=False, override=config)
    y, ht, _, _ = selective_scan_fwd(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, state_offset, y_offset,
        output_final_state=return_final_state, store_checkpoints=False, cfg=cfg, resets=resets,
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
    offset_index: torch.Tensor | None = None,
    A_is_log: bool = False,
    tile: tuple[int, int] | None = None,
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
        offset_index (torch.Tensor | None): int32 [B]; per-row offsets are then tables [n, D, N] / [n, D] and row b
            reads entry ``offset_index[b]``
        A_is_log (bool): A holds A_log; the kernel uses A = -exp(A_log)
        tile (tuple[int, int] | None): (rows per program, warps); default ``launch.decode_tile``
    Returns:
        y [B, D] in x's dtype.
    """
    if not state.is_contiguous():
        raise ValueError(f"selective_state_update_triton: state must be contiguous, got strides {state.stride()}")
    batch, dim = x.shape
    dstate = A.shape[1]
    # the per-row inputs are read through their row stride: in a decode step they are column slices of the
    # projections (B_t, C_t of x_proj's output, z of in_proj's), which a copy per step would cost a kernel each
    x, dt, B, C, z = [layout.unit_last(t) for t in (x, dt, B, C, z)]
    A, D, dt_bias, state_offset, y_offset, offset_index = [
        _contig(t) for t in (A, D, dt_bias, state_offset, y_offset, offset_index)
    ]
    y = torch.empty(batch, dim, dtype=x.dtype, device=x.device)
    block_n = triton.next_power_of_2(dstate)
    block_d, warps = launch.decode_tile(dim, dstate, x.device) if tile is None else tile
    grid = (triton.cdiv(dim, block_d), batch)
    selective_state_update_fwd_kernel[grid](
        state, x, dt, A, B, C, D, z, dt_bias, state_offset, y_offset, offset_index, y,
        x.stride(0), dt.stride(0), B.stride(0), C.stride(0), 0 if z is None else z.stride(0),
        _batch_stride(state_offset, 3), _batch_stride(y_offset, 2),
        DIM=dim, N=dstate, DT_SOFTPLUS=dt_softplus, BLOCK_D=block_d, BLOCK_N=block_n, A_IS_LOG=A_is_log,
        num_warps=warps,
    )  # fmt: skip
    return y
