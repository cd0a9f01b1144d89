"""Gated delta rule ops (Gated DeltaNet, KDA): the fp32 reference (``naive.py``), the chunked torch path with autograd
(``chunk.py``) and flash-linear-attention's kernels when installed (``fla.py``), in fla's layout."""

GATED_DELTA_BACKENDS = ("auto", "ref", "torch", "fla", "triton")
