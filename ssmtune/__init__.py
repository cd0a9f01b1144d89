"""ssmtune: state-based parameter-efficient fine-tuning for Mamba and Mamba-2."""

__version__ = "0.1.0"

from .models import (
    Mamba2Config,
    Mamba2ForCausalLM,
    MambaConfig,
    MambaForCausalLM,
    SSMForCausalLM,
    SSMForSequenceClassification,
)

__all__ = [
    "Mamba2Config",
    "Mamba2ForCausalLM",
    "MambaConfig",
    "MambaForCausalLM",
    "SSMForCausalLM",
    "SSMForSequenceClassification",
]
