"""SDT / SDLoRA: sparse channel/state deltas on the SSM parameters + LoRA on the projections, docs/methods.md §5.5."""

from ...core.registry import register_method
from .config import SDLoraConfig
from .layer import Layout, SparseDelta, inject
from .select import SDTSelection, sdt_select, select_dims, select_heads_rows

register_method(SDLoraConfig, inject)

__all__ = [
    "Layout",
    "SDLoraConfig",
    "SDTSelection",
    "SparseDelta",
    "inject",
    "sdt_select",
    "select_dims",
    "select_heads_rows",
]
