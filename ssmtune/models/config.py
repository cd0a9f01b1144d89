"""Model configs for Mamba-1 (S6) and Mamba-2 (SSD), in mamba_ssm's field names (docs/methods.md §1.1 glossary).

``MambaConfig`` / ``Mamba2Config`` are plain dataclasses; ``to_dict`` / ``from_dict`` give a JSON round trip.
HF transformers' ``config.json`` layout is translated in ``convert.py``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(kw_only=True)
class SSMConfig:
    """Fields shared by both architectures. Use ``MambaConfig`` or ``Mamba2Config``."""

    model_type: ClassVar[str] = ""

    d_model: int = 768
    """Residual width d_model (HF ``hidden_size``)."""
    n_layer: int = 24
    """Number of blocks (HF ``num_hidden_layers``)."""
    vocab_size: int = 50277
    """Tokenizer vocabulary; the embedding has ``padded_vocab_size`` rows."""
    d_state: int = 16
    """State size N (HF ``state_size``)."""
    d_conv: int = 4
    """Causal conv width K (HF ``conv_kernel``)."""
    expand: int = 2
    """Inner channels D = expand · d_model."""
    conv_bias: bool = True
    """Bias of the depthwise conv (HF ``use_conv_bias``)."""
    bias: bool = False
    """Bias of ``in_proj`` and ``out_proj`` (HF ``use_bias``)."""
    norm_epsilon: float = 1e-5
    """RMSNorm epsilon (HF ``layer_norm_epsilon``)."""
    tie_embeddings: bool = True
    """Share ``lm_head.weight`` with ``backbone.embeddings.weight``."""
    pad_vocab_size_multiple: int = 8
    """Round the embedding rows up to a multiple of this (1 keeps ``vocab_size`` exactly)."""
    residual_in_fp32: bool = True
    """Keep the residual stream in fp32 whatever the weights' dtype."""
    dt_min: float = 0.001
    """Lower end of the log-uniform Δ init."""
    dt_max: float = 0.1
    """Upper end of the log-uniform Δ init."""
    dt_init_floor: float = 1e-4
    """Floor applied to the sampled Δ at init."""
    rescale_prenorm_residual: bool = True
    """At init, divide ``out_proj.weight`` by sqrt(n_layer) (GPT-2 style), as mamba_ssm does."""
    initializer_range: float = 0.02
    """Std of the embedding init."""

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand", "pad_vocab_size_multiple"):
            _positive(name, getattr(self, name))
        if not self.norm_epsilon > 0:
            raise ValueError(f"norm_epsilon must be > 0, got {self.norm_epsilon!r}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"dt_min/dt_max must satisfy 0 < dt_min <= dt_max, got dt_min={self.dt_min!r}, "
                             f"dt_max={self.dt_max!r}")  # fmt: skip
        if not self.dt_init_floor >= 0:
            raise ValueError(f"dt_init_floor must be >= 0, got {self.dt_init_floor!r}")

    @property
    def d_inner(self) -> int:
        """Inner channels D."""
        return self.expand * self.d_model

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and of the logits' last axis."""
        m = self.pad_vocab_size_multiple
        return (self.vocab_size + m - 1) // m * m

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": self.model_type, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SSMConfig:
        """Build the right config class from ``to_dict`` output (unknown keys raise ValueError)."""
        d = dict(d)
        model_type = d.pop("model_type", cls.model_type)
        klass = CONFIG_CLASSES.get(model_type)
        if klass is None:
            raise ValueError(f"unknown model_type {model_type!r}; known: {sorted(CONFIG_CLASSES)}")
        names = {f.name for f in dataclasses.fields(klass)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{klass.__name__}: unknown fields {unknown}")
        return klass(**d)


@dataclass(kw_only=True)
class MambaConfig(SSMConfig):
    """Mamba-1 (S6). Defaults are Mamba-130M's (vocab 50277 padded to 50280)."""

    model_type: ClassVar[str] = "mamba"

    dt_rank: int | Literal["auto"] = "auto"
    """Rank R of the Δ projection; "auto" resolves to ceil(d_model / 16) in ``__post_init__``."""
    dt_scale: float = 1.0
    """Scale of the ``dt_proj.weight`` init, std = dt_scale / sqrt(R)."""
    dt_init: Literal["random", "constant"] = "random"
    """``dt_proj.weight`` init: uniform in ±std ("random") or the constant std."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dt_rank == "auto":
            self.dt_rank = math.ceil(self.d_model / 16)
        _positive("dt_rank", self.dt_rank)
        if self.dt_init not in ("random", "constant"):
            raise ValueError(f"dt_init must be 'random' or 'constant', got {self.dt_init!r}")


@dataclass(kw_only=True)
class Mamba2Config(SSMConfig):
    """Mamba-2 (SSD). Defaults are Mamba-2-130M's (d_state 128, headdim 64, one group)."""

    model_type: ClassVar[str] = "mamba2"

    d_state: int = 128
    """State size N per head (HF ``state_size``)."""
    headdim: int = 64
    """Head dim P; H = D / P heads (HF ``head_dim``)."""
    ngroups: int = 1
    """Groups G sharing B_t and C_t; heads map to groups in contiguous blocks (HF ``n_groups``)."""
    chunk_size: int = 256
    """Chunk length of the chunked SSD backends."""
    D_has_hdim: bool = False
    """Skip D_skip of shape [D] (per channel) instead of [H] (per head). Not representable in HF transformers."""
    A_init_range: tuple[float, float] = (1.0, 16.0)
    """A = -uniform(A_init_range) per head at init, as mamba_ssm."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("headdim", "ngroups", "chunk_size"):
            _positive(name, getattr(self, name))
        if self.d_inner % self.headdim != 0:
            raise ValueError(f"headdim={self.headdim} must divide d_inner = expand * d_model = {self.d_inner}")
        if self.nheads % self.ngroups != 0:
            raise ValueError(f"ngroups={self.ngroups} must divide nheads = {self.nheads}")
        self.A_init_range = tuple(float(a) for a in self.A_init_range)  # JSON gives a list
        if len(self.A_init_range) != 2 or not 0 < self.A_init_range[0] <= self.A_init_range[1]:
            raise ValueError(f"A_init_range must be (lo, hi) with 0 < lo <= hi, got {self.A_init_range!r}")

    @property
    def nheads(self) -> int:
        """Heads H = D / P."""
        return self.d_inner // self.headdim


CONFIG_CLASSES: dict[str, type[SSMConfig]] = {"mamba": MambaConfig, "mamba2": Mamba2Config}
