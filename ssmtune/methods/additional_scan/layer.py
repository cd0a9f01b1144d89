from __future__ import annotations

import math

import torch
from torch import nn

from ...core.inject import ParamDelta, parametrize_param
from ...core.targets import is_mamba2, iter_mixers
from .config import AdditionalScanConfig


def extra_a_log(a_log: torch.Tensor, n_states: int, init: str) -> torch.Tensor:
    """A_log⁺ [D, n'] (fp32) for the pretrained A_log [D, N]; see ``AdditionalScanConfig.init``."""
    d, n = a_log.shape
    if init == "s4d":
        cols = torch.log(torch.arange(n + 1, n + n_states + 1, dtype=torch.float32, device=a_log.device))
        return cols.expand(d, n_states).clone()
    if init == "reference":
        return torch.full((d, n_states), float(n), dtype=torch.float32, device=a_log.device)
    return a_log[:, -1:].detach().float().expand(d, n_states).clone()


class ExtraStateColumns(ParamDelta):
    """A_log [D, N] → [D, N + n']: appends the trainable A_log⁺ [D, n']."""

    mergeable = False

    def __init__(self, a_log: torch.Tensor, n_states: int, init: str) -> None:
        super().__init__()
        self.A_log_extra = nn.Parameter(extra_a_log(a_log, n_states, init))  # [D, n']

    def transform(self, X: torch.Tensor) -> torch.Tensor:
        return torch.cat([X, self.A_log_extra.to(X.dtype)], dim=1)


class ExtraStateRows(ParamDelta):
    """x_proj.weight [R + 2N, D] → [R + 2(N + n'), D]: W_B⁺ after the B rows, W_C⁺ (zero init) after the C rows."""

    mergeable = False

    def __init__(self, weight: torch.Tensor, n_base: int, n_states: int) -> None:
        super().__init__()
        self.n_base = n_base
        d = weight.shape[1]
        self.W_B_extra = nn.Parameter(torch.empty(n_states, d, dtype=torch.float32, device=weight.device))  # [n', D]
        # nn.Linear's default init, as the reference initialises its extended projection
        nn.init.kaiming_uniform_(self.W_B_extra, a=math.sqrt(5))
        self.W_C_extra = nn.Parameter(torch.zeros(n_states, d, dtype=torch.float32, device=weight.device))  # [n', D]

    def transform(self, X: torch.Tensor) -> torch.Tensor:
        b_end = X.shape[0] - self.n_base  # rows [0, R) are δ, [R, R+N) B, [R+N, R+2N) C
        wb, wc = self.W_B_extra.to(X.dtype), self.W_C_extra.to(X.dtype)
        return torch.cat([X[:b_end], wb, X[b_end:], wc], dim=0)


def inject(model: nn.Module, config: AdditionalScanConfig, *, adapter_name: str) -> dict[str, nn.Module]:
    targets = iter_mixers(model, config.layers_to_transform)
    for t in targets:
        if is_mamba2(t.mixer):
            raise ValueError(
                "AdditionalScanConfig: Mamba-2 is not supported (A is one scalar per head, and neither paper has a "
                f"Mamba-2 Additional-scan; docs/methods.md §5.4), got a {type(t.mixer).__name__} at {t.path!r}"
            )
        # Extending N moves the C rows of x_proj and changes the state shape: adapters attached earlier (LoRA row
        # slices or whole-x_proj deltas, [D, N] state hooks) would silently act on the wrong rows or fail later.
        deltas = getattr(getattr(t.mixer.x_proj, "adapters", None), "keys", list)()
        if list(deltas) or len(t.mixer.state_hooks):
            raise ValueError(
                f"AdditionalScanConfig: {t.path} already has adapters ({list(deltas) + list(t.mixer.state_hooks)}); "
                "attach Additional-scan first, before LoRA on x_proj or state-based methods"
            )
    attached = {}
    for t in targets:
        mixer = t.mixer
        n = mixer.d_state
        x_proj = getattr(mixer.x_proj, "base_layer", mixer.x_proj)
        if x_proj.weight.shape[0] != mixer.dt_proj.in_features + 2 * n:
            raise ValueError(
                f"AdditionalScanConfig: {t.path}.x_proj has {x_proj.weight.shape[0]} rows, expected R + 2N = "
                f"{mixer.dt_proj.in_features + 2 * n} (is the state already extended?)"
            )
        cols = ExtraStateColumns(mixer.A_log, config.n_states, config.init)
        rows = ExtraStateRows(x_proj.weight, n, config.n_states)
        attached[f"{t.path}.A_log.additional_scan"] = parametrize_param(mixer, "A_log", cols)
        attached[f"{t.path}.x_proj.weight.additional_scan"] = parametrize_param(x_proj, "weight", rows)
    return attached
