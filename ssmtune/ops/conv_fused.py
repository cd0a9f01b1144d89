"""Causal depthwise conv1d in Triton: forward and backward, with an initial conv state and a fused SiLU.

Semantics are those of ``causal_conv1d_torch`` in ``conv.py``: y_t = act(bias + Σ_k w[k] · xpad[t + k]) where
xpad = initial_state ⧺ x (zeros without an initial state). Why a kernel: the torch path pads with a ``cat`` (a copy of
x, transposed when x is the time-major view the mixers hold), runs the depthwise conv in bf16 and the SiLU as a separate
pass, and each has a backward pass of its own; in a 130m-shaped training step at 8 × 2048 these took 25-30 ms of ~170
(``ssmtune bench profile``). Here one pass reads x once (any strides) and writes y once, in the layout the
caller asks for (``channels_last``: [B, L, C] memory behind the [B, C, L] view, what ``x_proj`` and the SSD scan read).

Backward, one program per [BLOCK_L, BLOCK_C] tile of padded positions p (times p − (K−1), so the first tile also covers
the initial state): g_s = dy_s · act'(pre_s) is recomputed at the K shifts s = t + j that reach position t, and
dxpad_t = Σ_j w[K−1−j] · g_{t+j}; positions before time 0 are the initial state's gradient. dw and dbias are per-tile
partial sums ([tiles, C, K], summed by the launcher: deterministic). Accumulation is fp32; w and bias are read in
their own dtype (the torch path rounds them to x's dtype first).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch, layout
from .conv import causal_conv1d_torch


@triton.jit
def _pre_activation(x, w, bias, h0, p_x, p_h0, o_t, o_c, m_c, sxl, sxc, L, K: tl.constexpr,
                    HAS_BIAS: tl.constexpr, USE_INITIAL_STATE: tl.constexpr):  # fmt: skip
    """bias + Σ_k w[k] · xpad[t + k] for the [BLOCK_L] times o_t (any integers; 0 outside [0, L))."""
    acc = tl.zeros([o_t.shape[0], o_c.shape[0]], dtype=tl.float32)
    for k in tl.static_range(K):
        t = o_t - (K - 1) + k  # input time read by tap k
        m = ((t >= 0) & (t < L))[:, None] & m_c[None, :]
        b_x = tl.load(x + p_x + t[:, None] * sxl + o_c[None, :] * sxc, mask=m, other=0.0).to(tl.float32)
        if USE_INITIAL_STATE:
            m0 = ((t < 0) & (t >= -(K - 1)))[:, None] & m_c[None, :]
            b_x += tl.load(h0 + p_h0 + o_c[None, :] * (K - 1) + (t + K - 1)[:, None], mask=m0, other=0.0).to(tl.float32)
        b_w = tl.load(w + o_c * K + k, mask=m_c, other=0.0).to(tl.float32)
        acc += b_x * b_w[None, :]
    if HAS_BIAS:
        acc += tl.load(bias + o_c, mask=m_c, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.heuristics({"HAS_BIAS": lambda args: args["bias"] is not None,
                    "USE_INITIAL_STATE": lambda args: args["h0"] is not None})  # fmt: skip
@triton.jit(do_not_specialize=["L"])
def causal_conv1d_fwd_kernel(
    x, w, bias, h0, y,
    sxb, sxc, sxl, syb, syc, syl, stride_h0_b,
    L, C,
    K: tl.constexpr, SILU: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
    HAS_BIAS: tl.constexpr, USE_INITIAL_STATE: tl.constexpr,
):  # fmt: skip
    i_l, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = i_b.to(tl.int64)
    # 64-bit offsets: a [B, C, L] row holds C * L elements, which passes 2^31 for long sequences
    o_t = (i_l * BLOCK_L + tl.arange(0, BLOCK_L)).to(tl.int64)
    o_c = (i_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    m_c = o_c < C
    acc = _pre_activation(x, w, bias, h0, i_b * sxb, i_b * stride_h0_b, o_t, o_c, m_c, sxl, sxc, L, K,
                          HAS_BIAS, USE_INITIAL_STATE)  # fmt: skip
    if SILU:
        acc = acc * tl.sigmoid(acc)
    m = (o_t < L)[:, None] & m_c[None, :]
    tl.store(y + i_b * syb + o_t[:, None] * syl + o_c[None, :] * syc, acc.to(y.dtype.element_ty), mask=m)


@triton.heuristics({"HAS_BIAS": lambda args: args["bias"] is not None,
                    "USE_INITIAL_STATE": lambda args: args["h0"] is not None,
                    "STORE_DH0": lambda args: args["dh0"] is not None,
                    "STORE_DW": lambda args: args["dw"] is not None})  # fmt: skip
@triton.jit(do_not_specialize=["L"])
def causal_conv1d_bwd_kernel(
    x, w, bias, h0, dy, dx, dh0, dw, dbias,
    sxb, sxc, sxl, sdyb, sdyc, sdyl, sdxb, sdxc, sdxl, stride_h0_b,
    L, C,
    K: tl.constexpr, SILU: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
    HAS_BIAS: tl.constexpr, USE_INITIAL_STATE: tl.constexpr, STORE_DH0: tl.constexpr, STORE_DW: tl.constexpr,
):  # fmt: skip
    # tile i_l covers padded positions [i_l * BLOCK_L, (i_l + 1) * BLOCK_L), i.e. times from i_l * BLOCK_L - (K - 1)
    i_l, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_l = tl.num_programs(0)
    i_b = i_b.to(tl.int64)
    o_t = (i_l * BLOCK_L + tl.arange(0, BLOCK_L) - (K - 1)).to(tl.int64)
    o_c = (i_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    m_c = o_c < C
    p_x, p_h0 = i_b * sxb, i_b * stride_h0_b
    b_dx = tl.zeros([BLOCK_L, BLOCK_C], dtype=tl.float32)
    for j in tl.static_range(K):
        # g at times t + j, which read xpad at t's position through tap K - 1 - j
        s = o_t + j
        m_s = ((s >= 0) & (s < L))[:, None] & m_c[None, :]
        b_g = tl.load(dy + i_b * sdyb + s[:, None] * sdyl + o_c[None, :] * sdyc, mask=m_s, other=0.0).to(tl.float32)
        if SILU:
            pre = _pre_activation(x, w, bias, h0, p_x, p_h0, s, o_c, m_c, sxl, sxc, L, K, HAS_BIAS, USE_INITIAL_STATE)
            sig = tl.sigmoid(pre)
            b_g = b_g * sig * (1.0 + pre * (1.0 - sig))
        b_w = tl.load(w + o_c * (K) + (K - 1 - j), mask=m_c, other=0.0).to(tl.float32)
        b_dx += b_g * b_w[None, :]
        if j == 0 and STORE_DW:
            # partial dw[k] = Σ_t g_t · xpad[t + k] and dbias = Σ_t g_t over this tile's times (g is 0 outside [0, L))
            p_part = ((i_b * n_l + i_l) * C + o_c) * K
            for k in tl.static_range(K):
                t = s - (K - 1) + k
                m = ((t >= 0) & (t < L))[:, None] & m_c[None, :]
                b_x = tl.load(x + p_x + t[:, None] * sxl + o_c[None, :] * sxc, mask=m, other=0.0).to(tl.float32)
                if USE_INITIAL_STATE:
                    m0 = ((t < 0) & (t >= -(K - 1)))[:, None] & m_c[None, :]
                    b_x += tl.load(h0 + p_h0 + o_c[None, :] * (K - 1) + (t + K - 1)[:, None], mask=m0,
                                   other=0.0).to(tl.float32)  # fmt: skip
                tl.store(dw + p_part + k, tl.sum(b_g * b_x, axis=0), mask=m_c)
            if HAS_BIAS:
                tl.store(dbias + (i_b * n_l + i_l) * C + o_c, tl.sum(b_g, axis=0), mask=m_c)
    m_x = ((o_t >= 0) & (o_t < L))[:, None] & m_c[None, :]
    tl.store(dx + i_b * sdxb + o_t[:, None] * sdxl + o_c[None, :] * sdxc, b_dx.to(dx.dtype.element_ty), mask=m_x)
    if STORE_DH0:
        m0 = ((o_t < 0) & (o_t >= -(K - 1)))[:, None] & m_c[None, :]
        tl.store(dh0 + i_b * C * (K - 1) + o_c[None, :] * (K - 1) + (o_t + K - 1)[:, None], b_dx, mask=m0)


@triton.heuristics({"HAS_BIAS": lambda args: args["bias"] is not None})
@triton.jit
def causal_conv1d_update_kernel(
    x, state, w, bias, y, sxb, ssb, ssc, swc, C,
    K: tl.constexpr, BLOCK_K: tl.constexpr, SILU: tl.constexpr, BLOCK_C: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    # one decode step: window = state ⧺ x_t ([BLOCK_C, BLOCK_K] tile, columns >= K unused), y = act(bias + Σ_k w[k] ·
    # window[k]) in fp32, then the state becomes window[1:] (every load precedes the stores: in place is safe)
    i_c, i_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    o_k = tl.arange(0, BLOCK_K)
    m_c = o_c < C
    p_s = state + i_b * ssb + o_c[:, None] * ssc + o_k[None, :]
    b_win = tl.load(p_s, mask=m_c[:, None] & (o_k < K - 1)[None, :], other=0.0).to(tl.float32)
    b_x = tl.load(x + i_b * sxb + o_c, mask=m_c, other=0.0).to(tl.float32)
    b_win = tl.where((o_k == K - 1)[None, :], b_x[:, None], b_win)
    b_w = tl.load(w + o_c[:, None] * swc + o_k[None, :], mask=m_c[:, None] & (o_k < K)[None, :], other=0.0)
    acc = tl.sum(b_win * b_w.to(tl.float32), axis=1)
    if HAS_BIAS:
        acc += tl.load(bias + o_c, mask=m_c, other=0.0).to(tl.float32)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y + i_b * C + o_c, acc.to(y.dtype.element_ty), mask=m_c)
    m_shift = m_c[:, None] & ((o_k >= 1) & (o_k < K))[None, :]
    tl.store(p_s - 1, b_win.to(state.dtype.element_ty), mask=m_shift)


def _blocks(channels_last: bool) -> tuple[int, int]:
    # channels contiguous: wide channel tiles for coalescing; [B, C, L] inputs: wide time tiles
    return (32, 64) if channels_last else (64, 32)


def _empty_like_layout(batch: int, channels: int, seqlen: int, channels_last: bool, **kw) -> torch.Tensor:
    """A [B, C, L] tensor whose memory is [B, L, C] when ``channels_last``."""
    if channels_last:
        return torch.empty(batch, seqlen, channels, **kw).transpose(1, 2)
    return torch.empty(batch, channels, seqlen, **kw)


def conv_fwd(x, w, bias, h0, silu: bool, channels_last: bool) -> torch.Tensor:
    """Launch the forward kernel: y [B, C, L] (memory [B, L, C] when ``channels_last``); w, h0 contiguous."""
    batch, channels, seqlen = x.shape
    y = _empty_like_layout(batch, channels, seqlen, channels_last, dtype=x.dtype, device=x.device)
    block_l, block_c = _blocks(x.stride(1) == 1)
    grid = (triton.cdiv(seqlen, block_l), triton.cdiv(channels, block_c), batch)
    causal_conv1d_fwd_kernel[grid](
        x, w, bias, h0, y, *x.stride(), *y.stride(), 0 if h0 is None or h0.dim() == 2 else h0.stride(0),
        seqlen, channels, K=w.shape[1], SILU=silu, BLOCK_L=block_l, BLOCK_C=block_c, num_warps=4,
    )  # fmt: skip
    return y


def conv_bwd(dy, x, w, bias, h0, silu: bool, weight_dtype: torch.dtype, needs: tuple[bool, bool, bool, bool]):
    """Launch the backward kernel: (dx, dweight, dbias, dh0), None where ``needs`` (x, weight, bias, h0) is False;
    dh0 [B, C, K-1] for a batched h0, else summed to [C, K-1]."""
    batch, channels, seqlen = x.shape
    width = w.shape[1]
    need_x, need_w, need_b, need_h0 = needs
    dx = _empty_like_layout(batch, channels, seqlen, x.stride(1) == 1, dtype=x.dtype, device=x.device)
    block_l, block_c = _blocks(x.stride(1) == 1)
    n_l = triton.cdiv(seqlen + width - 1, block_l)
    f32 = {"dtype": torch.float32, "device": x.device}
    dh0 = torch.empty(batch, channels, width - 1, **f32) if need_h0 else None
    dw = torch.empty(batch * n_l, channels, width, **f32) if (need_w or need_b) else None
    dbias = torch.empty(batch * n_l, channels, **f32) if (dw is not None and bias is not None) else None
    causal_conv1d_bwd_kernel[(n_l, triton.cdiv(channels, block_c), batch)](
        x, w, bias, h0, dy, dx, dh0, dw, dbias, *x.stride(), *dy.stride(), *dx.stride(),
        0 if h0 is None or h0.dim() == 2 else h0.stride(0), seqlen, channels,
        K=width, SILU=silu, BLOCK_L=block_l, BLOCK_C=block_c, num_warps=4,
    )  # fmt: skip
    d_w = dw.sum(0).to(weight_dtype) if need_w else None
    d_b = dbias.sum(0).to(bias.dtype) if need_b and dbias is not None else None
    d_h0 = None
    if need_h0:
        d_h0 = (dh0 if h0.dim() == 3 else dh0.sum(0)).to(h0.dtype)
    return (dx if need_x else None), d_w, d_b, d_h0


class CausalConv1dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, initial_state, silu, channels_last):
        w = weight.contiguous()
        h0 = None if initial_state is None else initial_state.contiguous()
        y = conv_fwd(x, w, bias, h0, silu, channels_last)
        ctx.save_for_backward(x, w, bias, h0)
        ctx.silu, ctx.weight_dtype = silu, weight.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, bias, h0 = ctx.saved_tensors
        grads = conv_bwd(dy, x, w, bias, h0, ctx.silu, ctx.weight_dtype, ctx.needs_input_grad[:4])
        return (*grads, None, None)


def causal_conv1d_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    initial_state: torch.Tensor | None = None,
    activation: str | None = None,
    return_final_state: bool = False,
    channels_last: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``causal_conv1d`` on the Triton kernels; arguments validated by ``ssmtune.ops.causal_conv1d``."""
    batch, channels, seqlen = x.shape
    width = weight.shape[1]
    if x.numel() == 0:  # nothing to launch: the torch path gives the empty output and the final state
        return causal_conv1d_torch(
            x, weight, bias, initial_state=initial_state, activation=activation,
            return_final_state=return_final_state, channels_last=channels_last,
        )  # fmt: skip
    y = CausalConv1dFunction.apply(x, weight, bias, initial_state, activation == "silu", channels_last)
    if not return_final_state:
        return y
    # the last K-1 entries of initial_state ⧺ x: small, and autograd routes their gradient into x / initial_state
    if seqlen >= width - 1:
        last = x[..., seqlen - (width - 1) :].clone(memory_format=torch.contiguous_format)  # not a view of x's buffer
    else:
        pad = x.new_zeros(channels, width - 1) if initial_state is None else initial_state.to(x.dtype)
        last = torch.cat([pad.expand(batch, channels, width - 1), x], dim=-1)[..., -(width - 1) :]
    return y, last


