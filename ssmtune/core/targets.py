"""Resolve a config's layer/module selection to ``(path, module)`` pairs of the base model."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class MixerTarget:
    path: str
    """Module path of the mixer inside the model, e.g. ``backbone.layers.3.mixer``."""
    layer: int
    mixer: nn.Module


def module_paths(model: nn.Module) -> dict[int, str]:
    """id(module) -> dotted path, for every submodule of ``model``."""
    return {id(m): name for name, m in model.named_modules(remove_duplicate=False)}


def num_layers(model: nn.Module) -> int:
    return sum(1 for _ in model.mixers())


def check_layers(model: nn.Module, layers: list[int] | None, owner: str = "layers") -> list[int]:
    """Validate a layer selection against the model; ``None`` means all layers."""
    n = num_layers(model)
    if layers is None:
        return list(range(n))
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise ValueError(f"{owner}: layer indices {bad} out of range for a model with {n} layers (valid 0..{n - 1})")
    return sorted(layers)


def iter_mixers(model: nn.Module, layers: list[int] | None = None) -> list[MixerTarget]:
    """The selected mixers, in layer order. ``model`` provides ``mixers()`` yielding ``(layer_idx, mixer)``, or is a
    transformers hybrid model whose mixers ``ssmtune.from_transformers`` swapped (layer = decoder layer index)."""
    if not hasattr(model, "mixers"):
        return _hybrid_targets(model, layers)
    selected = set(check_layers(model, layers))
    paths = module_paths(model)
    return [MixerTarget(paths[id(m)], i, m) for i, m in model.mixers() if i in selected]


def _hybrid_targets(model: nn.Module, layers: list[int] | None) -> list[MixerTarget]:
    from ..models.hybrid import hybrid_mixers

    found = hybrid_mixers(model)
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no mixers(); pass an ssmtune Mamba / Mamba-2 model or a transformers hybrid "
            "model passed through ssmtune.from_transformers"
        )
    valid = [i for i, _, _ in found]
    bad = sorted(set(layers or []) - set(valid))
    if bad:
        raise ValueError(f"layers: layer indices {bad} hold no recurrent mixer in this model (valid {valid})")
    return [MixerTarget(path, i, m) for i, path, m in found if layers is None or i in layers]


def block_of(model: nn.Module, layer: int) -> nn.Module:
    """The residual block holding layer ``layer``'s mixer (``.norm`` and ``.mixer``)."""
    if not hasattr(model, "mixers"):
        from ..models.hybrid import host_block

        return host_block(model, layer)
    return model.backbone.layers[layer]


def is_mamba2(mixer: nn.Module) -> bool:
    return len(mixer.state_shape) == 3
