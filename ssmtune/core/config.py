"""``AdapterConfig``: the base of every method's config dataclass (method name, layer selection, JSON round trip).

Field names follow Hugging Face peft (``layers_to_transform``, ``lora_alpha``, ``lora_dropout``). A subclass lists
the names it replaced in ``renamed = {old: new}``: the old names still work, with a DeprecationWarning, as constructor
keywords, in ``from_dict`` (saved ``adapter_config.json`` files, recipe YAML) and as attributes.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar


def _warn_renamed(cls: type, old: str, new: str, stacklevel: int) -> None:
    warnings.warn(f"{cls.__name__}.{old} is deprecated; use {new}", DeprecationWarning, stacklevel=stacklevel + 1)


def _renamed_property(old: str, new: str) -> property:
    def get(self):
        _warn_renamed(type(self), old, new, 2)
        return getattr(self, new)

    def set_(self, value):
        _warn_renamed(type(self), old, new, 2)
        setattr(self, new, value)

    return property(get, set_, doc=f"Deprecated name of ``{new}``.")


class _ConfigMeta(type):
    # The dataclass decorator writes ``__init__`` after the class exists, so old keywords are renamed at call time.
    def __call__(cls, *args, **kwargs):
        return super().__call__(*args, **cls.rename_deprecated(kwargs, stacklevel=2))


@dataclass(kw_only=True)
class AdapterConfig(metaclass=_ConfigMeta):
    """Base config of a PEFT method. Subclasses are ``@dataclass(kw_only=True)`` and set ``method``."""

    method: ClassVar[str] = ""
    """Registry name of the method (``register_method`` keys on it)."""
    renamed: ClassVar[dict[str, str]] = {"layers": "layers_to_transform"}
    """Deprecated field names -> current names (subclasses extend it)."""

    layers_to_transform: list[int] | None = None
    """Layers to adapt (0-based block indices). Default: ``None``, meaning every layer."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        for old, new in cls.renamed.items():
            if not isinstance(cls.__dict__.get(old), property):
                setattr(cls, old, _renamed_property(old, new))

    @classmethod
    def rename_deprecated(cls, data: dict[str, Any], *, stacklevel: int = 2) -> dict[str, Any]:
        """``data`` with deprecated keys renamed (one DeprecationWarning each, blaming ``stacklevel`` frames up);
        both names at once is a ValueError."""
        if not any(old in data for old in cls.renamed):
            return data
        out = dict(data)
        for old, new in cls.renamed.items():
            if old in out:
                if new in out:
                    raise ValueError(f"{cls.__name__}: give {new!r} or its deprecated name {old!r}, not both")
                _warn_renamed(cls, old, new, stacklevel + 1)
                out[new] = out.pop(old)
        return out

    def __post_init__(self) -> None:
        layers = self.layers_to_transform
        if layers is not None:
            if isinstance(layers, int) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
                raise ValueError(
                    f"{type(self).__name__}.layers_to_transform must be a list of ints or None, got {layers!r}"
                )
            if len(set(layers)) != len(layers):
                raise ValueError(f"{type(self).__name__}.layers_to_transform has duplicates: {layers!r}")
            self.layers_to_transform = list(layers)

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
        data = target.rename_deprecated(data)
        known = {f.name for f in dataclasses.fields(target)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{target.__name__}.from_dict: unknown fields {unknown}; known: {sorted(known)}")
        return target(**data)


AdapterConfig.layers = _renamed_property("layers", "layers_to_transform")
