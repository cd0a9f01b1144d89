"""benchmarks/exp_selective_scan_sequential.py (an experimental Mamba-1 forward, timed on the GPU between sessions):
every variant matches the fp32 reference, so the experiment cannot rot on the CPU."""

from __future__ import annotations

import importlib
import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the module below decorates its kernel
pytest.importorskip("triton")

from ssmtune.ops.selective_scan import fused_seq

if not torch.cuda.is_available() and "Interpreted" not in type(fused_seq.selective_scan_fwd_seq_kernel.fn).__name__:
    # another test module imported the library's kernels before TRITON_INTERPRET was set; the experiment's kernel
    # calls fused_seq's step loads, which must be interpreted too
    importlib.reload(fused_seq)

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "exp_selective_scan_sequential.py")
_spec = importlib.util.spec_from_file_location("exp_selective_scan_sequential", _PATH)
exp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(exp)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(("chunk", "u_layout"), [(0, "conv"), (4, "conv"), (8, "conv"), (0, "time-major")])
@pytest.mark.parametrize("variant", exp.VARIANTS)
def test_variant_matches_reference(variant: str, chunk: int, u_layout: str) -> None:
    # D 5 over blocks of 4 channels, L 11 over 4-step blocks (and 3 or 2 chunks): ragged last blocks; y poisoned
    assert exp.check([variant, 4, 4, 1, chunk], DEVICE, shape=(2, 5, 11, 3), u_layout=u_layout) < 1e-5


def test_bad_arguments_are_named() -> None:
    x = exp.inputs(1, 4, 4, 2, torch.float32, DEVICE)
    with pytest.raises(ValueError, match="'tile_xx'"):
        exp.seq_fwd(*x, variant="tile_xx")
    with pytest.raises(ValueError, match="chunk 12 is not a multiple of k 8"):
        exp.seq_fwd(*x, k=8, chunk=12)
    with pytest.raises(ValueError, match="u_layout 'cm'"):
        exp.inputs(1, 4, 4, 2, torch.float32, DEVICE, u_layout="cm")
