"""Partial and full fine-tuning as parameter deltas, METHODS.md §4.9."""

from ...core.registry import register_method
from .config import FullConfig, PartialConfig
from .layer import base_parameters, inject, pattern_matches

register_method(PartialConfig, inject)
register_method(FullConfig, inject)

__all__ = ["FullConfig", "PartialConfig", "base_parameters", "inject", "pattern_matches"]
