from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ...core.config import AdapterConfig

# Targets per architecture: a whole Linear, or a row slice "<linear>.<slice>" (docs/methods.md §2-3, §5.2).
MAMBA1_TARGETS = (
    "in_proj",
    "in_proj.x",
    "in_proj.z",
    "x_proj",
    "x_proj.dt",
    "x_proj.B",
    "x_proj.C",
    "dt_proj",
    "out_proj",
)
MAMBA2_TARGETS = ("in_proj", "in_proj.z", "in_proj.x", "in_proj.B", "in_proj.C", "in_proj.dt", "out_proj")
# Linears of transformers' Gated DeltaNet / KDA mixers (Qwen3.5, Qwen3-Next, OLMo-Hybrid, Kimi-Linear), besides
# out_proj / o_proj
GDN_TARGETS = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "in_proj_qkvz", "in_proj_ba", "a_proj", "b_proj",
               "g_proj", "g_a_proj", "g_b_proj")  # fmt: skip
# Attention / MLP Linears of transformers' hybrid models (``ssmtune.from_transformers``), by attribute name
TRANSFORMER_TARGETS = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "gate_up_proj", "input_linear",
    "output_linear",
)  # fmt: skip


@dataclass(kw_only=True)
class LoraConfig(AdapterConfig):
    """LoRA / DoRA on the mixers' Linears (docs/methods.md §5.2): W' = W + (α/r)·B A, A Kaiming-uniform, B zero.

    A target is a whole Linear (``"in_proj"``) or a row slice of it (``"x_proj.B"``): a slice target gets its own
    low-rank pair whose delta touches only those output rows (the paper code's split projections).
    Mamba-1 targets: in_proj, in_proj.x, in_proj.z, x_proj, x_proj.dt, x_proj.B, x_proj.C, dt_proj, out_proj.
    Mamba-2 targets: in_proj, in_proj.z, in_proj.x, in_proj.B, in_proj.C, in_proj.dt, out_proj.
    Hybrid transformers models (``ssmtune.from_transformers``) also take their attention / MLP Linears by name:
    q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, gate_up_proj, input_linear, output_linear.
    """

    method: ClassVar[str] = "lora"
    renamed: ClassVar[dict[str, str]] = {**AdapterConfig.renamed, "alpha": "lora_alpha", "dropout": "lora_dropout"}

    r: int = 8
    """Rank r."""
    lora_alpha: float = 8
    """Scale numerator: the delta is (lora_alpha / r)·B A."""
    lora_dropout: float = 0.0
    """Dropout probability on the LoRA input."""
    target_modules: list[str] = field(default_factory=lambda: ["in_proj", "out_proj"])
    """Linears (or row slices) to adapt; see the class docstring."""
    use_dora: bool = False
    """DoRA: W' = m ⊙ V/‖V‖ with V = W + (α/r)BA, row norms (detached, as in peft) and trainable m [out]."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoraConfig.r must be a positive int, got {self.r!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if isinstance(self.target_modules, str) or not self.target_modules:
            raise ValueError(
                f"LoraConfig.target_modules must be a non-empty list of names, got {self.target_modules!r}"
            )
        self.target_modules = list(self.target_modules)
        valid = set(MAMBA1_TARGETS) | set(MAMBA2_TARGETS) | set(TRANSFORMER_TARGETS) | set(GDN_TARGETS)
        bad = [t for t in self.target_modules if t not in valid]
        if bad:
            raise ValueError(
                f"LoraConfig.target_modules: unknown targets {bad}; valid for Mamba-1: {list(MAMBA1_TARGETS)}, "
                f"for Mamba-2: {list(MAMBA2_TARGETS)}, for hybrid models also: {list(TRANSFORMER_TARGETS)}, "
                f"for Gated DeltaNet mixers: {list(GDN_TARGETS)}"
            )
        if len(set(self.target_modules)) != len(self.target_modules):
            raise ValueError(f"LoraConfig.target_modules has duplicates: {self.target_modules!r}")

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.r
