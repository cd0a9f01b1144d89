"""The op dispatcher: argument validation, backend resolution, and keyword forwarding."""

from __future__ import annotations

import types
import warnings

import pytest
import torch

from ssmtune import ops
from ssmtune.ops.selective_scan.parallel import selective_scan_torch
from ssmtune.ops.ssd.chunk import ssd_scan_torch
from ssmtune.ops.testing import assert_close


def m1_args(b=2, d=5, seqlen=7, n=3):
    return {
        "u": torch.randn(b, d, seqlen),
        "delta": torch.rand(b, d, seqlen),
        "A": -torch.rand(d, n),
        "B": torch.randn(b, n, seqlen),
        "C": torch.randn(b, n, seqlen),
    }


def m2_args(b=2, seqlen=7, h=4, g=2, p=3, n=5):
    return {
        "x": torch.randn(b, seqlen, h, p),
        "dt": torch.rand(b, seqlen, h),
        "A": -torch.rand(h),
        "B": torch.randn(b, seqlen, g, n),
        "C": torch.randn(b, seqlen, g, n),
    }


@pytest.mark.parametrize(
    "name, value, pattern",
    [
        ("delta", torch.rand(2, 5, 6), r"delta must have shape \[2, 5, 7\], got \[2, 5, 6\]"),
        ("A", torch.rand(4, 3), r"A must have shape \[5, None\], got \[4, 3\]"),
        ("C", torch.rand(2, 4, 7), r"C must have shape \[2, 3, 7\], got \[2, 4, 7\]"),
        ("initial_state", torch.rand(5, 4), r"initial_state must have shape \[5, 3\] or \[2, 5, 3\], got \[5, 4\]"),
        ("state_offset", torch.rand(3, 5, 3), r"state_offset must have shape \[5, 3\] or \[2, 5, 3\], got \[3, 5, 3\]"),
        ("y_offset", torch.rand(5, 1), r"y_offset must have shape \[5\] or \[2, 5\], got \[5, 1\]"),
        ("D", torch.rand(6), r"D must have shape \[5\], got \[6\]"),
        ("u", torch.ones(2, 5, 7, dtype=torch.long), r"u must be a floating-point tensor, got dtype torch.int64"),
        ("B", torch.ones(2, 3, 7, dtype=torch.int32), r"B must be a floating-point tensor, got dtype torch.int32"),
        ("A", [[-1.0]], r"A must be a torch.Tensor, got list"),
    ],
)
def test_selective_scan_bad_arguments(name, value, pattern):
    args = m1_args() | {name: value}
    with pytest.raises(ValueError, match=r"selective_scan: " + pattern):
        ops.selective_scan(**args, backend="torch")


@pytest.mark.parametrize(
    "name, value, pattern",
    [
        ("B", torch.randn(2, 7, 3, 5), r"nheads \(4\) must be divisible by ngroups \(3\)"),
        ("dt", torch.rand(2, 7, 3), r"dt must have shape \[2, 7, 4\], got \[2, 7, 3\]"),
        ("D", torch.rand(4, 2), r"D must have shape \[4\] or \[4, 3\], got \[4, 2\]"),
        ("initial_state", torch.rand(4, 3, 6), r"initial_state must have shape \[4, 3, 5\] or \[2, 4, 3, 5\]"),
        ("y_offset", torch.rand(2, 4), r"y_offset must have shape \[4, 3\] or \[2, 4, 3\], got \[2, 4\]"),
        ("x", torch.ones(2, 7, 4, 3, dtype=torch.long), r"x must be a floating-point tensor, got dtype torch.int64"),
    ],
)
def test_ssd_scan_bad_arguments(name, value, pattern):
    args = m2_args() | {name: value}
    with pytest.raises(ValueError, match=r"ssd_scan: " + pattern):
        ops.ssd_scan(**args, backend="torch")


def test_ssd_scan_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_size must be positive, got 0"):
        ops.ssd_scan(**m2_args(), chunk_size=0, backend="torch")


