"""Mamba-2 SSD ops: the reference (``naive.py``), the torch chunked path (``chunk.py``), the Triton kernels
(``fused.py``)."""

# Head dims below this are refused on CUDA. ssd_chunk_scan_bwd_dx_kernel faulted at head dim 16 on an H200 (triton
# 3.6) and the dx / dC kernels on 8 warps returned wrong gradients there (dA off by 45-230x), right ones on 4 warps,
# which every head dim now runs on. Head dims below 16 were never run on the GPU: ``ssmtune.ops.ssd_scan(backend="auto")``
# sends them to the torch path. The CPU interpreter runs every head dim (the small-shape tests use small ones).
SSD_MIN_HEADDIM_CUDA = 16
