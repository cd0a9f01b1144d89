"""Prompt Tuning: trainable virtual input embeddings (docs/methods.md §5.1)."""

from ...core.registry import register_method
from .config import PromptTuningConfig
from .hook import PromptEmbedding, inject

register_method(PromptTuningConfig, inject)

__all__ = ["PromptEmbedding", "PromptTuningConfig", "inject"]
