from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from ...core.config import AdapterConfig


@dataclass(kw_only=True)
class StateOffsetConfig(AdapterConfig):
    """State-offset Tuning [SOT] (docs/methods.md §4.1-4.2): a constant offset on the read-out, before the gate.

    ``variant="h"``: y_t += C_tᵀ h' with h' [D, N] (Mamba-2: [H, P, N]); h' never enters the recurrence.
    ``variant="y"``: y_t += y' with y' [D] (Mamba-2: [H, P]). Zero init, so step 0 is the base model.
    """

    method: ClassVar[str] = "state_offset"

    variant: Literal["h", "y"] = "h"
    """Offset the state read-out (``"h"``, h') or the output (``"y"``, y')."""
    rank: int | None = None
    """Low-rank h' = B_r A_r with B_r [D/ρ, r] (zero init) and A_r [r, N·ρ] (Kaiming-uniform). ``None``: dense h'."""
    r_ratio: int = 1
    """ρ of the low-rank factorisation: the (D/ρ)×(N·ρ) product is reshaped to D×N. Must divide D."""
    scale: float = 1.0
    """alpha: the learned offset (h' or y') is multiplied by it at inference (the published study uses 0.07
    for Gated DeltaNet, 0.65 for Mamba-2); in training too only with ``scale_in_training``. 1.0: as learned."""
    scale_in_training: bool = False
    """Also apply ``scale`` in training mode (otherwise the adapter trains unscaled and is scaled at inference)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variant not in ("h", "y"):
            raise ValueError(f"StateOffsetConfig.variant must be 'h' or 'y', got {self.variant!r}")
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"StateOffsetConfig.rank must be a positive int or None, got {self.rank!r}")
        if self.rank is not None and self.variant == "y":
            raise ValueError(f"StateOffsetConfig.rank applies to variant 'h' only, got rank={self.rank!r} with 'y'")
        if not isinstance(self.r_ratio, int) or self.r_ratio < 1:
            raise ValueError(f"StateOffsetConfig.r_ratio must be a positive int, got {self.r_ratio!r}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not self.scale > 0:
            raise ValueError(f"StateOffsetConfig.scale must be a positive number, got {self.scale!r}")
        if not isinstance(self.scale_in_training, bool):
            raise ValueError(f"StateOffsetConfig.scale_in_training must be a bool, got {self.scale_in_training!r}")  # noqa: TRY004
