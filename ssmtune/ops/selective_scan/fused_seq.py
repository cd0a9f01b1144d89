"""Time-major sequential forward of the Mamba-1 selective scan (Triton), for inference: no gradients, N <= 16.

Opt-in: ``selective_scan_triton`` uses it when ``fused.SEQUENTIAL_FORWARD`` is set (``SSMTUNE_SEQUENTIAL_SCAN=1``).

The n-loop forward in ``fused.py`` reads [B, D, L]-contiguous tensors (coalesced along time), so the mixer has to copy
its time-major Δ, z, B, C ([B, L, ·] from the projections, viewed as [B, ·, L]) before every scan: 0.34 ms at
B 8, L 2048, D 1536 on an H200, 0.95 ms at D 4096, besides the n-loop's own 0.79 / 1.90 ms. This kernel reads any
strides and walks time one step at a time with the states of BLOCK_D channels in registers (one channel per lane, all
N states of a channel in one thread, so the read-out Σ_n C_n h_n needs no shuffle):

    h_t = exp(Δ_t A) h_{t-1} + Δ_t u_t B_t,    y_t = (Σ_n C_t,n (h_t,n + h'_n) + D u_t + y') · silu(z_t)

The inputs of step t + PF are loaded before step t is computed (PF 1 or 2): without that, every step waits for one
memory latency (from the sm_90 SASS). When there are too few (channel block, batch row)
programs to fill the GPU, time is cut into chunks of T steps: pass 1 runs every chunk from h = 0 and stores its end
state S_c and ΣΔ over the chunk; pass 2 starts chunk c from h0 folded through the earlier chunks,
h ← exp(A ΣΔ_j) h + S_j for j < c, and writes y. Twice the recurrence work for NC times the programs.

Measured on an H200 in the mixer's layout (bf16, B 8, L 2048, N 16, D, z, Δ bias and softplus;
``benchmarks/bench_scan_inference.py``): D 1536 0.62 ms against 1.11 ms for the copies + n-loop forward, D 4096 1.44
against 2.81, D 5120 1.55 against 3.42; mamba_ssm's CUDA scan on the same views 0.78 / 2.09 / 2.56 ms. There is no
backward: training keeps the n-loop kernels, whose checkpoints and saved pre-gate output this kernel does not write.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
MAX_DSTATE = 16  # all N states of a channel live in one thread's registers
# launch configuration; keys of CONFIG_OVERRIDE (tests and sweeps): BLOCK_D, K, WARPS, PF, CHUNK (0: one pass).
# h' was also timed loaded again at every step instead of held in registers: no gain, removed.
CONFIG_KEYS = ("BLOCK_D", "K", "WARPS", "PF", "CHUNK")
CONFIG_OVERRIDE: dict[str, int] = {}
IDX32_LIMIT = 2**31  # time offsets t * stride at or above this need 64-bit arithmetic


@triton.jit
def _softplus(x):
    return tl.where(x <= 20.0, tl.log(1.0 + tl.exp(x)), x)


@triton.jit
def _load_step(t, t_end, p_u, p_t, p_B, p_C, s_ul, s_tl, s_Bl, s_Cl, o_d, o_n, m_d, m_n):
    """u_t, Δ_t (before bias and softplus) of the block's channels and B_t, C_t, in the input dtype; zeros at t >= t_end."""
    m = m_d & ((o_d * 0 + t) < t_end)
    mn = m_n & ((o_n * 0 + t) < t_end)
    b_u = tl.load(p_u + t * s_ul, mask=m, other=0.0)
    b_dt = tl.load(p_t + t * s_tl, mask=m, other=0.0)
    return b_u, b_dt, tl.load(p_B + t * s_Bl, mask=mn, other=0.0), tl.load(p_C + t * s_Cl, mask=mn, other=0.0)


