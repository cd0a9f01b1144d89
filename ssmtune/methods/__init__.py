"""Built-in PEFT methods. Importing this package registers each of them (explicit imports, no entry points)."""

from .additional_scan import AdditionalScanConfig
from .bitfit import BitFitConfig
from .initial_state import InitialStateConfig
from .lora import LoraConfig
from .partial import FullConfig, PartialConfig
from .prefix import PrefixTuningConfig
from .prompt import PromptTuningConfig
from .sdlora import SDLoraConfig, sdt_select
from .state_offset import StateOffsetConfig

__all__ = [
    "AdditionalScanConfig",
    "BitFitConfig",
    "FullConfig",
    "InitialStateConfig",
    "LoraConfig",
    "PartialConfig",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "SDLoraConfig",
    "StateOffsetConfig",
    "sdt_select",
]
