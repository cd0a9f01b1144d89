"""Mamba-2 SSD ops: the reference (``naive.py``), the torch chunked path (``chunk.py``), the Triton kernels
(``fused.py``)."""

# Head dims below this are refused on CUDA. Session 8 saw ssd_chunk_scan_bwd_dx_kernel fault at head dim 16 on an H200
# (triton 3.6); session 10 found the dx / dC kernels on 8 warps return wrong gradients there (dA off by 45-230x), and
# right ones on 4 warps (benchmarks/exp_ssd_small_headdim.py); since session 14 every head dim runs on 4. Head dims
# below 16 were never run on the GPU: ``ssmtune.ops.ssd_scan(backend="auto")`` sends them to the torch path. The CPU
# interpreter runs every head dim (the small-shape tests use small ones).
SSD_MIN_HEADDIM_CUDA = 16
