"""ssmtune: state-based parameter-efficient fine-tuning for Mamba and Mamba-2."""

__version__ = "0.1.0"

from .models import (
    Mamba2Config,
    Mamba2ForCausalLM,
    MambaConfig,
    MambaForCausalLM,
    SSMForCausalLM,
    SSMForSequenceClassification,
    load_model,
)
from .models.hybrid import from_transformers

__all__ = [
    "Mamba2Config",
    "Mamba2ForCausalLM",
    "MambaConfig",
    "MambaForCausalLM",
    "SSMForCausalLM",
    "SSMForSequenceClassification",
    "from_transformers",
    "load_model",
]

from .core.config import AdapterConfig
from .core.io import export_peft_lora, load_adapter, save_adapter
from .core.peft_model import PeftModel, get_peft_model
from .core.registry import known_methods, register_method
from .methods import (
    AdditionalScanConfig,
    BitFitConfig,
    FullConfig,
    InitialStateConfig,
    LoraConfig,
    PartialConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    SDLoraConfig,
    StateOffsetConfig,
    sdt_select,
)

__all__ += [
    "AdapterConfig",
    "AdditionalScanConfig",
    "BitFitConfig",
    "FullConfig",
    "InitialStateConfig",
    "LoraConfig",
    "PartialConfig",
    "PeftModel",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "SDLoraConfig",
    "StateOffsetConfig",
    "export_peft_lora",
    "get_peft_model",
    "known_methods",
    "load_adapter",
    "register_method",
    "save_adapter",
    "sdt_select",
]
