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

from .core import io as _io
from .core.config import AdapterConfig
from .core.io import export_peft_lora
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


def save_adapter(model, directory, adapter_name=None):
    """Deprecated: use ``PeftModel.save_pretrained(directory, adapter_name)``."""
    import warnings

    warnings.warn(
        "ssmtune.save_adapter() is deprecated; use PeftModel.save_pretrained()", DeprecationWarning, stacklevel=2
    )
    _io.save_adapter(model, directory, adapter_name=adapter_name)


def load_adapter(model, directory, adapter_name="default", *, is_trainable=False):
    """Deprecated: use ``PeftModel.from_pretrained(model, directory, adapter_name)`` (or ``PeftModel.load_adapter``
    to add an adapter to a PeftModel)."""
    import warnings

    warnings.warn(
        "ssmtune.load_adapter() is deprecated; use PeftModel.from_pretrained() or PeftModel.load_adapter()",
        DeprecationWarning,
        stacklevel=2,
    )
    return _io.load_adapter(model, directory, adapter_name, is_trainable=is_trainable)
