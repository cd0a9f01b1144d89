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

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.conv_state, bool):
            raise TypeError(f"InitialStateConfig.conv_state must be a bool, got {self.conv_state!r}")
