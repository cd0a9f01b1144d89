"""RMSNorm, optionally gated and grouped, in Triton: forward and backward in one pass each.

Semantics are those of ``rms_norm_torch`` in ``norm.py`` (the models' ``RMSNorm`` / ``RMSNormGated``): in fp32,
x̂ = x ⊙ silu(z) (when gated), per group of ``group_size`` channels r = rsqrt(mean(x̂²) + eps), n = x̂ · r rounded to
x's dtype, out = w · n in the promoted dtype of w and x. Why a kernel: the torch path runs ~8 elementwise passes
forward and ~15 backward over fp32 copies of [B, L, D]; in a Mamba-2-130m-shaped training step at 8 × 2048 these took
~40 ms of ~150 (``ssmtune bench profile``).

Forward: one program per block of rows, the whole row in registers, one reduction per group (groups are selected by a
mask over the row, ``NG`` ≤ 16 of them); r is saved per (row, group) for the backward. Backward: a fixed number of
programs walk the rows (grid-stride), recompute x̂ and n from x, z and r, and write
dx̂ = r · (g − x̂ r · mean_group(g · x̂ r)) with g = dout · w, then dx = dx̂ · silu(z), dz = dx̂ · x · silu'(z);
dw is summed per program in fp32 registers and the per-program rows are summed by the launcher (deterministic).

``add_rms_norm_triton``: the same forward kernel with the residual add of a pre-norm block in its load (``HAS_RES``):
s = x + y is stored (the next residual stream) and normalised, one launch where the add was a kernel of its own.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .norm import rms_norm_torch

MAX_GROUPS = 16
# the dtype x is normalised in, as a small int for the kernel's constexpr (0: x's own; a plain flag compiles the same
# on every Triton release, where dtype-valued constexprs have not always been accepted)
_IN_KINDS = {torch.bfloat16: 1, torch.float16: 2}


@triton.jit
def _group_stat(v, o_n, GS: tl.constexpr, NG: tl.constexpr):
    """[R, BLOCK_N] → per-column mean over its group of GS columns (NG groups along the row)."""
    out = tl.zeros(v.shape, dtype=tl.float32)
    for g in tl.static_range(NG):
        m_g = ((o_n >= g * GS) & (o_n < (g + 1) * GS))[None, :]
        s = tl.sum(tl.where(m_g, v, 0.0), axis=1) / GS
        out = tl.where(m_g, s[:, None], out)
    return out


@triton.heuristics({"HAS_Z": lambda args: args["z"] is not None, "HAS_RES": lambda args: args["y"] is not None})
@triton.jit(do_not_specialize=["rows"])
def rms_norm_fwd_kernel(
    x, y, z, w, out, res, rstd, stride_x, stride_y, stride_z, rows, H, eps,
    GS: tl.constexpr, NG: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_RES: tl.constexpr, IN_KIND: tl.constexpr,
):  # fmt: skip
    # IN_KIND: the dtype x is normalised in: 0 = x's own, 1 = bf16, 2 = fp16 (the cast x.to(...) fused into the load)
    # HAS_RES: the residual add of ``add_rms_norm``: s = x + y in fp32, rounded to res's dtype (that of ``x + y``) and
    # stored to res; s is normalised in x's place (rounded first, as the unfused add hands the norm its stored sum)
    i_r = tl.program_id(0)
    o_r = (i_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    o_n = tl.arange(0, BLOCK_N)
    m_r, m_n = o_r < rows, o_n < H
    m = m_r[:, None] & m_n[None, :]
    b_x = tl.load(x + o_r[:, None] * stride_x + o_n[None, :], mask=m, other=0.0)
    if HAS_RES:
        b_y = tl.load(y + o_r[:, None] * stride_y + o_n[None, :], mask=m, other=0.0)
        b_x = (b_x.to(tl.float32) + b_y.to(tl.float32)).to(res.dtype.element_ty)
        tl.store(res + o_r[:, None] * H + o_n[None, :], b_x, mask=m)
    if IN_KIND == 1:
        b_x = b_x.to(tl.bfloat16)
    elif IN_KIND == 2:
        b_x = b_x.to(tl.float16)
    b_x = b_x.to(tl.float32)
    if HAS_Z:
        b_z = tl.load(z + o_r[:, None] * stride_z + o_n[None, :], mask=m, other=0.0).to(tl.float32)
        b_x = b_x * b_z * tl.sigmoid(b_z)
    b_r = tl.rsqrt(_group_stat(b_x * b_x, o_n, GS, NG) + eps)
    for g in tl.static_range(NG):
        # every column of a group holds its r: store the group's first column
        tl.store(rstd + o_r * NG + g, tl.sum(tl.where((o_n == g * GS)[None, :], b_r, 0.0), axis=1), mask=m_r)
    if IN_KIND == 1:
        b_n = (b_x * b_r).to(tl.bfloat16).to(tl.float32)
    elif IN_KIND == 2:
        b_n = (b_x * b_r).to(tl.float16).to(tl.float32)
    elif HAS_RES:
        b_n = (b_x * b_r).to(res.dtype.element_ty).to(tl.float32)
    else:
        b_n = (b_x * b_r).to(x.dtype.element_ty).to(tl.float32)
    b_w = tl.load(w + o_n, mask=m_n, other=0.0).to(tl.float32)
    tl.store(out + o_r[:, None] * H + o_n[None, :], (b_w[None, :] * b_n).to(out.dtype.element_ty), mask=m)


@triton.heuristics({"HAS_Z": lambda args: args["z"] is not None,
                    "STORE_DW": lambda args: args["dw"] is not None})  # fmt: skip
@triton.jit(do_not_specialize=["rows"])
def rms_norm_bwd_kernel(
    x, z, w, rstd, dout, dx, dz, dw, stride_x, stride_z, rows, H,
    GS: tl.constexpr, NG: tl.constexpr, BLOCK_N: tl.constexpr, HAS_Z: tl.constexpr, STORE_DW: tl.constexpr,
):  # fmt: skip
    i_p, n_p = tl.program_id(0), tl.num_programs(0)
    o_n = tl.arange(0, BLOCK_N)
    m_n = o_n < H
    b_w = tl.load(w + o_n, mask=m_n, other=0.0).to(tl.float32)
    b_dw = tl.zeros([1, BLOCK_N], dtype=tl.float32)
    r = i_p.to(tl.int64)
    while r < rows:
        m = m_n[None, :]
        p = r + tl.zeros([1, BLOCK_N], dtype=tl.int64)  # [1, BLOCK_N]: the row as a 2-D tile
        b_x = tl.load(x + p * stride_x + o_n[None, :], mask=m, other=0.0).to(tl.float32)
        b_xh = b_x
        if HAS_Z:
            b_z = tl.load(z + p * stride_z + o_n[None, :], mask=m, other=0.0).to(tl.float32)
            b_sig = tl.sigmoid(b_z)
            b_xh = b_x * b_z * b_sig
        b_r = tl.zeros([1, BLOCK_N], dtype=tl.float32)
        for g in tl.static_range(NG):
            m_g = ((o_n >= g * GS) & (o_n < (g + 1) * GS))[None, :]
            b_r = tl.where(m_g, tl.load(rstd + r * NG + g), b_r)
        b_hat = b_xh * b_r
        b_do = tl.load(dout + p * H + o_n[None, :], mask=m, other=0.0).to(tl.float32)
        if STORE_DW:
            b_dw += b_do * b_hat.to(x.dtype.element_ty).to(tl.float32)
        b_g = b_do * b_w[None, :]
        b_dxh = b_r * (b_g - b_hat * _group_stat(b_g * b_hat, o_n, GS, NG))
        if HAS_Z:
            tl.store(dx + p * H + o_n[None, :], (b_dxh * b_z * b_sig).to(dx.dtype.element_ty), mask=m)
            b_dz = b_dxh * b_x * b_sig * (1.0 + b_z * (1.0 - b_sig))
            tl.store(dz + p * H + o_n[None, :], b_dz.to(dz.dtype.element_ty), mask=m)
        else:
            tl.store(dx + p * H + o_n[None, :], b_dxh.to(dx.dtype.element_ty), mask=m)
        r += n_p
    if STORE_DW:
        tl.store(dw + i_p * H + o_n[None, :], b_dw, mask=m_n[None, :])


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., H] as a [rows, H] view (a copy only when the leading dims cannot be merged or H is strided)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return t.reshape(-1, t.shape[-1])


def _warps(block_n: int) -> int:
    return min(16, max(4, block_n // 512))


def _forward(x2, weight, eps, group_size, in_dtype, *, z2=None, y2=None):
    """Launch the forward kernel on [rows, H] views: (out, the residual x2 + y2 when y2 is given, rstd)."""
    rows, hidden = x2.shape
    ng = hidden // group_size
    # the dtype s = x + y is stored in and normalised from (``x + y``'s); x's own without y
    base = x2.dtype if y2 is None else torch.promote_types(x2.dtype, y2.dtype)
    out = torch.empty(rows, hidden, dtype=torch.promote_types(weight.dtype, in_dtype), device=x2.device)
    res = None if y2 is None else torch.empty(rows, hidden, dtype=base, device=x2.device)
    rstd = torch.empty(rows, ng, dtype=torch.float32, device=x2.device)
    block_n = triton.next_power_of_2(hidden)
    block_r = max(1, min(16, 4096 // block_n))
    rms_norm_fwd_kernel[(triton.cdiv(rows, block_r),)](
        x2, y2, z2, weight, out, res, rstd, x2.stride(0), 0 if y2 is None else y2.stride(0),
        0 if z2 is None else z2.stride(0), rows, hidden, eps, GS=group_size, NG=ng, BLOCK_R=block_r, BLOCK_N=block_n,
        IN_KIND=0 if in_dtype == base else _IN_KINDS[in_dtype], num_warps=_warps(block_n * block_r),
    )  # fmt: skip
    return out, res, rstd


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, z, eps, group_size, input_dtype=None):
        # input_dtype (no autograd: the backward assumes x's own dtype): normalise x.to(input_dtype), cast in the kernel
        in_dtype = x.dtype if input_dtype is None else input_dtype
        x2 = _rows(x)
        z2 = None if z is None else _rows(z)
        out, _, rstd = _forward(x2, weight, eps, group_size, in_dtype, z2=z2)
        ctx.save_for_backward(x2, z2, weight, rstd)
        ctx.group_size, ctx.shape = group_size, x.shape
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, dout):
        x2, z2, weight, rstd = ctx.saved_tensors
        rows, hidden = x2.shape
        ng = hidden // ctx.group_size
        dout = _rows(dout).contiguous()
        dx = torch.empty(rows, hidden, dtype=x2.dtype, device=x2.device)
        dz = None if z2 is None else torch.empty(rows, hidden, dtype=z2.dtype, device=x2.device)
        n_prog = max(1, min(rows, 4 * _sm_count(x2.device)))
        need_w = ctx.needs_input_grad[1]
        dw = torch.empty(n_prog, hidden, dtype=torch.float32, device=x2.device) if need_w else None
        block_n = triton.next_power_of_2(hidden)
        rms_norm_bwd_kernel[(n_prog,)](
            x2, z2, weight, rstd, dout, dx, dz, dw, x2.stride(0), 0 if z2 is None else z2.stride(0), rows, hidden,
            GS=ctx.group_size, NG=ng, BLOCK_N=block_n, num_warps=_warps(block_n),
        )  # fmt: skip
        d_w = dw.sum(0).to(weight.dtype) if need_w else None
        d_z = None if dz is None else dz.view(ctx.shape)
        return dx.view(ctx.shape), d_w, d_z, None, None, None


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the CPU interpreter: few programs, each walking many rows


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, *, z: torch.Tensor | None = None, eps: float = 1e-5,
    group_size: int | None = None, input_dtype: torch.dtype | None = None,
) -> torch.Tensor:  # fmt: skip
    """``rms_norm`` on the Triton kernels; arguments validated by ``ssmtune.ops.rms_norm``."""
    group_size = x.shape[-1] if group_size is None else group_size
    if x.shape[-1] // group_size > MAX_GROUPS or x.numel() == 0:
        # more groups than the kernel unrolls, or nothing to launch: the torch path
        return rms_norm_torch(x, weight, z=z, eps=eps, group_size=group_size, input_dtype=input_dtype)
    if input_dtype is None or input_dtype == x.dtype:
        return RMSNormFunction.apply(x, weight, z, eps, group_size)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, z))
    if grad or input_dtype not in _IN_KINDS:
        # with autograd the cast stays a torch op, whose backward rounds the gradient as before
        return RMSNormFunction.apply(x.to(input_dtype), weight, z, eps, group_size)
    # the cast x.to(input_dtype) in the kernel's load: a decode step saves a kernel per norm
    return RMSNormFunction.apply(x, weight, z, eps, group_size, input_dtype)


def add_rms_norm_triton(
    x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, *, eps: float = 1e-5, group_size: int | None = None,
    input_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``add_rms_norm`` in one launch of the forward kernel; arguments validated by ``ssmtune.ops.add_rms_norm``.
    Forward only: with a gradient to take (or a case the kernel leaves out) the add is a torch op before the norm."""
    group_size = x.shape[-1] if group_size is None else group_size
    base = torch.promote_types(x.dtype, y.dtype)
    in_dtype = base if input_dtype is None else input_dtype
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, y, weight))
    unfused = (
        x.shape[-1] // group_size > MAX_GROUPS or x.numel() == 0 or (in_dtype != base and in_dtype not in _IN_KINDS)
    )
    if grad or unfused:
        s = x + y
        return s, rms_norm_triton(s, weight, eps=eps, group_size=group_size, input_dtype=input_dtype)
    out, res, _ = _forward(_rows(x), weight, eps, group_size, in_dtype, y2=_rows(y))
    return res.view(x.shape), out.view(x.shape)
