"""The method registry: one ``register_method(config_cls, inject_fn)`` call per method; lookup by name.

``inject_fn(model, config, *, adapter_name) -> dict[str, nn.Module]`` attaches the method's adapter modules to ``model``
(with the primitives of ``core/inject.py``) and returns them keyed by a path that does not contain the adapter name.
Every trainable tensor of the method lives in those modules.

The built-in methods register themselves when ``ssmtune`` imports ``ssmtune.methods`` (importing any ``ssmtune``
module runs the package's ``__init__`` first), so this module imports no method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .config import AdapterConfig

InjectFn = Callable[..., dict[str, nn.Module]]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type[AdapterConfig]
    inject: InjectFn


_METHODS: dict[str, MethodSpec] = {}


def register_method(config_cls: type[AdapterConfig], inject_fn: InjectFn) -> None:
    """Register a method under ``config_cls.method``. Re-registering the same pair is a no-op (module reloads)."""
    name = config_cls.method
    if not name:
        raise ValueError(f"register_method: {config_cls.__name__}.method is empty")
    old = _METHODS.get(name)
    if old is not None and old.config_cls.__qualname__ != config_cls.__qualname__:
        raise ValueError(f"register_method: method {name!r} is already registered by {old.config_cls.__name__}")
    _METHODS[name] = MethodSpec(name, config_cls, inject_fn)


def known_methods() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> MethodSpec:
    """Look a method up by name; an unknown name raises ValueError listing the known ones."""
    if name not in _METHODS:
        raise ValueError(f"unknown PEFT method {name!r}; known methods: {sorted(_METHODS)}")
    return _METHODS[name]


def spec_for(config: AdapterConfig) -> MethodSpec:
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"expected an AdapterConfig instance, got {type(config).__name__}: {config!r}")
    return get_method(config.method)
