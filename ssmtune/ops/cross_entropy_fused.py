"""Token cross-entropy in Triton: the logits are read in their own dtype and the gradient is written in it.

Semantics are those of ``cross_entropy_torch`` in ``cross_entropy.py`` (``F.cross_entropy`` on fp32 logits). Why a
kernel: the torch path casts the [tokens, vocab] logits to fp32, saves the fp32 log-softmax for the backward and casts
the fp32 gradient back, some 25 GB of traffic and 6.6 GB of fp32 tensors for a 50k vocabulary at 8 × 2048 (the
softmax kernels alone took 6.4 of the Mamba-1-130m training step's 94 ms of GPU time in a profile on an H200).

Forward: one program per row walks the vocabulary in BLOCK_V chunks with a running max and sum (online logsumexp),
reads the label's logit once and stores the row's loss and logsumexp (fp32). Backward: one program per row writes
(softmax − one-hot) · scale, where scale is the incoming gradient (divided by the number of counted rows for the
mean). Rows labelled ``ignore_index`` get loss 0 and gradient 0; a label outside [0, vocab) gives a NaN loss for its row
(no host synchronisation to check it, so the step stays CUDA-graph safe; the trainers stop on a non-finite loss).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .cross_entropy import cross_entropy_torch

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit(do_not_specialize=["ignore_index"])
def cross_entropy_fwd_kernel(logits, labels, loss, lse, stride_r, V, ignore_index, BLOCK_V: tl.constexpr):
    i_r = tl.program_id(0).to(tl.int64)
    p = logits + i_r * stride_r
    o_v = tl.arange(0, BLOCK_V)[None, :]  # the row as a [1, BLOCK_V] tile: its reductions are [1] tensors
    b_m = tl.full([1], float("-inf"), tl.float32)  # running max
    b_s = tl.zeros([1], dtype=tl.float32)  # running Σ exp(x - m)
    off = 0
    while off < V:
        m_v = off + o_v < V
        b_x = tl.load(p + off + o_v, mask=m_v, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(b_m, tl.max(b_x, axis=1))
        # an all -inf prefix (masked vocabulary) would give -inf - -inf = NaN: shift by 0 instead
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        # x - m before the base change: scaling x first would put |x| · 2^-24 of rounding into every exponent
        b_s = b_s * tl.exp2((b_m - m_safe) * LOG2E) + tl.sum(tl.exp2((b_x - m_safe[:, None]) * LOG2E), axis=1)
        b_m = m_new
        off += BLOCK_V
    b_lse = b_m + tl.log2(b_s) * LN2
    o_1 = tl.arange(0, 1)
    b_y = tl.load(labels + i_r + o_1)
    valid = b_y != ignore_index
    in_range = (b_y >= 0) & (b_y < V)
    b_xy = tl.load(p + b_y, mask=valid & in_range, other=0.0).to(tl.float32)
    b_loss = tl.where(valid, tl.where(in_range, b_lse - b_xy, float("nan")), 0.0)
    tl.store(loss + i_r + o_1, b_loss)
    tl.store(lse + i_r + o_1, b_lse)


@triton.jit(do_not_specialize=["ignore_index"])
def cross_entropy_bwd_kernel(
    logits, labels, lse, dloss, dlogits, stride_r, stride_dloss, V, ignore_index, BLOCK_V: tl.constexpr
):
    i_r = tl.program_id(0).to(tl.int64)
    p = logits + i_r * stride_r
    p_d = dlogits + i_r * V
    o_v = tl.arange(0, BLOCK_V)[None, :]
    o_1 = tl.arange(0, 1)
    b_y = tl.load(labels + i_r + o_1)[:, None]  # [1, 1]
    valid = b_y != ignore_index
    b_g = tl.load(dloss + i_r * stride_dloss + o_1)[:, None]
    b_lse = tl.load(lse + i_r + o_1)[:, None]
    off = 0
    while off < V:
        o_c = off + o_v
        m_v = o_c < V
        b_x = tl.load(p + o_c, mask=m_v, other=0.0).to(tl.float32)
        b_d = (tl.exp2((b_x - b_lse) * LOG2E) - tl.where(o_c == b_y, 1.0, 0.0)) * b_g
        # ignored rows: 0, not 0 · NaN when their logsumexp is not finite
        tl.store(p_d + o_c, tl.where(valid, b_d, 0.0).to(dlogits.dtype.element_ty), mask=m_v)
        off += BLOCK_V


def _block_v(vocab: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps): 4096-wide chunks on 8 warps, 16 elements per thread."""
    block = min(4096, triton.next_power_of_2(max(vocab, 16)))
    return block, max(1, min(8, block // 512))


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, reduction):
        rows, vocab = logits.shape
        if logits.stride(1) != 1:
            logits = logits.contiguous()
        labels = labels.contiguous()
        loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
        lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
        block, warps = _block_v(vocab)
        cross_entropy_fwd_kernel[(rows,)](
            logits, labels, loss, lse, logits.stride(0), vocab, ignore_index, BLOCK_V=block, num_warps=warps
        )
        # the count stays on the device (no synchronisation: CUDA-graph safe); 0 counted rows give NaN, as torch
        count = (labels != ignore_index).sum().float() if reduction == "mean" else None
        ctx.save_for_backward(logits, labels, lse, count)
        ctx.ignore_index, ctx.reduction = ignore_index, reduction
        if reduction == "none":
            return loss
        return loss.sum() if reduction == "sum" else loss.sum() / count

    @staticmethod
    def backward(ctx, dloss):
        logits, labels, lse, count = ctx.saved_tensors
        rows, vocab = logits.shape
        dloss = dloss.float()
        if ctx.reduction == "mean":
            dloss = dloss / count
        dloss = dloss.reshape(-1).contiguous()
        stride = 1 if ctx.reduction == "none" else 0
        dlogits = torch.empty(rows, vocab, dtype=logits.dtype, device=logits.device)
        block, warps = _block_v(vocab)
        cross_entropy_bwd_kernel[(rows,)](
            logits, labels, lse, dloss, dlogits, logits.stride(0), stride, vocab, ctx.ignore_index,
            BLOCK_V=block, num_warps=warps,
        )  # fmt: skip
        return dlogits, None, None, None


def cross_entropy_triton(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100, reduction: str = "mean"
) -> torch.Tensor:
    """``cross_entropy`` on the Triton kernels; arguments validated by ``ssmtune.ops.cross_entropy``."""
    if logits.numel() == 0:
        return cross_entropy_torch(logits, labels, ignore_index=ignore_index, reduction=reduction)
    return CrossEntropyFunction.apply(logits, labels, int(ignore_index), reduction)