@triton.heuristics(
    {
        "HAS_D": lambda args: args["D"] is not None,
        "HAS_Z": lambda args: args["z"] is not None,
        "HAS_DELTA_BIAS": lambda args: args["delta_bias"] is not None,
        "USE_INITIAL_STATE": lambda args: args["h0_t"] is not None,
        "USE_STATE_OFFSET": lambda args: args["h_off_t"] is not None,
        "USE_Y_OFFSET": lambda args: args["y_off"] is not None,
        "STORE_FINAL_STATE": lambda args: args["ht"] is not None,
    }
)
@triton.jit(do_not_specialize=["L", "T", "NC"])
def selective_scan_fwd_seq_kernel(
    u, delta, A_t, B, C, D, z, delta_bias, h0_t, h_off_t, y_off, y, ht, S, G,
    s_ub, s_ud, s_ul, s_tb, s_td, s_tl, s_zb, s_zd, s_zl, s_Bb, s_Bn, s_Bl, s_Cb, s_Cn, s_Cl, s_yb, s_yd, s_yl,
    stride_h0_b, stride_hoff_b, stride_yoff_b, L, T, NC, DIM,
    N: tl.constexpr, DELTA_SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, K: tl.constexpr,
    PF: tl.constexpr, PASS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, USE_STATE_OFFSET: tl.constexpr, USE_Y_OFFSET: tl.constexpr,
    STORE_FINAL_STATE: tl.constexpr, IDX64: tl.constexpr,
):  # fmt: skip
    # PASS 0: the whole sequence in one program; PASS 1 / 2: the two launches of the chunked form (module docstring).
    # A, h0, h' and the final state are [.., N, D] (transposed on the host) so that every [BLOCK_D, BLOCK_N] tile has
    # D as its contiguous axis: the compiler then gives each lane one channel with all its states.
    i_d, i_b, i_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = i_b.to(tl.int64)
    # time offsets t * stride stay 32-bit unless they can overflow: 64-bit addresses for the 2 (N + 1) per-step loads
    # of up to two prefetched steps cost registers
    if IDX64:
        t_beg = i_c.to(tl.int64) * T
    else:
        t_beg = i_c * T
    t_end = tl.minimum(L, t_beg + T)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    o_n = tl.arange(0, BLOCK_N)
    o_k = tl.arange(0, K)
    m_d = o_d < DIM
    m_n = o_n < N
    m_dn = m_d[:, None] & m_n[None, :]
    o_nd = o_n[None, :] * DIM + o_d[:, None]  # [BLOCK_D, BLOCK_N] in an [N, D] matrix

    b_A = tl.load(A_t + o_nd, mask=m_dn, other=0.0) * LOG2E
    if PASS != 1:
        if HAS_D:
            b_D = tl.load(D + o_d, mask=m_d, other=0.0).to(tl.float32)
        if USE_STATE_OFFSET:
            b_hoff = tl.load(h_off_t + i_b * stride_hoff_b + o_nd, mask=m_dn, other=0.0).to(tl.float32)
        if USE_Y_OFFSET:
            b_yoff = tl.load(y_off + i_b * stride_yoff_b + o_d, mask=m_d, other=0.0).to(tl.float32)
    if HAS_DELTA_BIAS:
        b_db = tl.load(delta_bias + o_d, mask=m_d, other=0.0).to(tl.float32)
    if USE_INITIAL_STATE and PASS != 1:
        b_h = tl.load(h0_t + i_b * stride_h0_b + o_nd, mask=m_dn, other=0.0).to(tl.float32)
    else:
        b_h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    if PASS > 0:
        p_S = S + (i_b * NC * N + o_n[None, :]) * DIM + o_d[:, None]  # [B, NC, N, D] fp32
        p_G = G + i_b * NC * DIM + o_d  # [B, NC, D] fp32
    if PASS == 2:  # the state before this chunk: h0 folded through the earlier chunks
        j = 0
        while j < i_c:
            b_g = tl.load(p_G + j * DIM, mask=m_d, other=0.0)
            b_h = tl.exp2(b_g[:, None] * b_A) * b_h + tl.load(p_S + j * N * DIM, mask=m_dn, other=0.0)
            j += 1
    b_sdt = tl.zeros([BLOCK_D], dtype=tl.float32)
    o_dp = o_d.to(tl.int64) if IDX64 else o_d  # channel offsets o_d * stride, 64-bit with the time offsets
    p_u = u + i_b * s_ub + o_dp * s_ud
    p_t = delta + i_b * s_tb + o_dp * s_td
    if HAS_Z:
        p_z = z + i_b * s_zb + o_dp * s_zd
    p_y = y + i_b * s_yb + o_dp * s_yd
    p_B = B + i_b * s_Bb + o_n * s_Bn
    p_C = C + i_b * s_Cb + o_n * s_Cn
    # the inputs of the next PF steps are carried along; step t + PF is loaded before step t is computed
    c_u, c_dt, c_B, c_C = _load_step(t_beg, t_end, p_u, p_t, p_B, p_C, s_ul, s_tl, s_Bl, s_Cl, o_d, o_n, m_d, m_n)
    if PF > 1:
        n_u, n_dt, n_B, n_C = _load_step(
            t_beg + 1, t_end, p_u, p_t, p_B, p_C, s_ul, s_tl, s_Bl, s_Cl, o_d, o_n, m_d, m_n
        )  # fmt: skip
    t0 = t_beg
    while t0 < t_end:
        b_Y = tl.zeros([BLOCK_D, K], dtype=tl.float32)
        for k in tl.static_range(K):
            t = t0 + k
            f_u, f_dt, f_B, f_C = _load_step(
                t + PF, t_end, p_u, p_t, p_B, p_C, s_ul, s_tl, s_Bl, s_Cl, o_d, o_n, m_d, m_n
            )  # fmt: skip
            b_u, b_dt, b_B, b_C = c_u.to(tl.float32), c_dt.to(tl.float32), c_B.to(tl.float32), c_C.to(tl.float32)
            if PF > 1:
                c_u, c_dt, c_B, c_C = n_u, n_dt, n_B, n_C
                n_u, n_dt, n_B, n_C = f_u, f_dt, f_B, f_C
            else:
                c_u, c_dt, c_B, c_C = f_u, f_dt, f_B, f_C
            if HAS_DELTA_BIAS:
                b_dt += b_db
            if DELTA_SOFTPLUS:
                b_dt = _softplus(b_dt)
            # steps past the end get Δ = 0: Ā = 1 and B̄u = 0 leave the state as it is
            b_dt = tl.where(m_d & ((o_d * 0 + t) < t_end), b_dt, 0.0)
            b_h = tl.exp2(b_dt[:, None] * b_A) * b_h + (b_dt * b_u)[:, None] * b_B[None, :]
            if PASS == 1:
                b_sdt += b_dt
            else:
                if USE_STATE_OFFSET:
                    b_yt = tl.sum((b_h + b_hoff) * b_C[None, :], axis=1)
                else:
                    b_yt = tl.sum(b_h * b_C[None, :], axis=1)
                if HAS_D:
                    b_yt += b_D * b_u
                b_Y = tl.where(o_k[None, :] == k, b_yt[:, None], b_Y)
        if PASS != 1:
            # y (and z) go through a [BLOCK_D, K] tile: no store between the steps' loads
            m_k = m_d[:, None] & ((t0 + o_k) < t_end)[None, :]
            if USE_Y_OFFSET:
                b_Y += b_yoff[:, None]
            if HAS_Z:
                b_Z = tl.load(p_z[:, None] + (t0 + o_k)[None, :] * s_zl, mask=m_k, other=0.0).to(tl.float32)
                b_Y = b_Y * b_Z * tl.sigmoid(b_Z)
            tl.store(p_y[:, None] + (t0 + o_k)[None, :] * s_yl, b_Y.to(y.dtype.element_ty), mask=m_k)
        t0 += K
    if PASS == 1:
        tl.store(p_S + i_c * N * DIM, b_h, mask=m_dn)
        tl.store(p_G + i_c * DIM, b_sdt, mask=m_d)
    if STORE_FINAL_STATE and PASS != 1:  # noqa: SIM102 (constexpr test, then a runtime one: Triton keeps them apart)
        if i_c == NC - 1:
            tl.store(ht + i_b * N * DIM + o_nd, b_h, mask=m_dn)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter: any value; the H100 / H200 count keeps CPU tests on the GPU's code path
    return torch.cuda.get_device_properties(device).multi_processor_count


