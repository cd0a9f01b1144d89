"""Training: the loop (:func:`fit`), AdamW + linear schedule, atomic checkpoints, plots."""

from ssmtune.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from ssmtune.train.loop import (
    EpochSampler,
    NonFiniteLossError,
    TrainConfig,
    TrainResult,
    apply_precision,
    fit,
    save_model,
    token_loss,
)
from ssmtune.train.optim import build_optimizer, linear_schedule

__all__ = [
    "EpochSampler",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainResult",
    "apply_precision",
    "build_optimizer",
    "fit",
    "latest_checkpoint",
    "linear_schedule",
    "list_checkpoints",
    "load_checkpoint",
    "save_checkpoint",
    "save_model",
    "token_loss",
]
