from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...core.config import AdapterConfig

MAMBA1_SDT_TARGETS = ("A_log", "x_proj.B", "x_proj.C")
MAMBA2_SDT_TARGETS = ("A_log", "dt_bias", "in_proj.B", "in_proj.C")
MAMBA1_LORA_DEFAULT = ("out_proj",)
MAMBA2_LORA_DEFAULT = ("in_proj.z", "in_proj.x", "out_proj")


@dataclass(kw_only=True)
class SDLoraConfig(AdapterConfig):
    """SDT / SDLoRA [SDT] (docs/methods.md §5.5): sparse, zero-init deltas on selected channels/states of the SSM
    parameters plus LoRA on the linear projections.

    Two phases. ``get_peft_model(base, SDLoraConfig())`` attaches the phase-2 adapter with a placeholder selection;
    ``sdt_select(model, warmup_batches, lr=...)`` then runs the warm-up (dense Δ_A + a throw-away LoRA), picks the
    channels and states by update magnitude, writes the selection into the adapter and resets it. Mamba-1 per layer:
    k_c = D − round(β·D) channels by Σ_n Δ_A[d, n]², in each k_s = N − round(α·N) states by Δ_A[d, n]²; A_log trains
    k_c·k_s entries, W_B and W_C the N·k_c entries of the selected input channels (columns). Trainable count:
    n_layer·(k_c·k_s + 2·N·k_c) + LoRA, exactly (only the selected entries are parameters: pitfall 7).
    Mamba-2 (**proposal**, docs/methods.md §5.5): heads play the channels (k_h = ⌈(1−β)·H⌉ heads by ΔA_log² + Δdt_bias²,
    which train A_log and dt_bias), and k_s = ⌈(1−α)·G·N⌉ rows of W_B and W_C (the ``in_proj`` B/C rows, all d_model
    columns) by ‖ΔW_B[n]‖² + ‖ΔW_C[n]‖².
    """

    method: ClassVar[str] = "sdlora"
    renamed: ClassVar[dict[str, str]] = {**AdapterConfig.renamed, "alpha": "lora_alpha", "dropout": "lora_dropout"}

    state_freeze: float = 0.75
    """α, the frozen share of the states (config names ``n{α}_d{β}``); the paper sweeps 0.75, 0.9, 0.95."""
    channel_freeze: float = 0.99
    """β, the frozen share of the channels (Mamba-2: heads)."""
    sdt_targets: list[str] | None = None
    """SSM tensors with sparse deltas. ``None``: Mamba-1 ["A_log", "x_proj.B", "x_proj.C"]; Mamba-2
    ["A_log", "dt_bias", "in_proj.B", "in_proj.C"]. The selection always comes from the warm-up of A_log (M2: and
    dt_bias, B, C)."""
    lora_targets: list[str] | None = None
    """LoRA targets (``LoraConfig`` names). ``None``: Mamba-1 ["out_proj"]; Mamba-2 ["in_proj.z", "in_proj.x",
    "out_proj"]. ``[]``: SDT without LoRA."""
    r: int = 8
    """LoRA rank."""
    lora_alpha: float = 8
    """LoRA scale numerator (delta = lora_alpha / r · B A)."""
    lora_dropout: float = 0.1
    """LoRA dropout."""
    warmup_steps: int = 500
    """Warm-up steps T_w of ``sdt_select`` (the authors: 500, 250 for RTE); the batch size is the main run's."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("state_freeze", "channel_freeze"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"SDLoraConfig.{name} must be in [0, 1), got {value!r}")
        if self.sdt_targets is not None:
            if isinstance(self.sdt_targets, str) or not self.sdt_targets:
                raise ValueError(f"SDLoraConfig.sdt_targets must be a non-empty list or None, got {self.sdt_targets!r}")
            valid = set(MAMBA1_SDT_TARGETS) | set(MAMBA2_SDT_TARGETS)
            bad = [t for t in self.sdt_targets if t not in valid]
            if bad or len(set(self.sdt_targets)) != len(self.sdt_targets):
                raise ValueError(
                    f"SDLoraConfig.sdt_targets: bad or duplicate targets in {self.sdt_targets!r}; valid for Mamba-1: "
                    f"{list(MAMBA1_SDT_TARGETS)}, for Mamba-2: {list(MAMBA2_SDT_TARGETS)}"
                )
            self.sdt_targets = list(self.sdt_targets)
        if self.lora_targets is not None:
            if isinstance(self.lora_targets, str):
                raise ValueError(f"SDLoraConfig.lora_targets must be a list or None, got {self.lora_targets!r}")
            self.lora_targets = list(self.lora_targets)
            if self.lora_targets:
                from ..lora.config import LoraConfig

                # LoraConfig validates the names, rank and dropout; re-raise under this config's name
                try:
                    LoraConfig(
                        r=self.r,
                        lora_alpha=self.lora_alpha,
                        lora_dropout=self.lora_dropout,
                        target_modules=self.lora_targets,
                    )
                except ValueError as e:
                    raise ValueError(f"SDLoraConfig: {e}") from e
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"SDLoraConfig.r must be a positive int, got {self.r!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"SDLoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 1:
            raise ValueError(f"SDLoraConfig.warmup_steps must be a positive int, got {self.warmup_steps!r}")
