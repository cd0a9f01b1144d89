from __future__ import annotations

import fnmatch
import re

from torch import nn

from ...core.inject import parametrize_param
from ...core.targets import is_mamba2, iter_mixers
from ..bitfit.layer import ParamOffset, TiedOffset
from .config import FullConfig, PartialConfig

# ssm-peft 007 ("full S6 + conv") and its Mamba-2 counterpart: the default of PartialConfig.
MAMBA1_SSM = ["A_log", "D", "x_proj.weight", "dt_proj.*", "conv1d.*"]
MAMBA2_SSM = ["A_log", "D", "dt_bias", "conv1d.*"]
# Containers of adapters: their parameters are never base parameters.
_ADAPTER_CONTAINERS = ("state_hooks", "input_hooks", "adapters", "parametrizations")


def base_parameters(model: nn.Module) -> list[tuple[list[str], list[tuple[nn.Module, str]]]]:
    """Every base tensor once: (its dotted names, its owners (module, attribute)), in model order.

    Names skip ``base_layer`` (an ``AdaptedLinear``'s wrapped Linear) so they match the checkpoint's names; adapter
    modules are skipped. A tied tensor has several names and owners.
    """
    found: dict[int, tuple[list[str], list[tuple[nn.Module, str]]]] = {}

    def walk(module: nn.Module, prefix: str) -> None:
        for name, p in module._parameters.items():
            if p is not None:
                names, owners = found.setdefault(id(p), ([], []))
                names.append(prefix + name)
                owners.append((module, name))
        if hasattr(module, "parametrizations"):
            for name, plist in module.parametrizations.items():
                names, owners = found.setdefault(id(plist.original), ([], []))
                names.append(prefix + name)
                owners.append((module, name))
        for child_name, child in module._modules.items():
            if child is None or child_name in _ADAPTER_CONTAINERS:
                continue
            walk(child, prefix if child_name == "base_layer" else f"{prefix}{child_name}.")

    walk(model, "")
    return list(found.values())


def _suffixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[i:]) for i in range(len(parts))]


def pattern_matches(pattern: str, name: str) -> bool:
    """Glob (or ``re:`` regex) match of the full dotted name or of any dotted suffix of it."""
    if pattern.startswith("re:"):
        rx = re.compile(pattern[3:])
        return any(rx.fullmatch(s) for s in _suffixes(name))
    return any(fnmatch.fnmatchcase(s, pattern) for s in _suffixes(name))


def inject(model: nn.Module, config: PartialConfig, *, adapter_name: str) -> dict[str, nn.Module]:
    targets = iter_mixers(model, config.layers_to_transform)
    all_blocks = [t.path.rsplit(".", 1)[0] + "." for t in iter_mixers(model)]
    kept_blocks = {t.path.rsplit(".", 1)[0] + "." for t in targets}
    if isinstance(config, FullConfig):
        patterns = ["*"]
    elif config.parameters is not None:
        patterns = config.parameters
    else:
        patterns = MAMBA2_SSM if targets and is_mamba2(targets[0].mixer) else MAMBA1_SSM

    def in_scope(name: str) -> bool:
        block = next((b for b in all_blocks if name.startswith(b)), None)
        return block is None or block in kept_blocks

    chosen = []
    used = set()
    for names, owners in base_parameters(model):
        hits = {p for p in patterns for n in names if in_scope(n) and pattern_matches(p, n)}
        used |= hits
        if hits:
            chosen.append((names, owners))
    unused = [p for p in patterns if p not in used]
    if unused:
        mixer_names = sorted({n for n, _ in targets[0].mixer.named_parameters()}) if targets else []
        raise ValueError(
            f"{type(config).__name__}.parameters: {unused} match no parameter of the selected layers; "
            f"names inside a mixer: {mixer_names}"
        )
    attached = {}
    for names, owners in chosen:
        (module, attr), *followers = owners
        leader = parametrize_param(module, attr, ParamOffset(getattr(module, attr)))
        attached[f"{names[0]}.{config.method}"] = leader
        for (f_module, f_attr), f_name in zip(followers, names[1:]):
            attached[f"{f_name}.{config.method}_tied"] = parametrize_param(f_module, f_attr, TiedOffset(leader))
    return attached