def test_state_update_bad_state_shape():
    b, d, n = 2, 5, 3
    with pytest.raises(ValueError, match=r"selective_state_update: state must have shape \[2, 5, 3\], got \[2, 5, 4\]"):
        ops.selective_state_update(
            torch.zeros(b, d, n + 1), torch.randn(b, d), torch.rand(b, d), -torch.rand(d, n),
            torch.randn(b, n), torch.randn(b, n), backend="torch",
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"ssd_state_update: state must have shape \[2, 4, 3, 5\], got \[2, 4, 5, 3\]"):
        ops.ssd_state_update(
            torch.zeros(2, 4, 5, 3), torch.randn(2, 4, 3), torch.rand(2, 4), -torch.rand(4),
            torch.randn(2, 2, 5), torch.randn(2, 2, 5), backend="torch",
        )  # fmt: skip


@pytest.mark.parametrize("op", ["selective_scan", "ssd_scan"])
def test_unknown_backend_raises(op):
    args = m1_args() if op == "selective_scan" else m2_args()
    with pytest.raises(ValueError, match=r"backend must be one of .*, got 'cuda'"):
        getattr(ops, op)(**args, backend="cuda")


def test_auto_on_cpu_picks_torch(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu = torch.device("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ops.resolve("selective_scan", "auto", cpu) is selective_scan_torch
        assert ops.resolve("ssd_scan", "auto", cpu) is ssd_scan_torch
    assert ops.resolve("selective_scan", "torch", cpu) is selective_scan_torch
    assert ops.resolve("ssd_scan", "ref", cpu) is ops.ssd_scan_ref


def test_dispatcher_forwards_every_argument():
    """ref and torch through the dispatcher agree with every optional input set (catches argument-order slips)."""
    b, d, seqlen, n = 2, 5, 7, 3
    extra = {
        "D": torch.randn(d),
        "z": torch.randn(b, d, seqlen),
        "delta_bias": torch.randn(d),
        "delta_softplus": True,
        "initial_state": torch.randn(d, n),
        "state_offset": torch.randn(b, d, n),
        "y_offset": torch.randn(d),
    }
    args = m1_args(b, d, seqlen, n) | extra
    y_ref, h_ref = ops.selective_scan(**args, return_final_state=True, backend="ref")
    y, h = ops.selective_scan(**args, return_final_state=True, backend="torch")
    assert_close("m1 y", y_ref, y, 5e-5)
    assert_close("m1 h", h_ref, h, 5e-5)
    assert (y_ref - ops.selective_scan(**m1_args(b, d, seqlen, n), backend="ref")).abs().max() > 1e-3
    b, seqlen, h, g, p, n = 2, 7, 4, 2, 3, 5
    extra = {
        "D": torch.randn(h, p),
        "z": torch.randn(b, seqlen, h, p),
        "dt_bias": torch.randn(h),
        "dt_softplus": True,
        "initial_state": torch.randn(b, h, p, n),
        "state_offset": torch.randn(h, p, n),
        "y_offset": torch.randn(b, h, p),
    }
    args = m2_args(b, seqlen, h, g, p, n) | extra
    y_ref, h_ref = ops.ssd_scan(**args, return_final_state=True, backend="ref")
    y, h_last = ops.ssd_scan(**args, chunk_size=3, return_final_state=True, backend="torch")
    assert_close("m2 y", y_ref, y, 5e-5)
    assert_close("m2 h", h_ref, h_last, 5e-5)


def _alloc() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty(4), torch.empty_like(torch.zeros(3))


def test_empty_is_nan_poisoned_inside_ops():
    """The conftest fixture must poison allocations made from ssmtune.ops modules: rebind a function to such globals."""
    probe = types.FunctionType(_alloc.__code__, {"__name__": "ssmtune.ops._probe", "torch": torch})
    t, t_like = probe()
    assert t.isnan().all() and t_like.isnan().all()
