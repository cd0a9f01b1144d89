"""Token cross-entropy of a language-model head: the torch path and the argument checks.

    logits  [R, V] (any float dtype; row stride free, columns contiguous)     labels  [R] integer

loss_r = logsumexp(logits_r) − logits_r[labels_r], computed in fp32 (``F.cross_entropy(logits.float(), ...)``); rows
whose label is ``ignore_index`` count 0 and are left out of the mean. The op ``ssmtune.ops.cross_entropy`` dispatches
between this and the Triton kernels of ``cross_entropy_fused.py``, which read the logits in their own dtype and write
the gradient in it (no fp32 copy of a [tokens, vocab] tensor: 3.3 GB for a 50k vocabulary at 8 × 2048).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "sum", "none")


def check_cross_entropy_args(logits, labels, reduction) -> None:
    """ValueError naming the bad argument of ``cross_entropy``."""
    op = "cross_entropy"
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        got = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"{op}: logits must be a 2-D tensor [tokens, vocab], got {got}")
    if not logits.is_floating_point():
        raise ValueError(f"{op}: logits must be a floating-point tensor, got dtype {logits.dtype}")
    if not isinstance(labels, torch.Tensor) or labels.shape != logits.shape[:1]:
        got = list(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"{op}: labels must have shape [{logits.shape[0]}] (logits' rows), got {got}")
    if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"{op}: labels must be an integer tensor, got dtype {labels.dtype}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def cross_entropy_torch(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100, reduction: str = "mean"
) -> torch.Tensor:
    """The torch path of ``ssmtune.ops.cross_entropy``: fp32 logits through ``F.cross_entropy``."""
    return F.cross_entropy(logits.float(), labels.long(), ignore_index=ignore_index, reduction=reduction)
