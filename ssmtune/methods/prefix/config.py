from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...core.config import AdapterConfig


@dataclass(kw_only=True)
class PrefixTuningConfig(AdapterConfig):
    """Prefix-Tuning (docs/methods.md §4.4): M trainable virtual-token activations P^l [M, d_model] per layer.

    P^l is the input of block l at the M prefix positions. By §4.4 its only effect on the real tokens is the pair of
    final ssm/conv states of running block l's mixer on norm(P^l), which the hook feeds in as (h0, conv0).
    **Not identity at init**: P^l ~ N(0, 0.02²). Even P^l = 0 would not be identity, because norm(0) = 0 still gives
    x = SiLU(conv bias) ≠ 0 after the conv, hence non-zero B_t x_t and a non-zero state.
    """

    method: ClassVar[str] = "prefix"

    num_virtual_tokens: int
    """M, the number of prefix positions."""
    init_std: float = 0.02
    """Std of the normal init of P^l."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens < 1:
            raise ValueError(
                f"PrefixTuningConfig.num_virtual_tokens must be a positive int, got {self.num_virtual_tokens!r}"
            )
        if not self.init_std >= 0:
            raise ValueError(f"PrefixTuningConfig.init_std must be >= 0, got {self.init_std!r}")
