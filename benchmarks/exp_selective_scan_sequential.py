"""Experiment (issue #4): a Mamba-1 forward that walks time one step at a time, against the n-loop kernel.

The library's forward (``ssmtune/ops/selective_scan/fused.py``) scans each state along a 128-step tile with
``tl.associative_scan``. This prototype keeps all N states of BLOCK_D channels in registers and applies
h_t = exp(Δ_t A) h_{t-1} + Δ_t u_t B_t once per step, K steps unrolled per loop iteration (``tl.static_range``), so
there is no log-depth scan and no last-column reduction. Δ, z, B and C are read in the mixer's own time-major layout
([B, L, ·] viewed as [B, ·, L]), u as the causal conv leaves it ([B, D, L]; ``--u-layouts conv,time-major`` also times a time-major u),
and y is written time-major, so the mixer's transposing copies before and after the scan go. Peer flags only (D, z,
delta_bias, softplus), no h0 / h' / y', no checkpoints: a measurement, not a backend. Variants:

- ``step``: per-step loads of u, Δ, z, B_t, C_t and a per-step store of y_t;
- ``tile``: y_t gathered into a [BLOCK_D, K] tile and stored once per K steps (no store between the steps' loads);
- ``tile_at``: ``tile`` with A read as [N, D], so the compiler lays the state tile out one channel per lane (all N
  states of a channel in one thread: the read-out Σ_n C_n h_n needs no shuffle);
- ``tile_in_at``: ``tile_at`` with u and Δ also loaded as [BLOCK_D, K] tiles, each step's column picked in registers;
- ``tile_at_pf1`` / ``tile_at_pf2``: ``tile_at`` with the inputs of step t + 1 (t + 2) loaded before step t is computed:
  the compiled ``tile_at`` issues each step's loads right before its own exponentials (sm_90 SASS), so every step
  waits for a memory latency.
Each variant also runs chunked (``chunk`` = T > 0): a first launch runs every T-step chunk from h = 0 and stores its end
state S_c and ΣΔ; a second starts chunk c from Σ_{j<c} exp(A ΣΔ_{j+1..c-1}) S_j and writes y, so L / T times the
programs for twice the recurrence work. Session 6 timed them (below); the library's opt-in inference forward,
``ssmtune/ops/selective_scan/fused_seq.py``, is built on ``tile_at_pf1`` / ``tile_at_pf2`` and their chunked forms.

Measured on one NVIDIA H200 (torch 2.11, triton 3.6; docs/kernels-mamba1.md, session 5; raw docs/img/scan_sequential_s5.json):
B 8, L 2048, N 16, bf16, forward ms; n-loop 0.79-0.80 at D 1536 and 1.89-1.90 at D 4096.
Best at D 1536: ``tile`` BLOCK_D 16, K 16, 2 warps, u as the conv leaves it, 0.912 (0.87x the n-loop's speed); at
D 4096: ``tile_at`` BLOCK_D 32, K 8, 1 warp, u time-major, 1.331 (1.43x faster than the n-loop). The mixer's copies
of Δ, z, B, C into [B, D, L], which the n-loop needs, took 0.335 / 0.954 ms. Every variant took 0.45 µs per time step or more at
D 1536 whatever the tile, about one memory latency per step: latency-bound where there are few channels per SM.
Session 6 (same device; raw docs/img/scan_sequential_s6.json): prefetching two steps ahead, one pass, 1.076 ms at
D 4096; prefetching one step, chunks of 256, 0.602 ms at D 1536; ``tile_in_at`` 2.2 ms (slower, as expected).

    STEPS=seqscan bash scripts/gpu_call.sh      # on the GPU machine: the command below, logged, under a time cap
    PYTHONPATH=. python3 benchmarks/exp_selective_scan_sequential.py --out $OUT/scan_sequential.json
    TRITON_INTERPRET=1 python benchmarks/exp_selective_scan_sequential.py --check-only     # CPU: correctness only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ssmtune.ops.selective_scan.fused import selective_scan_fwd
from ssmtune.ops.selective_scan.fused_seq import _load_step, _softplus  # the library kernel's step loads
from ssmtune.ops.selective_scan.naive import selective_scan_ref

LOG2E = tl.constexpr(1.4426950408889634)
VARIANTS = ("step", "tile", "tile_at", "tile_in_at", "tile_at_pf1", "tile_at_pf2")


@triton.jit
def seq_fwd_kernel(
    u, dt, A, B, C, D, z, dbias, y, S, G, L, DIM, T, NC,
    s_ub, s_ud, s_ul, s_tb, s_td, s_tl, s_zb, s_zd, s_zl, s_Bb, s_Bn, s_Bl, s_Cb, s_Cn, s_Cl, s_yb, s_yd, s_yl,
    N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, K: tl.constexpr,
    STORE_PER_STEP: tl.constexpr, A_T: tl.constexpr, TILE_IN: tl.constexpr, PF: tl.constexpr, PASS: tl.constexpr,
):  # fmt: skip
    # PASS 0: the whole sequence in one program. Chunked (T steps per program, NC chunks): PASS 1 runs each chunk from
    # h = 0 and stores its end state S and ΣΔ G; PASS 2 starts chunk c from Σ_{j<c} (decays) S_j and writes y.
    i_d, i_b, i_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = i_b.to(tl.int64)
    t_beg = i_c * T
    t_end = tl.minimum(L, t_beg + T)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    o_n = tl.arange(0, BLOCK_N)
    o_k = tl.arange(0, K)
    m_d = o_d < DIM
    m_n = o_n < N
    m_dn = m_d[:, None] & m_n[None, :]
    if A_T:  # A as [N, D]: the tile's layout follows its contiguous axis, D, i.e. one channel per lane
        b_A = tl.load(A + o_n[None, :] * DIM + o_d[:, None], mask=m_dn, other=0.0) * LOG2E
    else:
        b_A = tl.load(A + o_d[:, None] * N + o_n[None, :], mask=m_dn, other=0.0) * LOG2E
    b_D = tl.load(D + o_d, mask=m_d, other=0.0)
    b_db = tl.load(dbias + o_d, mask=m_d, other=0.0)
    b_h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    if PASS > 0:
        p_S = S + (i_b * NC * DIM + o_d[:, None]) * N + o_n[None, :]  # [B, NC, DIM, N] fp32
        p_G = G + i_b * NC * DIM + o_d  # [B, NC, DIM] fp32
    if PASS == 2:  # the state before this chunk, from the earlier chunks' end states
        j = 0
        while j < i_c:
            b_g = tl.load(p_G + j * DIM, mask=m_d, other=0.0)
            b_h = tl.exp2(b_g[:, None] * b_A) * b_h + tl.load(p_S + j * DIM * N, mask=m_dn, other=0.0)
            j += 1
    b_sdt = tl.zeros([BLOCK_D], dtype=tl.float32)
    p_u = u + i_b * s_ub + o_d * s_ud
    p_t = dt + i_b * s_tb + o_d * s_td
    p_z = z + i_b * s_zb + o_d * s_zd
    p_y = y + i_b * s_yb + o_d * s_yd
    p_B = B + i_b * s_Bb + o_n * s_Bn
    p_C = C + i_b * s_Cb + o_n * s_Cn
    # PF > 0: step t + PF's inputs are loaded before step t is computed (PF sets of them carried along)
    if PF > 0:
        c_u, c_dt, c_B, c_C = _load_step(t_beg, t_end, p_u, p_t, p_B, p_C, s_ul, s_tl, s_Bl, s_Cl, o_d, o_n, m_d, m_n)
    if PF > 1:
        n_u, n_dt, n_B, n_C = _load_step(
            t_beg + 1, t_end, p_u, p_t, p_B, p_C, s_ul, s_tl, s_Bl, s_Cl, o_d, o_n, m_d, m_n
        )  # fmt: skip
    t0 = t_beg
    while t0 < t_end:
        m_k = m_d[:, None] & ((t0 + o_k) < t_end)[None, :]
        if TILE_IN:
            b_U = tl.load(p_u[:, None] + (t0 + o_k)[None, :] * s_ul, mask=m_k, other=0.0).to(tl.float32)
            b_T = tl.load(p_t[:, None] + (t0 + o_k)[None, :] * s_tl, mask=m_k, other=0.0).to(tl.float32)
            b_T = tl.where(m_k, _softplus(b_T + b_db[:, None]), 0.0)
            b_TU = b_T * b_U
        b_Y = tl.zeros([BLOCK_D, K], dtype=tl.float32)
        for k in tl.static_range(K):
            t = t0 + k
            m = m_d & ((o_d * 0 + t) < t_end)
            mn = m_n & ((o_n * 0 + t) < t_end)
            if TILE_IN:
                b_dt = tl.sum(tl.where(o_k[None, :] == k, b_T, 0.0), axis=1)
                b_dtu = tl.sum(tl.where(o_k[None, :] == k, b_TU, 0.0), axis=1)
            elif PF > 0:
                f_u, f_dt, f_B, f_C = _load_step(
                    t + PF, t_end, p_u, p_t, p_B, p_C, s_ul, s_tl, s_Bl, s_Cl, o_d, o_n, m_d, m_n
                )  # fmt: skip
                b_u, b_dt, b_B, b_C = c_u.to(tl.float32), c_dt.to(tl.float32), c_B.to(tl.float32), c_C.to(tl.float32)
                if PF > 1:
                    c_u, c_dt, c_B, c_C = n_u, n_dt, n_B, n_C
                    n_u, n_dt, n_B, n_C = f_u, f_dt, f_B, f_C
                else:
                    c_u, c_dt, c_B, c_C = f_u, f_dt, f_B, f_C
                b_dt = tl.where(m, _softplus(b_dt + b_db), 0.0)
                b_dtu = b_dt * b_u
            else:
                b_u = tl.load(p_u + t * s_ul, mask=m, other=0.0).to(tl.float32)
                b_dt = tl.load(p_t + t * s_tl, mask=m, other=0.0).to(tl.float32)
                b_dt = tl.where(m, _softplus(b_dt + b_db), 0.0)
                b_dtu = b_dt * b_u
            if PF == 0:
                b_B = tl.load(p_B + t * s_Bl, mask=mn, other=0.0).to(tl.float32)
                b_C = tl.load(p_C + t * s_Cl, mask=mn, other=0.0).to(tl.float32)
            b_h = tl.exp2(b_dt[:, None] * b_A) * b_h + b_dtu[:, None] * b_B[None, :]
            if PASS == 1:
                b_sdt += b_dt
            elif STORE_PER_STEP:
                b_yt = tl.sum(b_h * b_C[None, :], axis=1)
                b_z = tl.load(p_z + t * s_zl, mask=m, other=0.0).to(tl.float32)
                b_yt = (b_yt + b_D * b_u) * b_z * tl.sigmoid(b_z)
                tl.store(p_y + t * s_yl, b_yt.to(y.dtype.element_ty), mask=m)
            else:
                b_yt = tl.sum(b_h * b_C[None, :], axis=1)
                b_Y = tl.where(o_k[None, :] == k, b_yt[:, None], b_Y)
        if not STORE_PER_STEP and PASS != 1:
            if not TILE_IN:
                b_U = tl.load(p_u[:, None] + (t0 + o_k)[None, :] * s_ul, mask=m_k, other=0.0).to(tl.float32)
            b_Z = tl.load(p_z[:, None] + (t0 + o_k)[None, :] * s_zl, mask=m_k, other=0.0).to(tl.float32)
            b_Y = (b_Y + b_D[:, None] * b_U) * b_Z * tl.sigmoid(b_Z)
            tl.store(p_y[:, None] + (t0 + o_k)[None, :] * s_yl, b_Y.to(y.dtype.element_ty), mask=m_k)
        t0 += K
    if PASS == 1:
        tl.store(p_S + i_c * DIM * N, b_h, mask=m_dn)
        tl.store(p_G + i_c * DIM, b_sdt, mask=m_d)


def seq_fwd(u, dt, A, B, C, D, z, dbias, variant="tile_at", block_d=32, k=8, warps=1, chunk=0, poison=False):
    """y = selective_scan(u, dt, A, B, C, D, z, dbias, delta_softplus=True), y returned as a [B, D, L] view of a
    time-major buffer (what the mixer's out_proj reads). ``chunk`` > 0 (a multiple of k): two launches over chunks
    of that many steps (more programs, twice the recurrence work). ``poison`` fills y with NaN (checks, not timings)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r}; known: {', '.join(VARIANTS)}")
    b, d, L = u.shape
    n = A.shape[1]
    y = torch.empty(b, L, d, device=u.device, dtype=u.dtype).transpose(1, 2)
    if poison:
        y.fill_(float("nan"))
    if chunk and chunk % k:
        raise ValueError(f"chunk {chunk} is not a multiple of k {k}")
    a_t = "_at" in variant
    T = chunk or max(L, 1)
    nc = triton.cdiv(L, T)
    S = torch.empty(b, nc, d, n, device=u.device, dtype=torch.float32) if chunk else None
    G = torch.empty(b, nc, d, device=u.device, dtype=torch.float32) if chunk else None
    for pass_ in (1, 2) if chunk else (0,):
        seq_fwd_kernel[(triton.cdiv(d, block_d), b, nc)](
            u, dt, A.t().contiguous() if a_t else A, B, C, D, z, dbias, y, S, G, L, d, T, nc,
            *u.stride(), *dt.stride(), *z.stride(), *B.stride(), *C.stride(), *y.stride(),
            N=n, BLOCK_D=block_d, BLOCK_N=triton.next_power_of_2(n), K=k, STORE_PER_STEP=variant == "step", A_T=a_t,
            TILE_IN=variant == "tile_in_at", PF=int(variant[-1]) if "_pf" in variant else 0, PASS=pass_,
            num_warps=warps,
        )  # fmt: skip
    return y


