from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from ...core.config import AdapterConfig


@dataclass(kw_only=True)
class PartialConfig(AdapterConfig):
    """Partial fine-tuning (docs/methods.md §5.6, "layer freeze"): the named base parameters train, as fp32 zero-init
    deltas W' = W + δ (so disabling, merging and saving work as for every other method; only δ is saved).

    A pattern is a glob (``fnmatch``: ``*`` also spans dots) or, with the prefix ``re:``, a regular expression. It
    matches a parameter when it matches the full name or any dotted suffix of it, e.g. ``"A_log"``, ``"conv1d.*"``,
    ``"x_proj.weight"``, ``"norm_f.weight"``, ``"re:layers\\.\\d+\\.norm\\.weight"``. ``layers`` restricts the
    per-layer parameters; model-level ones (embeddings, ``norm_f``, ``lm_head``) match regardless. A tied
    embedding / lm_head pair is one tensor and gets one δ.
    """

    method: ClassVar[str] = "partial"

    parameters: list[str] | None = None
    """Patterns of the parameters to train. Default: ``None``, the architecture's SSM module: Mamba-1 "full S6 +
    conv" (ssm-peft 007: A_log, D, x_proj, dt_proj W and b, conv1d W and b); Mamba-2 A_log, D, dt_bias, conv1d."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.parameters is None:
            return
        if isinstance(self.parameters, str) or not self.parameters:
            raise ValueError(
                f"{type(self).__name__}.parameters must be a non-empty list of patterns, got {self.parameters!r}"
            )
        self.parameters = list(self.parameters)
        for p in self.parameters:
            if not isinstance(p, str) or not p:
                raise ValueError(f"{type(self).__name__}.parameters: bad pattern {p!r}")
            if p.startswith("re:"):
                try:
                    re.compile(p[3:])
                except re.error as e:
                    raise ValueError(f"{type(self).__name__}.parameters: bad regular expression {p!r}: {e}") from e


@dataclass(kw_only=True)
class FullConfig(PartialConfig):
    """Full fine-tuning (docs/methods.md §5.6, ssm-peft 000) as deltas on every base parameter (tied embedding once).

    Memory: one fp32 δ per parameter, i.e. what an fp32 master copy of bf16 weights costs. The CLI's ``--method full``
    trains the bare model instead (no adapter, saved with ``save_pretrained``); this config gives the same update
    with disable / merge / adapter files.
    """

    method: ClassVar[str] = "full"

    parameters: list[str] | None = None
    """Must stay ``None`` (every parameter); use ``PartialConfig`` to choose."""

    def __post_init__(self) -> None:
        if self.parameters is not None:
            raise ValueError(f"FullConfig.parameters must be None (all parameters), got {self.parameters!r}")
        super().__post_init__()
