from __future__ import annotations

import torch
from torch import nn

from ...core.hooks import StateHook
from ...core.inject import adapter_key, add_state_hook
from ...core.targets import block_of, iter_mixers
from ...models.cache import LayerCache
from .config import PrefixTuningConfig


class PrefixStates(StateHook):
    """Virtual-token activations P [M, d_model] of one block, served as the states they leave behind.

    ``initial_state`` runs the block's norm and mixer (without state hooks, from a fresh cache) on P and returns the
    final ssm state; ``initial_conv_state`` returns the final conv window of the same run (computed once per pair).
    """

    def __init__(self, num_virtual_tokens: int, block: nn.Module, *, init_std: float = 0.02) -> None:
        super().__init__()
        w = block.norm.weight
        self.prefix = nn.Parameter(torch.randn(num_virtual_tokens, w.shape[0], device=w.device) * init_std)
        # A plain reference, not a submodule: the block already owns this hook (through its mixer).
        object.__setattr__(self, "_block", block)
        object.__setattr__(self, "_pending_conv", None)

    def prefix_states(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(h_M [D, N] or [H, P, N] fp32, conv window [conv_dim, K-1]) after the M prefix positions."""
        norm, mixer = self._block.norm, self._block.mixer
        cache = LayerCache()
        normed = norm(self.prefix.to(norm.weight.dtype)).unsqueeze(0)  # [1, M, d_model]
        mixer(normed, cache, use_state_hooks=False)
        return cache.ssm_state[0], cache.conv_state[0]

    def initial_state(self, batch_size: int) -> torch.Tensor:
        h0, conv0 = self.prefix_states()
        # collect_state asks for the conv window right after; reuse this run.
        object.__setattr__(self, "_pending_conv", conv0)
        return h0

    def initial_conv_state(self, batch_size: int) -> torch.Tensor:
        conv0 = self._pending_conv
        object.__setattr__(self, "_pending_conv", None)
        return self.prefix_states()[1] if conv0 is None else conv0


def inject(model: nn.Module, config: PrefixTuningConfig, *, adapter_name: str) -> dict[str, nn.Module]:
    attached = {}
    for t in iter_mixers(model, config.layers):
        hook = PrefixStates(config.num_virtual_tokens, block_of(model, t.layer), init_std=config.init_std)
        attached[f"{t.path}.prefix"] = add_state_hook(t.mixer, adapter_key(adapter_name, "prefix"), hook)
    return attached
