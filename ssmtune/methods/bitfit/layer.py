from __future__ import annotations

import torch
from torch import nn

from ...core.inject import ParamDelta, parametrize_param
from ...core.targets import is_mamba2, iter_mixers
from .config import BitFitConfig


class ParamOffset(ParamDelta):
    """W' = W + δ with δ an fp32, zero-init tensor of W's shape (identity at init; merges exactly).

    The sum is formed in fp32 and rounded once to W's dtype, so small updates accumulate in δ as in an fp32 master copy.
    """

    def __init__(self, like: torch.Tensor) -> None:
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(like.shape, dtype=torch.float32, device=like.device))

    def transform(self, X: torch.Tensor) -> torch.Tensor:
        return (X.float() + self.delta).to(X.dtype)


class TiedOffset(ParamDelta):
    """The follower of a ``ParamOffset`` on a second owner of the same tensor (tied embedding / lm_head).

    It holds no parameter (the leader's δ is saved and trained once) and applies the leader's δ while the leader is
    attached and active. Once the leader has been merged into the shared tensor, the follower is the identity, so
    merging both does not add δ twice.
    """

    def __init__(self, leader: ParamOffset) -> None:
        super().__init__()
        # a plain attribute: registering the leader here would make its δ a parameter of two adapter modules
        object.__setattr__(self, "leader", leader)

    def transform(self, X: torch.Tensor) -> torch.Tensor:
        leader = self.leader
        if getattr(leader, "_ssmtune_attach", None) is None or not getattr(leader, "active", True):
            return X
        return leader.transform(X)


def bias_targets(mixer: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(module, tensor name, logical path suffix) of the biases BitFit trains in one mixer."""
    if mixer.conv1d.bias is None:
        raise ValueError("BitFitConfig: the model has no conv1d bias (conv_bias=False); BitFit needs it")
    if is_mamba2(mixer):
        return [(mixer.conv1d, "bias", "conv1d.bias"), (mixer, "dt_bias", "dt_bias")]
    return [(mixer.conv1d, "bias", "conv1d.bias"), (mixer.dt_proj, "bias", "dt_proj.bias")]


def inject(model: nn.Module, config: BitFitConfig, *, adapter_name: str) -> dict[str, nn.Module]:
    targets = [(t, bias_targets(t.mixer)) for t in iter_mixers(model, config.layers_to_transform)]
    attached = {}
    for t, items in targets:
        for module, name, suffix in items:
            module = getattr(module, "base_layer", module)
            attached[f"{t.path}.{suffix}.bitfit"] = parametrize_param(module, name, ParamOffset(getattr(module, name)))
    return attached
