"""Mamba-2 SSD ops: the reference (``naive.py``), the torch chunked path (``chunk.py``), the Triton kernels
(``fused.py``)."""

# Head dims below this are refused on CUDA. At head dim 16 the dx / dC kernels on 8 warps faulted or returned wrong
# gradients on an H200 (triton 3.6; dA off by 45-230x), and right ones on 4 warps; every head dim now runs on 4.
# Head dims below 16 were never run on the GPU: ``ssmtune.ops.ssd_scan(backend="auto")`` sends them to the torch path.
# The CPU interpreter runs every head dim (the small-shape tests use small ones).
SSD_MIN_HEADDIM_CUDA = 16
