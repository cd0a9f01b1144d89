"""Built-in PEFT methods. Importing this package registers each of them (explicit imports, no entry points)."""

from .initial_state import InitialStateConfig
from .lora import LoraConfig
from .prefix import PrefixTuningConfig
from .prompt import PromptTuningConfig
from .state_offset import StateOffsetConfig

__all__ = ["InitialStateConfig", "LoraConfig", "PrefixTuningConfig", "PromptTuningConfig", "StateOffsetConfig"]
