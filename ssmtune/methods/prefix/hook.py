from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...core.inject import adapter_key, add_state_hook
from ...core.routing import ADAPTER_ATTR, ROUTING_ATTR
from ...core.targets import block_of, iter_mixers
from ...models.cache import LayerCache
from ...models.hooks import StateHook
from .config import PrefixTuningConfig


@dataclass
class _Cached:
    key: tuple
    keep: list[torch.Tensor]
    """The keyed tensors: holding their storage means no other tensor can take a keyed address while the entry lives."""
    values: list[torch.Tensor]
    """Copies of the adapter tensors, compared by value: writes through ``.data`` bump no version counter."""
    h0: torch.Tensor
    conv0: torch.Tensor


def _fingerprint(hook: PrefixStates) -> tuple[tuple, list[torch.Tensor], list[torch.Tensor]] | None:
    """(key, keyed tensors, adapter tensors) of everything the prefix pass reads; None when the pass must not be reused
    (an active dropout is random; inference tensors have no version counter).

    The key holds, per tensor (the prefix, the block's norm and mixer, state hooks aside: the pass runs without them),
    its address, version counter, dtype, device, shape and strides; per adapter module in the mixer (LoRA, BitFit,
    ...), whether it acts in the pass (active, not merged, and under a routing only when it is of the hook's own
    adapter, as ``routed_state`` routes the pass); the backend, the train/eval mode and autocast. The adapter tensors
    (the prefix and those of adapter modules: small by design) are also compared by value.
    """
    block = hook._block
    adapter = getattr(hook, ADAPTER_ATTR, None)
    dev = block.norm.weight.device.type
    autocast = torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev)
    parts: list = [block.training, getattr(block.mixer, "backend", None), autocast]
    base, small, deltas = [], [hook.prefix], []
    modules = (("norm", block.norm), *(("mixer." + n, m) for n, m in block.mixer.named_modules()))
    for name, m in modules:
        if name.startswith("mixer.state_hooks"):
            continue
        if m.training and isinstance(m, nn.Dropout) and m.p > 0:
            return None
        if hasattr(m, "active"):
            deltas.append(name + ".")
            routed = getattr(m, ROUTING_ATTR, None) is not None
            mine = adapter is not None and getattr(m, ADAPTER_ATTR, None) == adapter
            parts.append((name, bool(m.active) and not getattr(m, "merged", False) and (mine or not routed)))
        inside = any((name + ".").startswith(d) for d in deltas)
        for t in (*m._parameters.values(), *m._buffers.values()):
            if t is not None:
                (small if inside else base).append(t)
    tensors = base + small
    if any(t.is_inference() for t in tensors):
        return None
    parts += [(t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape), t.stride()) for t in tensors]
    return tuple(parts), tensors, small


class PrefixStates(StateHook):
    """Virtual-token activations P [M, d_model] of one block, served as the states they leave behind.

    ``initial_state`` runs the block's norm and mixer (without state hooks, from a fresh cache) on P and returns the
    final ssm state; ``initial_conv_state`` returns the final conv window of the same run (computed once per pair).
    With gradients off the pair is kept and reused while nothing it was computed from has changed (``_fingerprint``):
    serving then skips the pass on every prefill. Training (gradients on) always runs it, for a fresh graph.
    """

    def __init__(self, num_virtual_tokens: int, block: nn.Module, *, init_std: float = 0.02) -> None:
        super().__init__()
        w = block.norm.weight
        self.prefix = nn.Parameter(torch.randn(num_virtual_tokens, w.shape[0], device=w.device) * init_std)
        # A plain reference, not a submodule: the block already owns this hook (through its mixer).
        object.__setattr__(self, "_block", block)
        object.__setattr__(self, "_pending_conv", None)
        object.__setattr__(self, "_cached", None)

    def prefix_states(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(h_M [D, N] or [H, P, N] fp32, conv window [conv_dim, K-1]) after the M prefix positions."""
        norm, mixer = self._block.norm, self._block.mixer
        cache = LayerCache()
        normed = norm(self.prefix.to(norm.weight.dtype)).unsqueeze(0)  # [1, M, d_model]
        mixer(normed, cache, use_state_hooks=False)
        return cache.ssm_state[0], cache.conv_state[0]

    def _states(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``prefix_states``, from the kept pair when gradients are off and nothing it was computed from changed."""
        if torch.is_grad_enabled():
            object.__setattr__(self, "_cached", None)
            return self.prefix_states()
        found = _fingerprint(self)
        if found is None:
            return self.prefix_states()
        key, keep, small = found
        c = self._cached
        # an equal key means the same tensors (the entry holds their storage), so the values pair up in order
        if c is not None and c.key == key and all(torch.equal(t, copy) for t, copy in zip(small, c.values)):
            return c.h0, c.conv0
        h0, conv0 = self.prefix_states()
        entry = _Cached(key, [t.detach() for t in keep], [t.detach().clone() for t in small], h0, conv0)
        object.__setattr__(self, "_cached", entry)
        return h0, conv0

    def initial_state(self, batch_size: int) -> torch.Tensor:
        h0, conv0 = self._states()
        # collect_state asks for the conv window right after; reuse this run.
        object.__setattr__(self, "_pending_conv", conv0)
        return h0

    def initial_conv_state(self, batch_size: int) -> torch.Tensor:
        conv0 = self._pending_conv
        object.__setattr__(self, "_pending_conv", None)
        return self._states()[1] if conv0 is None else conv0


def inject(model: nn.Module, config: PrefixTuningConfig, *, adapter_name: str) -> dict[str, nn.Module]:
    attached = {}
    for t in iter_mixers(model, config.layers_to_transform):
        hook = PrefixStates(config.num_virtual_tokens, block_of(model, t.layer), init_std=config.init_std)
        attached[f"{t.path}.prefix"] = add_state_hook(t.mixer, adapter_key(adapter_name, "prefix"), hook)
    return attached
