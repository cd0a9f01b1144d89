"""Prefix-Tuning with real per-layer virtual tokens, served as (h0, conv0) (docs/methods.md §4.4)."""

from ...core.registry import register_method
from .config import PrefixTuningConfig
from .hook import PrefixStates, inject

register_method(PrefixTuningConfig, inject)

__all__ = ["PrefixStates", "PrefixTuningConfig", "inject"]
