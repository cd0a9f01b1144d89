"""Layout changes between the mixers' time-major views and the Mamba-1 scan's channel-major rows, in Triton.

The Mamba-1 scan reads and writes [B, D, L] rows (time contiguous), while ``dt_proj``, ``in_proj`` and ``out_proj``
produce and take [B, L, D] (channels contiguous). ``Tensor.contiguous()`` on such a transposed view runs torch's generic
strided copy, which reads or writes with a stride of D elements. Here one program moves a [BLOCK_R, BLOCK_C] tile: the
load is coalesced along the source's unit-stride axis and the store along the destination's (Triton converts the tile's
layout through shared memory in between).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def transpose_copy_kernel(
    x, y, R, C, sxb, sxr, sxc, syb, syr, syc, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr
):  # fmt: skip
    # y[b, r, c] = x[b, r, c] for any strides; the launcher passes a transposed view on one side
    i_r, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    o_r = (i_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    o_c = (i_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    m = (o_r < R)[:, None] & (o_c < C)[None, :]
    b_x = tl.load(x + i_b * sxb + o_r[:, None] * sxr + o_c[None, :] * sxc, mask=m)
    tl.store(y + i_b * syb + o_r[:, None] * syr + o_c[None, :] * syc, b_x, mask=m)


def transpose_last2(x: torch.Tensor) -> torch.Tensor:
    """``x.transpose(1, 2).contiguous()`` for a 3-d tensor [B, R, C] of any strides: returns [B, C, R], contiguous."""
    if x.dim() != 3:
        raise ValueError(f"transpose_last2: expected a 3-d tensor, got shape {tuple(x.shape)}")
    batch, rows, cols = x.shape
    y = torch.empty(batch, cols, rows, device=x.device, dtype=x.dtype)
    if x.numel() == 0:
        return y
    yt = y.transpose(1, 2)  # [B, R, C] view of the output
    block = 64
    grid = (triton.cdiv(rows, block), triton.cdiv(cols, block), batch)
    transpose_copy_kernel[grid](
        x, yt, rows, cols, *x.stride(), *yt.stride(), BLOCK_R=block, BLOCK_C=block, num_warps=4
    )  # fmt: skip
    return y


# Below this many elements an eager call keeps torch's copy: the kernel saves less GPU time there than its Python
# launch costs (~20 us), and the eager 4 x 512 step of a 130m model is bound by launches. Under CUDA-graph capture
# launches cost nothing at replay, so the kernel is used at every size.
SMALL_NUMEL = 1 << 22


def is_time_major_view(t: torch.Tensor) -> bool:
    """True for a [B, D, L] view whose channels, not times, are contiguous (a transposed [B, L, D] tensor or slice)."""
    return t.dim() == 3 and not t.is_contiguous() and t.stride(1) == 1 and t.shape[2] > 1


def large_or_captured(t: torch.Tensor) -> bool:
    """Whether an extra kernel launch on ``t`` pays: at least ``SMALL_NUMEL`` elements, or any size under graph
    capture."""
    return t.numel() >= SMALL_NUMEL or (t.is_cuda and torch.cuda.is_current_stream_capturing())


def _use_kernel(t: torch.Tensor) -> bool:
    return is_time_major_view(t) and large_or_captured(t)


class _ChannelMajor(torch.autograd.Function):
    """[B, D, L] time-major view -> contiguous [B, D, L]; the gradient goes back as a time-major view of a contiguous
    [B, L, D] tensor, so ``dt_proj`` / ``in_proj``'s backward read it without another copy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return transpose_last2(x.transpose(1, 2))

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        return transpose_last2(g).transpose(1, 2)


def channel_major(t: torch.Tensor | None) -> torch.Tensor | None:
    """A [B, D, L] tensor with contiguous rows: time-major views of at least ``SMALL_NUMEL`` elements (any size during
    graph capture) through the tiled transpose, others as they are or through ``contiguous()``."""
    if t is None or t.is_contiguous():
        return t
    if _use_kernel(t):
        return _ChannelMajor.apply(t)
    return t.contiguous()


def contiguous_rows(t: torch.Tensor) -> torch.Tensor:
    """``t.contiguous()`` for a tensor without autograd history (the scan backward's incoming gradient)."""
    if t.is_contiguous():
        return t
    if _use_kernel(t):
        return transpose_last2(t.transpose(1, 2))
    return t.contiguous()


def unit_last(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` itself when its last dim is dense (a kernel that takes the other strides reads it in place), else a
    contiguous copy."""
    return t if t is None or t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()
