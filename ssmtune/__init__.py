"""ssmtune: state-based parameter-efficient fine-tuning for Mamba and Mamba-2."""

__version__ = "0.1.0"
