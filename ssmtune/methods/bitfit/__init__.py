"""BitFit on conv1d.bias and dt_proj.bias (Mamba-2: dt_bias), docs/methods.md §5.3."""

from ...core.registry import register_method
from .config import BitFitConfig
from .layer import ParamOffset, TiedOffset, inject

register_method(BitFitConfig, inject)

__all__ = ["BitFitConfig", "ParamOffset", "TiedOffset", "inject"]
