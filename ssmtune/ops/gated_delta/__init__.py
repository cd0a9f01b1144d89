"""Gated delta rule ops (Gated DeltaNet, KDA): the fp32 reference (``naive.py``), the chunked torch path with autograd
(``chunk.py``) and flash-linear-attention's kernels when installed (``fla.py``; ``fla_bwd.py`` stands in for the one
backward kernel fla refuses on Hopper with some Triton releases), in fla's layout."""

GATED_DELTA_BACKENDS = ("auto", "ref", "torch", "fla", "triton")
