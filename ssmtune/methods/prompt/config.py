from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from ...core.config import AdapterConfig


@dataclass(kw_only=True)
class PromptTuningConfig(AdapterConfig):
    """Prompt Tuning (docs/methods.md §5.1): k trainable embeddings [k, d_model] prepended to the input embeddings.

    The attention mask is extended with ones and the labels with -100; the LM drops the k positions from its logits.
    **Not identity at init**: the virtual tokens change the state every real token starts from.
    Acts at the input layer only, so ``layers`` must stay None.
    """

    method: ClassVar[str] = "prompt"

    num_virtual_tokens: int
    """k, the number of virtual tokens."""
    init: Literal["random", "vocab"] = "random"
    """``"random"``: N(0, init_std²); ``"vocab"``: copies of the embeddings of k random vocabulary tokens."""
    init_std: float = 0.02
    """Std of the random init."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens < 1:
            raise ValueError(
                f"PromptTuningConfig.num_virtual_tokens must be a positive int, got {self.num_virtual_tokens!r}"
            )
        if self.init not in ("random", "vocab"):
            raise ValueError(f"PromptTuningConfig.init must be 'random' or 'vocab', got {self.init!r}")
        if self.layers_to_transform is not None:
            raise ValueError(
                f"PromptTuningConfig acts on the input embeddings only; layers_to_transform must be None, got {self.layers_to_transform!r}"
            )
