from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...core.config import AdapterConfig


@dataclass(kw_only=True)
class BitFitConfig(AdapterConfig):
    """BitFit (docs/methods.md §5.3): train the existing biases as zero-init deltas on their pretrained values,
    b' = b + δ.

    Mamba-1: ``conv1d.bias`` [D] and ``dt_proj.bias`` [D] (b_dt), 2·D per layer (the authors' ``conv_dt.json``).
    Mamba-2: ``conv1d.bias`` [D+2GN] and ``dt_bias`` [H] (b_dt lives outside a Linear there), D+2GN+H per layer.
    Mergeable: the deltas fold into the biases; nothing changes in ``step()``.
    """

    method: ClassVar[str] = "bitfit"