def _config(batch: int, dim: int, seqlen: int, device: torch.device) -> dict[str, int]:
    """Launch configuration: the defaults below, then ``CONFIG_OVERRIDE`` (keys ``CONFIG_KEYS``)."""
    unknown = sorted(set(CONFIG_OVERRIDE) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(
            f"sequential selective scan CONFIG_OVERRIDE: unknown key(s) {unknown}; allowed keys: {', '.join(CONFIG_KEYS)}"
        )
    cfg = {"BLOCK_D": 32, "K": 8, "WARPS": 1, "PF": 2, "CHUNK": 0}
    cfg.update(CONFIG_OVERRIDE)
    if "CHUNK" not in CONFIG_OVERRIDE:
        # H200, L 2048 (docs/kernels.md): one pass when there are 4 or more one-warp programs per SM
        # (B 8, D 4096 / 5120: chunking lost 1.2-1.5x); below, chunks of 64-512 steps were within 10% of each other
        # where they gave enough programs, and 4-8x faster than one pass at B 1. The chunks aim at ~32 programs per SM,
        # several waves: one wave that just fits (B 8, D 1536 in chunks of 512: 11.6 per SM) turns into two when a
        # variant with offsets needs more registers (up to 214: 9 one-warp programs per SM)
        programs = batch * triton.cdiv(dim, cfg["BLOCK_D"])
        sms = _sm_count(device)
        if programs < 4 * sms:
            chunk = max(64, 1 << max(0, (seqlen * programs // (32 * sms)).bit_length() - 1))
            cfg["CHUNK"] = chunk if chunk < seqlen else 0
    if cfg["CHUNK"] % cfg["K"] or cfg["CHUNK"] < 0:
        raise ValueError(
            f"sequential selective scan: CHUNK {cfg['CHUNK']} must be a non-negative multiple of K {cfg['K']}"
        )
    if cfg["PF"] not in (1, 2):
        raise ValueError(f"sequential selective scan: PF must be 1 or 2, got {cfg['PF']}")
    return cfg


def suits(delta: torch.Tensor, A: torch.Tensor) -> bool:
    """Whether this kernel is the better forward: N fits the registers and Δ is time-major (a [B, L, D] tensor viewed
    as [B, D, L], as the mixer passes it). On [B, D, L]-contiguous inputs the n-loop kernel needs no copies and
    reads along time coalesced, so it keeps them."""
    return A.shape[1] <= MAX_DSTATE and delta.stride(1) == 1 and delta.stride(2) != 1


def _transposed(t: torch.Tensor | None) -> tuple[torch.Tensor | None, int]:
    """An optional [D, N] (shared) or [B, D, N] (per row) state as a contiguous [.., N, D] copy, and its batch stride."""
    if t is None:
        return None, 0
    t = t.transpose(-1, -2).contiguous()
    return t, (t.stride(0) if t.dim() == 3 else 0)


def selective_scan_fwd_seq(
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Forward only, inputs in any strides (``selective_scan_triton``'s shapes). Returns y [B, D, L] in u's dtype, laid
    out time-major when Δ is (so that ``y.transpose(1, 2)`` is contiguous), and h_L [B, D, N] fp32 or None."""
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    if dstate > MAX_DSTATE:
        raise ValueError(f"selective_scan_fwd_seq: state size N must be <= {MAX_DSTATE}, got {dstate}")
    cfg = _config(batch, dim, seqlen, u.device)
    if delta.stride(1) == 1 and delta.stride(2) != 1:
        y = torch.empty(batch, seqlen, dim, device=u.device, dtype=u.dtype).transpose(1, 2)
    else:
        y = torch.empty(batch, dim, seqlen, device=u.device, dtype=u.dtype)
    T = cfg["CHUNK"] or max(seqlen, 1)
    nc = triton.cdiv(seqlen, T)
    ht = torch.empty(batch, dstate, dim, device=u.device, dtype=torch.float32) if output_final_state else None
    S = torch.empty(batch, nc, dstate, dim, device=u.device, dtype=torch.float32) if nc > 1 else None
    G = torch.empty(batch, nc, dim, device=u.device, dtype=torch.float32) if nc > 1 else None
    h0_t, s_h0 = _transposed(initial_state)
    hoff_t, s_hoff = _transposed(state_offset)
    s_yoff = y_offset.stride(0) if y_offset is not None and y_offset.dim() == 2 else 0
    zs = z.stride() if z is not None else (0, 0, 0)
    A_t = A.float().t().contiguous()
    strides = (*u.stride(), *delta.stride(), *zs, *B.stride(), *C.stride(), *y.stride())
    # batch offsets are 64-bit in the kernel; time (t * stride) and channel (d * stride) offsets 32-bit unless one of
    # them can reach 2^31
    idx64 = max(seqlen * max(strides[2::3]), dim * max(strides[1::3])) >= IDX32_LIMIT
    for pass_ in (1, 2) if nc > 1 else (0,):
        selective_scan_fwd_seq_kernel[(triton.cdiv(dim, cfg["BLOCK_D"]), batch, nc)](
            u, delta, A_t, B, C, D, z, delta_bias, h0_t, hoff_t, y_offset, y, ht, S, G,
            *strides, s_h0, s_hoff, s_yoff, seqlen, T, nc, dim,
            N=dstate, DELTA_SOFTPLUS=delta_softplus, BLOCK_D=cfg["BLOCK_D"], BLOCK_N=triton.next_power_of_2(dstate),
            K=cfg["K"], PF=cfg["PF"], PASS=pass_, IDX64=idx64, num_warps=cfg["WARPS"],
        )  # fmt: skip
    return y, (ht.transpose(1, 2).contiguous() if ht is not None else None)
