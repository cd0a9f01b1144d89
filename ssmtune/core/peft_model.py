"""``PeftModel``: freezes the base model, owns the adapter modules of each named adapter, switches and merges them.

Adapters are attached in place (``core/inject.py``); ``PeftModel`` keeps, per adapter name, the dict returned by the
methods' inject functions (logical path -> module). Trainability, counting and save/load use only that dict.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..models.hooks import StateHook
from . import inject as _inject
from .config import AdapterConfig
from .registry import spec_for
from .routing import ADAPTER_ATTR, ROUTING_ATTR, RoutedLM, Routing


def _as_list(config_or_list: AdapterConfig | Sequence[AdapterConfig]) -> list[AdapterConfig]:
    configs = [config_or_list] if isinstance(config_or_list, AdapterConfig) else list(config_or_list)
    if not configs:
        raise ValueError("get_peft_model: got an empty list of configs")
    for c in configs:
        spec_for(c)  # validates type and registration
    return configs


def _routes_rows(module: nn.Module) -> bool:
    """A module that honours a ``Routing``: a state hook, or a Linear delta that adapts its own rows (unmerged)."""
    if isinstance(module, StateHook):
        return True
    return getattr(module, "routes_rows", False) and not getattr(module, "merged", False)


class PeftModel(nn.Module):
    """A base model with named adapters. Forward and ``generate`` delegate to the base model.

    Example::

        model = get_peft_model(base, [StateOffsetConfig(), LoraConfig(r=8, target_modules=["out_proj"])])
        model.print_trainable_parameters()
    """

    def __init__(
        self, model: nn.Module, configs: AdapterConfig | Sequence[AdapterConfig], adapter_name: str = "default"
    ) -> None:
        super().__init__()
        if isinstance(model, PeftModel):
            raise TypeError("the model is already a PeftModel; use add_adapter() to add another adapter")
        if any(getattr(m, "_ssmtune_method", None) for m in model.modules()):
            # a second PeftModel would share (and freeze) the first one's adapter modules inside the same base
            raise ValueError(
                "this base model already carries the adapters of another PeftModel (get_peft_model was called on it "
                "before): add more adapters to that PeftModel with add_adapter(name, config), or load a fresh base"
            )
        if not hasattr(model, "mixers"):
            from ..models.hybrid import swap_if_hybrid

            swap_if_hybrid(model)  # a transformers hybrid gets ssmtune's mixers (same outputs)
        self.base_model = model
        self.peft_config: dict[str, list[AdapterConfig]] = {}
        # name -> {logical path -> adapter module}; the modules are registered inside base_model, not here.
        self._adapters: dict[str, dict[str, nn.Module]] = {}
        self.active_adapters: list[str] = []
        self._disabled = False
        # adapters loaded with is_trainable=False stay frozen whenever they are active
        self._frozen: set[str] = set()
        for p in model.parameters():
            p.requires_grad_(False)
        self.add_adapter(adapter_name, configs)
        self.set_adapter(adapter_name)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # the base model's scan backend: a property here, since setting an unknown attribute on this wrapper would not
    # reach the mixers (__getattr__ only forwards reads)
    @property
    def backend(self) -> str:
        if not hasattr(self.base_model, "mixers"):
            from ..models.hybrid import get_backend

            return get_backend(self.base_model)
        return self.base_model.backend

    @backend.setter
    def backend(self, value: str) -> None:
        if not hasattr(self.base_model, "mixers"):
            from ..models.hybrid import set_backend

            set_backend(self.base_model, value)
            return
        self.base_model.backend = value

    # --- adapters -------------------------------------------------------------------------------------------------

    @property
    def adapter_names(self) -> list[str]:
        return list(self._adapters)

    def adapter_modules(self, adapter_name: str | None = None) -> dict[str, nn.Module]:
        """Logical path -> adapter module of one adapter (default: the single active one)."""
        name = self._one_name(adapter_name)
        return dict(self._adapters[name])

    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """Adapter tensors only, keyed ``<logical path>.<tensor name>`` (independent of the adapter name)."""
        out = {}
        for path, module in self.adapter_modules(adapter_name).items():
            for key, t in module.state_dict().items():
                out[f"{path}.{key}"] = t
        return out

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor], adapter_name: str | None = None) -> None:
        """Copy tensors into an adapter; missing, unexpected or mis-shaped keys raise ValueError."""
        own = self.adapter_state_dict(adapter_name)
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"adapter tensors do not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
        bad = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in own if state[k].shape != own[k].shape]
        if bad:
            raise ValueError(f"adapter tensor shapes do not match (key, file, model): {bad[:5]}")
        kinds = [(k, str(state[k].dtype), str(t.dtype)) for k, t in own.items()
                 if state[k].is_floating_point() != t.is_floating_point()]  # fmt: skip
        if kinds:
            raise ValueError(f"adapter tensor dtypes do not match (key, file, model): {kinds[:5]}")
        with torch.no_grad():
            for k, t in own.items():
                t.copy_(state[k])
        # modules holding indices (SDLoRA) check that what was loaded addresses real entries
        for m in self._adapters[self._one_name(adapter_name)].values():
            for sub in m.modules():
                if hasattr(sub, "validate_loaded"):
                    sub.validate_loaded()

    def _one_name(self, adapter_name: str | None) -> str:
        if adapter_name is None:
            if len(self.active_adapters) != 1:
                raise ValueError(f"pass adapter_name: active adapters are {self.active_adapters}")
            return self.active_adapters[0]
        if adapter_name not in self._adapters:
            raise ValueError(f"unknown adapter {adapter_name!r}; adapters: {self.adapter_names}")
        return adapter_name

    def add_adapter(self, adapter_name: str, config: AdapterConfig | Sequence[AdapterConfig]) -> None:
        """Inject a new named adapter (inactive and frozen until ``set_adapter``, except for the first one)."""
        if adapter_name in self._adapters:
            raise ValueError(f"adapter {adapter_name!r} already exists; adapters: {self.adapter_names}")
        _inject.adapter_key(adapter_name, "x")  # validates the name
        configs = _as_list(config)
        modules: dict[str, nn.Module] = {}
        try:
            for cfg in configs:
                attached = spec_for(cfg).inject(self.base_model, cfg, adapter_name=adapter_name)
                dup = sorted(set(attached) & set(modules))
                if dup:
                    raise ValueError(f"adapter {adapter_name!r}: two methods attach the same paths {dup[:3]}")
                for m in attached.values():
                    object.__setattr__(m, "_ssmtune_method", cfg.method)
                    object.__setattr__(m, ADAPTER_ATTR, adapter_name)
                modules.update(attached)
        except Exception:
            for m in modules.values():
                _inject.detach(m)
            raise
        self._adapters[adapter_name] = modules
        self.peft_config[adapter_name] = configs
        for m in modules.values():
            m.active = False
            for p in m.parameters():
                p.requires_grad_(False)

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Make the given adapter(s) active and trainable; all others inactive and frozen."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for n in names:
            self._one_name(n)
        for name, modules in self._adapters.items():
            on = name in names
            for m in modules.values():
                m.active = on and not self._disabled
                for p in m.parameters():
                    p.requires_grad_(on and name not in self._frozen)
        self.active_adapters = names

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        directory: str | os.PathLike,
        adapter_name: str = "default",
        *,
        is_trainable: bool = False,
    ) -> PeftModel:
        """Wrap the base ``model`` with the adapter saved in ``directory`` (peft's ``PeftModel.from_pretrained``).

        The adapter is the active one; its tensors stay frozen unless ``is_trainable``."""
        from .io import load_adapter

        if isinstance(model, PeftModel):
            raise TypeError("from_pretrained takes the base model; use load_adapter() to add an adapter to a PeftModel")
        return load_adapter(model, directory, adapter_name, is_trainable=is_trainable)

    def load_adapter(self, directory: str | os.PathLike, adapter_name: str, *, is_trainable: bool = False) -> None:
        """Add the adapter saved in ``directory`` under ``adapter_name`` (as in peft): the active adapters stay as
        they are (``is_trainable`` matters once it is made active with ``set_adapter``)."""
        from .io import load_adapter

        active = list(self.active_adapters)
        load_adapter(self, directory, adapter_name, is_trainable=is_trainable)
        if active:
            self.set_adapter(active)

    def load_adapters(self, adapters: dict[str, str | os.PathLike], *, is_trainable: bool = False) -> None:
        """``load_adapter`` for many: ``{adapter_name: directory}``, e.g. to serve them side by side."""
        for name, directory in adapters.items():
            self.load_adapter(directory, name, is_trainable=is_trainable)

    def delete_adapter(self, adapter_name: str) -> None:
        name = self._one_name(adapter_name)
        for m in self._adapters.pop(name).values():
            _inject.detach(m)
        del self.peft_config[name]
        self._frozen.discard(name)
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def disable_adapters(self) -> contextlib.AbstractContextManager[None]:
        """Deprecated name of ``disable_adapter``."""
        warnings.warn("PeftModel.disable_adapters() is deprecated; use disable_adapter()", DeprecationWarning, 2)
        return self.disable_adapter()

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context manager: inside it the model computes the base model's output."""
        flags = [(m, m.active) for modules in self._adapters.values() for m in modules.values()]
        self._disabled = True
        try:
            for m, _ in flags:
                m.active = False
            yield
        finally:
            self._disabled = False
            for m, was in flags:
                m.active = was

    # --- per-row routing ------------------------------------------------------------------------------------------

    def routable(self, adapter_name: str) -> bool:
        """True when every module of the adapter is routed per row (state hooks, unmerged LoRA/DoRA), so its rows
        can share a batch with rows of other adapters."""
        return all(_routes_rows(m) for m in self._adapters[self._one_name(adapter_name)].values())

    def _merged(self) -> list[str]:
        return [n for n, mods in self._adapters.items() if any(getattr(m, "merged", False) for m in mods.values())]

    @contextlib.contextmanager
    def route(self, adapter_names: Sequence[str | None]) -> Iterator[Routing]:
        """Context manager: inside it, batch row b uses adapter ``adapter_names[b]`` (``None``: the base model).

        State-based adapters (State-offset h/y, Initial State, Prefix) and LoRA/DoRA mix freely: each state hook
        contributes to its rows only, each LoRA delta adds its low-rank product to its rows only. Any other adapter
        (prompt, BitFit, partial, SDLoRA, Additional-scan) changes shared weights or inputs, so it may only appear in
        a batch whose rows all name it; otherwise ValueError names the adapters that cannot mix. So do LoRA weights
        merged into the base Linears (``LoraDelta.merge``): they act on every row.
        """
        routing = Routing(adapter_names)
        for n in routing.adapters:
            self._one_name(n)
        if any(getattr(m, ROUTING_ATTR, None) is not None for mods in self._adapters.values() for m in mods.values()):
            raise ValueError("route(): the model is already inside a route() block")
        distinct = set(routing.names)
        merged = self._merged()
        if merged and len(distinct) > 1:
            raise ValueError(
                f"adapters {merged} have weights merged into the base model, which every row would see: unmerge "
                f"them before mixing rows of different adapters in one batch; got adapter_names={routing.names}"
            )
        fixed = [n for n in routing.adapters if not self.routable(n)]
        if fixed and len(distinct) > 1:
            methods = {n: sorted({c.method for c in self.peft_config[n]}) for n in fixed}
            raise ValueError(
                f"adapters {methods} cannot be mixed with other rows in one batch: only state-based adapters "
                f"(state_offset, initial_state, prefix) and LoRA/DoRA are routed per row; got adapter_names="
                f"{routing.names}"
            )
        flags = [(m, m.active) for mods in self._adapters.values() for m in mods.values()]
        try:
            for name, mods in self._adapters.items():
                used = name in distinct and not self._disabled
                for m in mods.values():
                    # a module that is not routed is only used by a batch that is all its adapter (checked above)
                    m.active = used
                    if _routes_rows(m):
                        object.__setattr__(m, ROUTING_ATTR, routing)
            yield routing
        finally:
            for m, was in flags:
                m.active = was
                if getattr(m, ROUTING_ATTR, None) is not None:
                    object.__setattr__(m, ROUTING_ATTR, None)

    # --- merging --------------------------------------------------------------------------------------------------

    def merge_and_unload(self) -> nn.Module:
        """Fold the active adapters into the base weights, drop all adapters and return the bare base model.

        Only mergeable methods (LoRA/DoRA and parameter deltas) can be folded; state and input hooks cannot.
        """
        blockers = sorted(
            {
                cfg.method
                for name in self.active_adapters
                for cfg in self.peft_config[name]
                if not self._method_mergeable(name, cfg.method)
            }
        )
        if blockers:
            raise ValueError(f"merge_and_unload: methods {blockers} cannot be merged into the base weights")
        if self._disabled:
            # merging skips inactive deltas, so merging here would silently drop the adapters
            raise ValueError("merge_and_unload: adapters are disabled (inside disable_adapter()); merge outside it")
        for name in list(self._adapters):
            if name not in self.active_adapters:
                self.delete_adapter(name)
        for name in list(self.active_adapters):
            for m in self._adapters.pop(name).values():
                _inject.merge(m)
            del self.peft_config[name]
        self.active_adapters = []
        return self.base_model

    def _method_mergeable(self, adapter_name: str, method: str) -> bool:
        modules = [m for m in self._adapters[adapter_name].values() if getattr(m, "_ssmtune_method", None) == method]
        return all(_inject.is_mergeable(m) for m in modules)

    # --- counting -------------------------------------------------------------------------------------------------

    def trainable_parameters(self) -> int:
        """Number of trainable scalars (the active adapters' tensors)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def num_parameters(self) -> int:
        """All scalars, base and adapters (shared tensors counted once)."""
        return sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        n, total = self.trainable_parameters(), self.num_parameters()
        print(f"trainable params: {n:,d} || all params: {total:,d} || trainable%: {100 * n / max(total, 1):.4f}")

    # --- delegation -----------------------------------------------------------------------------------------------

    def forward(self, *args, adapter_names: Sequence[str | None] | None = None, **kwargs):
        """The base model's forward; ``adapter_names`` (one per batch row, None for the bare base) routes rows."""
        if adapter_names is None:
            return self.base_model(*args, **kwargs)
        _check_rows(adapter_names, args, kwargs)
        with self.route(adapter_names) as routing, routing.packed(kwargs.get("cu_seqlens")):
            return self.base_model(*args, **kwargs)

    def generate(self, *args, adapter_names: Sequence[str | None] | None = None, **kwargs):
        """The base model's ``generate``; with ``adapter_names`` each row (and its beams) decodes with its adapter."""
        if adapter_names is None:
            return self.base_model.generate(*args, **kwargs)
        _check_rows(adapter_names, args, kwargs)
        if not hasattr(self.base_model, "mixers"):
            from ..models.hybrid import generate_routed

            with self.route(adapter_names) as routing:
                return generate_routed(self.base_model, routing, *args, **kwargs)
        from ..models.generate import generate

        with self.route(adapter_names) as routing:
            return generate(RoutedLM(self.base_model, routing), *args, **kwargs)

    def save_pretrained(self, directory: str | os.PathLike, adapter_name: str | None = None) -> None:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` for one adapter (default: the single active
        one); ``PeftModel.from_pretrained`` reads it back. The config records the weights' sha256, so a save cut short
        is refused at load rather than read as the wrong adapter; other files in ``directory`` are left alone."""
        from .io import save_adapter

        save_adapter(self, directory, adapter_name=adapter_name)

    def save_adapter(self, directory: str | os.PathLike, adapter_name: str | None = None) -> None:
        """Deprecated name of ``save_pretrained``."""
        warnings.warn("PeftModel.save_adapter() is deprecated; use save_pretrained()", DeprecationWarning, 2)
        self.save_pretrained(directory, adapter_name)

    def export_peft_lora(self, directory: str | os.PathLike, adapter_name: str | None = None) -> None:
        """Write a pure-LoRA adapter in Hugging Face peft's format (whole-module targets only)."""
        from .io import export_peft_lora

        export_peft_lora(self, directory, adapter_name=adapter_name)


def _check_rows(adapter_names: Sequence[str | None], args: tuple, kwargs: dict) -> None:
    """One adapter name per batch row (per sequence of a packed batch), for forward and generate alike."""
    x = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
    cu = kwargs.get("cu_seqlens")
    if isinstance(cu, torch.Tensor):  # one name per sequence: checked by ``Routing.packed``
        return
    if isinstance(x, torch.Tensor) and x.dim() >= 2 and len(adapter_names) != x.shape[0]:
        raise ValueError(
            f"the batch has {x.shape[0]} rows but {len(adapter_names)} adapter names are routed "
            f"(adapter_names={list(adapter_names)}): give one adapter name (or None) per row"
        )


def get_peft_model(
    model: nn.Module, config_or_list: AdapterConfig | Sequence[AdapterConfig], adapter_name: str = "default"
) -> PeftModel:
    """Freeze ``model``, attach the method(s) as adapter ``adapter_name`` and return the ``PeftModel``."""
    return PeftModel(model, config_or_list, adapter_name=adapter_name)
