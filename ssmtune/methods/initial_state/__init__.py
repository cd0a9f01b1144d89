"""Initial State Tuning (h0, optionally conv0), docs/methods.md §4.3."""

from ...core.registry import register_method
from .config import InitialStateConfig
from .hook import InitialState, inject

register_method(InitialStateConfig, inject)

__all__ = ["InitialState", "InitialStateConfig", "inject"]
