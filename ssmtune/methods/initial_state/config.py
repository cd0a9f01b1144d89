from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...core.config import AdapterConfig


@dataclass(kw_only=True)
class InitialStateConfig(AdapterConfig):
    """Initial State Tuning [SOT, SDT] (docs/methods.md §4.3): a trainable h0 [D, N] (Mamba-2: [H, P, N]) per layer.

    h0 acts only through the prefill (its contribution decays as ∏Ā); zero init is the base model.
    """

    method: ClassVar[str] = "initial_state"

    conv_state: bool = False
    """Also train conv0 [conv_dim, K-1], the conv window before the first token (zero = the usual left padding)."""
    scale: float = 1.0
    """alpha: the learned h0 (not conv0) is multiplied by it at inference (the published study uses 0.07
    for Gated DeltaNet, 0.65 for Mamba-2); in training too only with ``scale_in_training``. 1.0: as learned."""
    scale_in_training: bool = False
    """Also apply ``scale`` in training mode (otherwise the adapter trains unscaled and is scaled at inference)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.conv_state, bool):
            raise TypeError(f"InitialStateConfig.conv_state must be a bool, got {self.conv_state!r}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not self.scale > 0:
            raise ValueError(f"InitialStateConfig.scale must be a positive number, got {self.scale!r}")
        if not isinstance(self.scale_in_training, bool):
            raise ValueError(f"InitialStateConfig.scale_in_training must be a bool, got {self.scale_in_training!r}")  # noqa: TRY004
