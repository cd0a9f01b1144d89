from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from ...core.config import AdapterConfig


@dataclass(kw_only=True)
class AdditionalScanConfig(AdapterConfig):
    """Additional-scan (MambaPEFT; docs/methods.md §5.4): n' extra state dimensions per channel, Mamba-1 only.

    A_log⁺ [D, n'] is appended to A_log on the state axis, W_B⁺ [n', D] (Kaiming-uniform) to the B rows of ``x_proj``
    and W_C⁺ [n', D] (zero, so the model is unchanged at init) to its C rows; the scan and the decode cache hold
    N + n' states. Only the new slices train: 3·n'·D per layer. Not mergeable (it changes the base shapes).
    Mamba-2 raises ValueError: its A is one scalar per head and the papers have no Mamba-2 variant.
    """

    method: ClassVar[str] = "additional_scan"

    n_states: int = 8
    """n': extra state dimensions per channel (8 in the papers' configs)."""
    init: Literal["s4d", "reference", "copy_last"] = "s4d"
    """A_log⁺ init. ``"s4d"``: the S4D-real continuation log(N+1) .. log(N+n') (ssmtune default).
    ``"reference"``: the authors' code (pitfall 4): the raw value N, i.e. A⁺ = −e^N, which freezes A_log⁺ in practice.
    ``"copy_last"``: every new column copies the pretrained last column A_log[:, N-1] (ssm-peft's own description)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.n_states, int) or isinstance(self.n_states, bool) or self.n_states < 1:
            raise ValueError(f"AdditionalScanConfig.n_states must be a positive int, got {self.n_states!r}")
        if self.init not in ("s4d", "reference", "copy_last"):
            raise ValueError(f"AdditionalScanConfig.init must be 's4d', 'reference' or 'copy_last', got {self.init!r}")