def inputs(b, d, L, n, dtype, device, seed=0, u_layout="conv"):
    """The mixer's layouts: u as the causal conv leaves it ([B, D, L] contiguous; ``u_layout="time-major"``: [B, L, D]),
    Δ [B, L, D], z a half of in_proj's [B, L, 2D], B / C slices of x_proj's [B, L, R+2N]; all viewed as [B, D, L] /
    [B, N, L] the way ``ops.selective_scan`` receives them."""
    if u_layout not in ("conv", "time-major"):
        raise ValueError(f"u_layout {u_layout!r}; known: conv, time-major")
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    u = r(b, d, L).to(device, dtype) if u_layout == "conv" else r(b, L, d).to(device, dtype).transpose(1, 2)
    dt = (r(b, L, d) * 0.5 - 1).to(device, dtype).transpose(1, 2)
    z = r(b, L, 2 * d).to(device, dtype)[..., d:].transpose(1, 2)
    x_dbl = r(b, L, 48 + 2 * n).to(device, dtype)
    B, C = x_dbl[..., 48 : 48 + n].transpose(1, 2), x_dbl[..., 48 + n :].transpose(1, 2)
    A = (-torch.rand(d, n, generator=g) - 0.5).to(device)
    return u, dt, A, B, C, r(d).to(device), z, (r(d) * 0.3).to(device)


