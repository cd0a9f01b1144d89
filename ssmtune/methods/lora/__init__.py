"""LoRA and DoRA on the mixers' Linears and their row slices (docs/methods.md §5.2)."""

from ...core.registry import register_method
from .config import LoraConfig
from .layer import LoraDelta, inject

register_method(LoraConfig, inject)

__all__ = ["LoraConfig", "LoraDelta", "inject"]
