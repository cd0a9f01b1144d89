"""``AdapterConfig``: the base of every method's config dataclass (method name, layer selection, JSON round trip)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(kw_only=True)
class AdapterConfig:
    """Base config of a PEFT method. Subclasses are ``@dataclass(kw_only=True)`` and set ``method``."""

    method: ClassVar[str] = ""
    """Registry name of the method (``register_method`` keys on it)."""

    layers: list[int] | None = None
    """Layers to adapt (0-based block indices). Default: ``None``, meaning every layer."""

    def __post_init__(self) -> None:
        if self.layers is not None:
            if isinstance(self.layers, int) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in self.layers
            ):
                raise ValueError(f"{type(self).__name__}.layers must be a list of ints or None, got {self.layers!r}")
            if len(set(self.layers)) != len(self.layers):
                raise ValueError(f"{type(self).__name__}.layers has duplicates: {self.layers!r}")
            self.layers = list(self.layers)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: ``{"method": name, <field>: value, ...}``."""
        out: dict[str, Any] = {"method": self.method}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        """Inverse of ``to_dict``. On the base class, dispatches on ``data["method"]`` through the registry."""
        data = dict(data)
        name = data.pop("method", cls.method)
        if cls is AdapterConfig or cls.method != name:
            from .registry import get_method

            target = get_method(name).config_cls
            if cls is not AdapterConfig and not issubclass(target, cls):
                raise ValueError(f"{cls.__name__}.from_dict: got a config of method {name!r}")
        else:
            target = cls
        known = {f.name for f in dataclasses.fields(target)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{target.__name__}.from_dict: unknown fields {unknown}; known: {sorted(known)}")
        return target(**data)
