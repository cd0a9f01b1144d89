"""Additional-scan: n' extra, trainable state dimensions (Mamba-1), docs/methods.md §5.4."""

from ...core.registry import register_method
from .config import AdditionalScanConfig
from .layer import ExtraStateColumns, ExtraStateRows, extra_a_log, inject

register_method(AdditionalScanConfig, inject)

__all__ = ["AdditionalScanConfig", "ExtraStateColumns", "ExtraStateRows", "extra_a_log", "inject"]
