"""Mamba-1 / Mamba-2 models owned by ssmtune: configs, mixers, LMs, cache, generation, checkpoint I/O; ssmtune's
mixers inside transformers' hybrid models (``from_transformers``)."""

from .cache import InferenceCache, LayerCache
from .config import Mamba2Config, MambaConfig, SSMConfig
from .gated_delta import HostedGDNMixer
from .hybrid import HostedSSDMixer, from_transformers
from .lm import (
    CausalLMOutput,
    Mamba2ForCausalLM,
    MambaForCausalLM,
    SequenceClassifierOutput,
    SSMForCausalLM,
    SSMForSequenceClassification,
    causal_lm_for,
)
from .loading import load_model, save_pretrained
from .mamba import MambaMixer
from .mamba2 import Mamba2Mixer, RMSNormGated

__all__ = [
    "CausalLMOutput",
    "HostedGDNMixer",
    "HostedSSDMixer",
    "InferenceCache",
    "LayerCache",
    "Mamba2Config",
    "Mamba2ForCausalLM",
    "Mamba2Mixer",
    "MambaConfig",
    "MambaForCausalLM",
    "MambaMixer",
    "RMSNormGated",
    "SSMConfig",
    "SSMForCausalLM",
    "SSMForSequenceClassification",
    "SequenceClassifierOutput",
    "causal_lm_for",
    "from_transformers",
    "load_model",
    "save_pretrained",
]
