"""Additional-scan: n' extra, trainable state dimensions (Mamba-1), METHODS.md §4.8."""

from ...core.registry import register_method
from .config import AdditionalScanConfig
from .layer import ExtraStateColumns, ExtraStateRows, extra_a_log, inject

register_method(AdditionalScanConfig, inject)

__all__ = ["AdditionalScanConfig", "ExtraStateColumns", "ExtraStateRows", "extra_a_log", "inject"]
