"""Error metrics shared by the op tests and benchmarks (fla-style ``assert_close``)."""

from __future__ import annotations

import torch


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    """RMS(out - ref) / RMS(ref), computed in fp64; NaN when either side is not finite."""
    ref, out = ref.detach().double(), out.detach().double()
    err = (out - ref).square().mean().sqrt()
    base = ref.square().mean().sqrt()
    return (err / (base + 1e-12)).item()


def abs_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    """max |out - ref| in fp64 (0 for empty tensors)."""
    if ref.numel() == 0:
        return 0.0
    return (out.detach().double() - ref.detach().double()).abs().max().item()


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, ratio: float, atol: float = 1e-6) -> None:
    """Fail unless ``out`` matches ``ref``: max abs error <= ``atol`` or RMS-relative error < ``ratio``.

    Fails on a shape mismatch and on any NaN/inf in either tensor; the message carries the numbers.
    """
    if ref is None or out is None:
        raise AssertionError(f"{name}: got None (ref is None: {ref is None}, out is None: {out is None})")
    if tuple(ref.shape) != tuple(out.shape):
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference shape {tuple(ref.shape)}")
    bad_ref = (~torch.isfinite(ref.detach())).sum().item()
    bad_out = (~torch.isfinite(out.detach())).sum().item()
    if bad_ref or bad_out:
        raise AssertionError(f"{name}: non-finite values (reference: {bad_ref}, output: {bad_out} of {ref.numel()})")
    a, r = abs_err(ref, out), rel_err(ref, out)
    msg = f"{name}: max abs err {a:.3e}, rms rel err {r:.3e} (ratio {ratio:.1e}, atol {atol:.1e})"
    if a <= atol:
        return
    assert r < ratio, msg