def check(cfg, device, shape=None, u_layout="conv"):
    """Relative error against the fp32 reference on a small odd-sized (B, D, L, N) case in fp32, y NaN-poisoned."""
    variant, block_d, k, warps, chunk = (*cfg, 0)[:5]
    x = inputs(*(shape or (2, 37, 333 if device == "cuda" else 45, 5)), torch.float32, device, u_layout=u_layout)
    ref = selective_scan_ref(*x, delta_softplus=True)
    out = seq_fwd(*x, variant=variant, block_d=block_d, k=k, warps=warps, chunk=chunk, poison=True)
    return ((out.float() - ref).norm() / ref.norm()).item()


# [variant, BLOCK_D, K, warps, chunk (0: one pass over the whole sequence)]
DEFAULT_CONFIGS = [
    ["tile", 16, 16, 2, 0], ["tile_at", 32, 8, 1, 0], ["tile_at_pf1", 32, 8, 1, 0], ["tile_at_pf2", 32, 8, 1, 0],
    ["tile_at_pf2", 16, 8, 1, 0], ["tile_in_at", 32, 8, 1, 0], ["tile_at", 32, 8, 1, 256], ["tile_at", 32, 8, 1, 512],
    ["tile_at_pf1", 32, 8, 1, 256], ["tile_at_pf2", 32, 8, 1, 128], ["tile", 16, 16, 2, 256], ["tile_at", 64, 8, 2, 256],
]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dims", default="1536,4096")
    ap.add_argument("--configs", default=None, help="JSON list of [variant, BLOCK_D, K, warps, chunk]")
    ap.add_argument(
        "--u-layouts", default="conv", help="conv: u as the conv leaves it ([B, D, L]); time-major: [B, L, D]"
    )
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--out", default=None)
    opts = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfgs = json.loads(opts.configs) if opts.configs else DEFAULT_CONFIGS
    for cfg in cfgs if device == "cuda" else [[v, 4, 8, 1, c] for v in VARIANTS for c in (0, 16)]:
        err = check(cfg, device)
        print(f"check {cfg}: relative error {err:.1e}", flush=True)
        if not err < 1e-4:
            raise SystemExit(f"{cfg} does not match the reference (relative error {err:.1e})")
    if opts.check_only or device != "cuda":
        return
    from triton.testing import do_bench

    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    rows = []

    def add(row: dict) -> None:  # the JSON is rewritten after every row: a run cut by a time limit keeps its rows
        rows.append(row)
        if opts.out:
            os.makedirs(os.path.dirname(os.path.abspath(opts.out)), exist_ok=True)
            Path(opts.out).write_text(json.dumps({**meta, "rows": rows}, indent=1))

    for d in map(int, opts.dims.split(",")):
        x = inputs(8, d, 2048, 16, torch.bfloat16, device)
        contig = [t.contiguous() for t in x]  # the n-loop kernel reads [B, D, L]; the mixer copies into it
        nloop = lambda: selective_scan_fwd(*contig, True, None, None, None, False, False)  # noqa: B023
        base = do_bench(nloop, warmup=25, rep=200)
        add({"d": d, "kernel": "n-loop", "ms": base})
        copies = lambda: [t.contiguous() for t in (x[1], x[6], x[3], x[4])]  # noqa: B023 (Δ, z, B, C)
        add({"d": d, "kernel": "the mixer's copies of Δ, z, B, C into [B, D, L]", "ms": do_bench(copies, rep=100)})
        for u_layout in opts.u_layouts.split(","):
            x = inputs(8, d, 2048, 16, torch.bfloat16, device, u_layout=u_layout)
            for variant, block_d, k, warps, chunk in cfgs:
                kw = {"variant": variant, "block_d": block_d, "k": k, "warps": warps, "chunk": chunk}
                ms = do_bench(lambda: seq_fwd(*x, **kw), warmup=10, rep=60)  # noqa: B023
                add({"d": d, "u_layout": u_layout, **kw, "ms": ms, "vs_nloop": base / ms})
                print(f"D {d} u {u_layout} {variant} {block_d}/{k}/{warps} chunk {chunk}: {ms:.3f} ms "
                      f"(n-loop {base:.3f})", flush=True)  # fmt: skip
    print(f"\n{meta}\n| D | kernel | ms | n-loop / this |\n|---|---|---|---|")
    for r in rows:
        name = r.get("kernel") or f"{r['variant']} {r['block_d']}/{r['k']}/{r['warps']} c{r['chunk']} u {r['u_layout']}"
        print(
            f"| {r['d']} | {name} | {r['ms']:.3f} | {r['vs_nloop']:.2f} |"
            if "vs_nloop" in r
            else f"| {r['d']} | {name} | {r['ms']:.3f} | |"
        )


if __name__ == "__main__":
    main()
