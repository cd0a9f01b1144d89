"""Optimiser and learning-rate schedule (docs/methods.md §9: HF Trainer defaults).

AdamW with β = (0.9, 0.999), ε = 1e-8 and weight decay 0, then a linear decay of the learning rate to 0 after an
optional linear warm-up (0 steps by default, as in the papers).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def param_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Split trainable parameters into a decayed group and a no-decay group (biases, norms, 1-d tensors).

    HF Trainer exempts biases and LayerNorm/RMSNorm weights from weight decay; with the default decay of 0 the split
    changes nothing.
    """
    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of ``model``; raises ValueError when nothing is trainable."""
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    groups = param_groups(model.named_parameters(), weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters (did the adapter attach anything?)")
    # torch's default implementation: the multi-tensor (foreach) kernels on CUDA, a few launches per step instead of
    # about ten per parameter (LoRA on a 24-layer model trains 192 tensors), the per-tensor loop on the CPU. Both are
    # deterministic, so a resumed run is still bit-identical to an uninterrupted one (tests/train/test_loop.py checks
    # it on the CPU; the graphed fit tests ran the foreach path on the GPU).
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def linear_schedule(
    optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 over ``warmup_steps``, then linear decay to 0 at ``total_steps`` (HF ``linear``)."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps!r}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps!r}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def set_capturable(optimizer: torch.optim.Optimizer, capturable: bool) -> None:
    """Switch an Adam/AdamW optimizer (and any state it already has, e.g. from a checkpoint) between the eager form
    and the CUDA-graph form (``capturable``: step counts and the learning rate as device tensors, so that a captured
    step reads the scheduler's current rate instead of the one it was captured with). Loading a state dict resets a
    group's settings to the saved ones, so call this after ``load_state_dict``."""
    for group in optimizer.param_groups:
        if "capturable" not in group:
            raise ValueError(f"{type(optimizer).__name__} has no capturable mode")
        device = group["params"][0].device
        group["capturable"] = capturable
        lr = float(group["lr"])
        group["lr"] = torch.tensor(lr, dtype=torch.float32, device=device) if capturable else lr
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(device=p.device if capturable else "cpu", dtype=torch.float32)
