"""Launch settings of the decode-step kernels: the state updates (``selective_state_update``, ``ssd_state_update``) and
the conv update (``causal_conv1d_update``).

A decode step updates a state of [rows, N] per (batch row, head) with nothing to reuse between its elements: the kernel
is latency-bound at batch 1 and bandwidth-bound at large batches. Small tiles of about 512 elements (4 warps; 8 above
N = 128) spread one step over many programs, so that at batch 1 the state of a layer is read by most of the GPU's
SMs rather than by a few programs walking big tiles one after the other; mamba_ssm's hand-tuned table for its state
update kernel is the same. The Triton interpreter (CPU) runs programs one after another in Python: there the tiles
stay large, which changes no result (every tile is masked), only the number of programs.
"""

from __future__ import annotations

import torch
import triton

TILE = 512
"""Elements of the state one program updates on CUDA (rows of the tile = TILE // N, at least MIN_ROWS)."""
MIN_ROWS = 4
INTERPRETER_TILE = 8192
"""The tile under the CPU interpreter, where each program costs Python time."""


def decode_tile(rows: int, n: int, device: torch.device) -> tuple[int, int]:
    """(tile rows, warps) for a decode-step kernel over ``rows`` state rows of ``n`` (padded to a power of two)
    elements each on ``device``."""
    block_n = triton.next_power_of_2(n)
    tile = TILE if device.type == "cuda" else INTERPRETER_TILE
    block_rows = min(triton.next_power_of_2(rows), max(MIN_ROWS if device.type == "cuda" else 1, tile // block_n))
    return block_rows, 4 if block_n <= 128 else 8


CONV_UPDATE_CHANNELS = 64
"""Channels per program of the conv update on CUDA (2 warps): a batch-1 step of 1,536 channels runs 24 programs
rather than 6 (mamba_ssm's causal_conv1d update also gives 64 channels to a block). Under the interpreter, 256."""


def conv_update_block(channels: int, device: torch.device) -> tuple[int, int]:
    """(channels per program, warps) of the conv update over ``channels`` on ``device``."""
    block_c = min(CONV_UPDATE_CHANNELS if device.type == "cuda" else 256, triton.next_power_of_2(channels))
    return block_c, 2 if block_c <= 64 else 4
