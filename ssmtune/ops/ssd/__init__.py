"""Mamba-2 SSD ops: the reference (``naive.py``), the torch chunked path (``chunk.py``), the Triton kernels
(``fused.py``)."""

# Head dims below this fault in ssd_chunk_scan_bwd_dx_kernel on the GPU: headdim 16 gave an illegal memory access on
# an H200 with triton 3.6 at every N (16, 32) and G (1, 2) tried, headdim 32 and 64 passed (2026-12-02, found by
# tests/ops/test_fused_model_paths.py). Not understood yet, so refused; ``ssmtune.ops.ssd_scan(backend="auto")`` sends
# such calls to the torch path. The CPU interpreter runs them (the small-shape tests use head dims below 32).
SSD_MIN_HEADDIM_CUDA = 32