def causal_conv1d_update_triton(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    *,
    block: tuple[int, int] | None = None,
) -> torch.Tensor:
    """``causal_conv1d_update`` in one kernel (the torch path runs six: cat, mul, sum, bias add, state copy, SiLU);
    accumulation in fp32 as in ``causal_conv1d_triton``. No autograd. ``block``: (channels per program, a power of
    two; warps), default ``launch.conv_update_block``."""
    batch, channels = x.shape
    width = weight.shape[1]
    if conv_state.stride(-1) != 1:
        raise ValueError(f"causal_conv1d_update: conv_state must have a unit last stride (it is updated in place), "
                         f"got strides {conv_state.stride()}")  # fmt: skip
    x = layout.unit_last(x)
    weight = layout.unit_last(weight)
    y = torch.empty(batch, channels, dtype=x.dtype, device=x.device)
    block_c, warps = launch.conv_update_block(channels, x.device) if block is None else block
    causal_conv1d_update_kernel[(triton.cdiv(channels, block_c), batch)](
        x, conv_state, weight, bias, y, x.stride(0), conv_state.stride(0), conv_state.stride(1), weight.stride(0),
        channels, K=width, BLOCK_K=triton.next_power_of_2(width), SILU=activation == "silu", BLOCK_C=block_c,
        num_warps=warps,
    )  # fmt: skip
    return y
