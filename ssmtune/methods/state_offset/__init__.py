"""State-offset Tuning (h and y variants), docs/methods.md §4.1-4.2."""

from ...core.registry import register_method
from .config import StateOffsetConfig
from .hook import StateOffset, inject

register_method(StateOffsetConfig, inject)

__all__ = ["StateOffset", "StateOffsetConfig", "inject"]
