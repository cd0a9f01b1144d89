"""Attach primitives: every method builds its adapters from these four calls.

- ``wrap_linear(parent, name, wrapper, key=...)``: the Linear ``parent.<name>`` becomes an ``AdaptedLinear`` that calls the
  base Linear and then each active ``LinearDelta`` (LoRA, DoRA, ...). Several deltas (adapters, row slices) can share one Linear.
- ``parametrize_param(module, name, parametrization)``: a ``ParamDelta`` through ``torch.nn.utils.parametrize``, so every
  reader of ``module.<name>`` (kernels included) sees the adapted tensor; it may change the shape (``unsafe=True``).
- ``add_state_hook(mixer, name, hook)``: a ``StateHook`` read by the mixer before every scan.
- ``add_input_hook(model, name, hook)``: an ``InputHook`` applied to the input embeddings.

Each primitive sets ``active = True`` on the adapter module and records where it hangs, so ``detach(module)`` can take it
off again. Adapters are switched off by ``module.active = False`` (identity), which every primitive honours.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..models.hooks import InputHook, StateHook

_ATTACH = "_ssmtune_attach"
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


def adapter_key(adapter_name: str, tag: str) -> str:
    """Name of an adapter's slot in a ``ModuleDict`` (no dots allowed there): ``<adapter_name>__<tag>``."""
    key = f"{adapter_name}__{tag}"
    if not _KEY_RE.match(key):
        raise ValueError(f"adapter slot name {key!r} may only contain letters, digits, '_' and '-'")
    return key


def _mark(module: nn.Module, info: tuple) -> None:
    module.active = True
    # A plain attribute (not a submodule), so the parent is not registered twice.
    object.__setattr__(module, _ATTACH, info)


class LinearDelta(nn.Module):
    """Base of the Linear adapters hung in an ``AdaptedLinear``. ``forward(x, y, base)`` returns the adapted y."""

    mergeable = True
    merged = False

    def forward(self, x: torch.Tensor, y: torch.Tensor, base: nn.Linear) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def merge(self, base: nn.Linear) -> None:
        """Fold the delta into ``base.weight`` (the forward then skips this delta)."""
        raise NotImplementedError

    def unmerge(self, base: nn.Linear) -> None:
        raise NotImplementedError


class AdaptedLinear(nn.Module):
    """A frozen ``nn.Linear`` (``base_layer``) followed by its active deltas (``adapters``)."""

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()

    # Readers of the usual Linear attributes (shapes, dtype) keep working.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        for delta in self.adapters.values():
            if delta.active and not delta.merged:
                y = delta(x, y, self.base_layer)
        return y


def wrap_linear(parent: nn.Module, name: str, wrapper: LinearDelta, *, key: str) -> AdaptedLinear:
    """Hang ``wrapper`` on the Linear ``parent.<name>`` under ``key``; returns the ``AdaptedLinear`` container."""
    target = getattr(parent, name, None)
    if isinstance(target, AdaptedLinear):
        container = target
    elif isinstance(target, nn.Linear):
        container = AdaptedLinear(target)
        setattr(parent, name, container)
    else:
        raise TypeError(
            f"wrap_linear: {type(parent).__name__}.{name} is not an nn.Linear (got {type(target).__name__})"
        )
    if key in container.adapters:
        raise ValueError(f"wrap_linear: {type(parent).__name__}.{name} already has an adapter {key!r}")
    container.adapters[key] = wrapper
    _mark(wrapper, ("linear", parent, name, key))
    return container


class ParamDelta(nn.Module):
    """Base of the parameter parametrizations: ``transform(X)`` gives the adapted tensor (it may change the shape)."""

    mergeable = True

    def transform(self, X: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.transform(X) if getattr(self, "active", True) else X


def parametrize_param(module: nn.Module, name: str, parametrization: ParamDelta) -> ParamDelta:
    """Reparameterise ``module.<name>`` as ``parametrization(original)``; chains with earlier parametrizations."""
    if not isinstance(getattr(module, name, None), torch.Tensor):
        raise TypeError(f"parametrize_param: {type(module).__name__} has no tensor {name!r}")
    _mark(parametrization, ("param", module, name, None))
    if not hasattr(module, "_ssmtune_param_order"):
        # remove_parametrizations re-registers a tensor last; detach restores this order (stable state_dict keys)
        object.__setattr__(module, "_ssmtune_param_order", list(module._parameters))
    parametrize.register_parametrization(module, name, parametrization, unsafe=True)
    return parametrization


def add_state_hook(mixer: nn.Module, name: str, hook: StateHook) -> StateHook:
    if not isinstance(hook, StateHook):
        raise TypeError(f"add_state_hook: expected a StateHook, got {type(hook).__name__}")
    if name in mixer.state_hooks:
        raise ValueError(f"add_state_hook: the mixer already has a state hook {name!r}")
    mixer.state_hooks[name] = hook
    _mark(hook, ("state", mixer, name, None))
    return hook


def add_input_hook(model: nn.Module, name: str, hook: InputHook) -> InputHook:
    if not isinstance(hook, InputHook):
        raise TypeError(f"add_input_hook: expected an InputHook, got {type(hook).__name__}")
    if name in model.input_hooks:
        raise ValueError(f"add_input_hook: the model already has an input hook {name!r}")
    model.input_hooks[name] = hook
    _mark(hook, ("input", model, name, None))
    return hook


def is_mergeable(module: nn.Module) -> bool:
    return bool(getattr(module, "mergeable", False))


def merge(module: nn.Module) -> None:
    """Fold an attached adapter into the base weights and detach it (only ``mergeable`` adapters)."""
    kind, parent, name, _ = getattr(module, _ATTACH)
    if not is_mergeable(module):
        raise ValueError(f"{type(module).__name__} cannot be merged")
    if kind == "linear":
        container = getattr(parent, name)
        if module.active and not module.merged:
            module.merge(container.base_layer)
    elif kind == "param":
        plist = module_parametrizations(parent, name)
        # Merging in attachment order keeps a chain f_k(...f_1(W)) exact: always fold the first one.
        if plist[0] is not module:
            raise RuntimeError(f"merge: parametrizations of {name!r} must be merged in attachment order")
        with torch.no_grad():
            new = module(plist.original)
            plist.original.data = new.detach().to(plist.original.dtype).clone()
    else:
        raise ValueError(f"{type(module).__name__} ({kind} adapter) cannot be merged")
    detach(module)


def module_parametrizations(module: nn.Module, name: str) -> parametrize.ParametrizationList:
    return module.parametrizations[name]


def detach(module: nn.Module) -> None:
    """Take an attached adapter module off the model (no merge)."""
    info = getattr(module, _ATTACH, None)
    if info is None:
        return
    kind, parent, name, key = info
    if kind == "linear":
        container = getattr(parent, name)
        del container.adapters[key]
        if len(container.adapters) == 0:
            setattr(parent, name, container.base_layer)
    elif kind == "param":
        plist = module_parametrizations(parent, name)
        idx = next(i for i, m in enumerate(plist) if m is module)
        del plist[idx]
        if len(plist) == 0:
            parametrize.remove_parametrizations(parent, name, leave_parametrized=False)
            order = getattr(parent, "_ssmtune_param_order", None)
            if order is not None and name in order:
                params = dict(parent._parameters)
                parent._parameters.clear()
                for key in sorted(params, key=lambda k: order.index(k) if k in order else len(order)):
                    parent._parameters[key] = params[key]
    elif kind == "state":
        del parent.state_hooks[name]
    elif kind == "input":
        del parent.input_hooks[name]
    object.__setattr__(module, _ATTACH, None)
