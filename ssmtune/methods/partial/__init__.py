"""Partial and full fine-tuning as parameter deltas, docs/methods.md §5.6."""

from ...core.registry import register_method
from .config import FullConfig, PartialConfig
from .layer import base_parameters, inject, pattern_matches

register_method(PartialConfig, inject)
register_method(FullConfig, inject)

__all__ = ["FullConfig", "PartialConfig", "base_parameters", "inject", "pattern_matches"]
