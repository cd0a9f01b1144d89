"""Prompt Tuning: trainable virtual input embeddings (METHODS.md §4.5)."""

from ...core.registry import register_method
from .config import PromptTuningConfig
from .hook import PromptEmbedding, inject

register_method(PromptTuningConfig, inject)

__all__ = ["PromptEmbedding", "PromptTuningConfig", "inject"]
