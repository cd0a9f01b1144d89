"""RMSNorm, optionally gated by silu(z) and normalised per group of channels: the torch path.

    x, z  [..., H]     weight  [H]     group_size  divides H (default H)

out = weight · (x̂ · rsqrt(mean_group(x̂²) + eps)).to(x.dtype), x̂ = x ⊙ silu(z) (or x), computed in fp32: the
models' ``RMSNorm`` (transformers' rounding order) and ``RMSNormGated`` (mamba_ssm's ``norm_before_gate=False``). The
op ``ssmtune.ops.rms_norm`` dispatches between this and the Triton kernels of ``norm_fused.py``.

``add_rms_norm``: the residual add of a pre-norm block fused into the next norm, s = x + y (in the promoted dtype of
x and y, as ``x + y``), then the RMSNorm of s; forward only (the models use it when no gradient is needed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def check_rms_norm_args(x, weight, z, group_size, op: str = "rms_norm") -> None:
    """ValueError naming the bad argument of ``rms_norm`` (or of ``op``, which calls it)."""
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"{op}: weight must have shape [{hidden}] (x's last dim), got {list(weight.shape)}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"{op}: z must have x's shape {list(x.shape)}, got {list(z.shape)}")
    if group_size is not None and (group_size <= 0 or hidden % group_size):
        raise ValueError(f"{op}: group_size must divide the last dim {hidden}, got {group_size}")


def check_add_rms_norm_args(x, y, weight, group_size) -> None:
    """ValueError naming the bad argument of ``add_rms_norm``."""
    if y.shape != x.shape:
        raise ValueError(f"add_rms_norm: y must have x's shape {list(x.shape)}, got {list(y.shape)}")
    if y.device != x.device:
        raise ValueError(f"add_rms_norm: y must be on x's device {x.device}, got {y.device}")
    check_rms_norm_args(x, weight, None, group_size, op="add_rms_norm")


def rms_norm_torch(
    x: torch.Tensor, weight: torch.Tensor, *, z: torch.Tensor | None = None, eps: float = 1e-5,
    group_size: int | None = None, input_dtype: torch.dtype | None = None,
) -> torch.Tensor:  # fmt: skip
    """The torch path of ``ssmtune.ops.rms_norm``."""
    if input_dtype is not None:
        x = x.to(input_dtype)
    dtype = x.dtype
    xf = x.float()
    if z is not None:
        xf = xf * F.silu(z.float())
    shape = xf.shape
    gs = shape[-1] if group_size is None else group_size
    xg = xf.view(*shape[:-1], shape[-1] // gs, gs)
    xg = xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xg.view(shape).to(dtype)


def add_rms_norm_torch(
    x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, *, eps: float = 1e-5, group_size: int | None = None,
    input_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The torch path of ``ssmtune.ops.add_rms_norm``: (x + y, rms_norm(x + y))."""
    s = x + y
    return s, rms_norm_torch(s, weight, eps=eps, group_size=group_size, input_dtype=input_dtype)
