from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from ...core.inject import LinearDelta, adapter_key, wrap_linear
from ...core.routing import ADAPTER_ATTR, ROUTING_ATTR
from ...core.targets import is_mamba2, iter_mixers
from .config import MAMBA1_TARGETS, MAMBA2_TARGETS, TRANSFORMER_TARGETS, LoraConfig


class LoraDelta(LinearDelta):
    """Low-rank delta on rows [start, stop) of a Linear: y[..., rows] += (α/r)·B A dropout(x); optional DoRA.

    Parameters are fp32 (``lora_A`` [r, in], ``lora_B`` [rows, r], ``magnitude`` [rows]); the forward casts them.
    Under ``PeftModel.route`` only the batch rows routed to this delta's adapter are adapted (``core/routing.py``).
    """

    # PeftModel.route may attach a Routing to it: its forward then adapts its adapter's rows only
    routes_rows = True

    def __init__(
        self,
        base: nn.Linear,
        rows: tuple[int, int] | None,
        *,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_dora: bool = False,
    ) -> None:
        super().__init__()
        w = base.weight
        self.rows = (0, w.shape[0]) if rows is None else rows
        self.full = rows is None
        n_rows = self.rows[1] - self.rows[0]
        self.scale = alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, w.shape[1], device=w.device))  # [r, in]
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(n_rows, r, device=w.device))  # [rows, r]
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.use_dora = use_dora
        self.magnitude = None
        if use_dora:
            self.magnitude = nn.Parameter(self._rows(w).detach().float().norm(dim=1))  # [rows]
        self._merge_norm: torch.Tensor | None = None

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.full else t[self.rows[0] : self.rows[1]]

    def delta_weight(self) -> torch.Tensor:
        """(α/r)·B A, [rows, in] in fp32."""
        return self.scale * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor, y: torch.Tensor, base: nn.Linear) -> torch.Tensor:
        routing = getattr(self, ROUTING_ATTR, None)
        if routing is None:
            return self._adapt(x, y, base)
        if routing.tokens is not None:
            # a packed forward [1, total, features]: its tokens are routed with their sequences, one row each
            flat = self._routed(routing, x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]), base)
            return flat.view(y.shape)
        return self._routed(routing, x, y, base)

    def _routed(self, routing, x: torch.Tensor, y: torch.Tensor, base: nn.Linear) -> torch.Tensor:
        rows = routing.rows_of(getattr(self, ADAPTER_ATTR), x.shape[0], x.device)  # x, y: [B, ..., features]
        if rows is None:
            return self._adapt(x, y, base)
        if rows.numel() == 0:
            return y
        # the whole adapted rows (not only the low-rank term), so DoRA's rescaling of the base rows is routed too
        return y.index_copy(0, rows, self._adapt(x[rows], y[rows], base))

    def _adapt(self, x: torch.Tensor, y: torch.Tensor, base: nn.Linear) -> torch.Tensor:
        xd = self.dropout(x)
        lora = F.linear(F.linear(xd, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype)) * self.scale  # [..., rows]
        start, stop = self.rows
        y_rows = y if self.full else y[..., start:stop]
        if self.use_dora:
            w = self._rows(base.weight)
            # The norm is detached, as in peft's DoRA (DoRA paper §4.3): it saves memory and keeps merges exact.
            norm = (w.float() + self.delta_weight()).norm(dim=1).detach()  # [rows]
            mag = (self.magnitude / norm).to(x.dtype)  # [rows]
            if isinstance(self.dropout, nn.Identity) or not self.training:
                base_part = y_rows if base.bias is None else y_rows - self._rows(base.bias).to(y.dtype)
            else:
                base_part = F.linear(xd, w.to(x.dtype))
            new_rows = y_rows + (mag - 1) * base_part + mag * lora
        else:
            new_rows = y_rows + lora
        if self.full:
            return new_rows
        return torch.cat([y[..., :start], new_rows, y[..., stop:]], dim=-1)

    @torch.no_grad()
    def merge(self, base: nn.Linear) -> None:
        w = self._rows(base.weight)
        v = w.float() + self.delta_weight()  # [rows, in]
        if self.use_dora:
            norm = v.norm(dim=1)
            self._merge_norm = norm
            v = (self.magnitude / norm)[:, None] * v
        w.copy_(v.to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self, base: nn.Linear) -> None:
        w = self._rows(base.weight)
        v = w.float()
        if self.use_dora:
            v = v * (self._merge_norm / self.magnitude)[:, None]
        w.copy_((v - self.delta_weight()).to(w.dtype))
        self.merged = False


def slice_rows(mixer: nn.Module, target: str) -> tuple[str, tuple[int, int] | None]:
    """(Linear attribute, output rows or None for the whole Linear) of a target name."""
    name, _, part = target.partition(".")
    if not part:
        return name, None
    d = mixer.d_inner
    if is_mamba2(mixer):
        gn = mixer.ngroups * mixer.d_state
        h = mixer.nheads
        sizes = {"z": d, "x": d, "B": gn, "C": gn, "dt": h}
    elif name == "in_proj":
        sizes = {"x": d, "z": d}
    else:
        n = mixer.d_state
        # R from dt_proj: x_proj.out_features is the static Linear size, stale once Additional-scan extends N
        sizes = {"dt": mixer.dt_proj.in_features, "B": n, "C": n}
    start = 0
    for key, size in sizes.items():
        if key == part:
            return name, (start, start + size)
        start += size
    raise AssertionError(f"unhandled slice {target!r}")


def _host_linears(model: nn.Module, names: list[str], layers: list[int] | None) -> list[tuple[str, nn.Module, str]]:
    """(path, parent, attribute) of the attention / MLP Linears named ``names`` in a hybrid model, in decoder layers
    ``layers`` (None: all), outside the recurrent mixers."""
    from ...models.hybrid import hybrid_mixers

    mixers = tuple(path + "." for _, path, _ in hybrid_mixers(model))
    found = []
    for path, parent in model.named_modules():
        if (path + ".").startswith(mixers):
            continue
        parts = path.split(".")
        layer = next((int(b) for a, b in itertools.pairwise(parts) if a == "layers" and b.isdigit()), None)
        if layers is not None and layer not in layers:
            continue
        for attr in names:
            lin = getattr(parent, attr, None)
            if isinstance(getattr(lin, "base_layer", lin), nn.Linear) and attr in parent._modules:
                found.append((f"{path}.{attr}", parent, attr))
    missing = sorted(set(names) - {attr for _, _, attr in found})
    if missing:
        raise ValueError(f"LoraConfig.target_modules: {missing} match no Linear of the selected layers of this model")
    return found


def inject(model: nn.Module, config: LoraConfig, *, adapter_name: str) -> dict[str, nn.Module]:
    hybrid = not hasattr(model, "mixers")
    hosted = [t for t in config.target_modules if t in TRANSFORMER_TARGETS] if hybrid else []
    host_linears = _host_linears(model, hosted, config.layers_to_transform) if hosted else []
    if hybrid and config.layers_to_transform is not None:
        # a hybrid's layer selection may name attention layers too: the mixers are those of the selected layers
        targets = [t for t in iter_mixers(model) if t.layer in config.layers_to_transform]
    else:
        targets = iter_mixers(model, config.layers_to_transform)
    if not targets and len(hosted) < len(config.target_modules):
        raise ValueError(f"LoraConfig.layers_to_transform={config.layers_to_transform} select no recurrent mixer "
                         f"for {config.target_modules}")  # fmt: skip
    for t in targets:
        own = getattr(t.mixer, "lora_targets", None)  # a Gated DeltaNet names its own Linears
        valid = (own or (MAMBA2_TARGETS if is_mamba2(t.mixer) else MAMBA1_TARGETS)) + tuple(hosted)
        bad = [name for name in config.target_modules if name not in valid]
        if bad:
            arch = getattr(t.mixer, "family", None) if own else "Mamba-2" if is_mamba2(t.mixer) else "Mamba-1"
            raise ValueError(f"LoraConfig.target_modules: {bad} are not {arch} targets; valid: {list(valid)}")
    attached = {}
    for path, parent, attr in host_linears:
        lin = getattr(parent, attr)
        delta = _delta(getattr(lin, "base_layer", lin), None, config)
        wrap_linear(parent, attr, delta, key=adapter_key(adapter_name, "lora"))
        attached[f"{path}.lora"] = delta
    for t in targets:
        for target in config.target_modules:
            if target in hosted:
                continue
            name, rows = slice_rows(t.mixer, target)
            lin = getattr(t.mixer, name)
            base = getattr(lin, "base_layer", lin)
            delta = _delta(base, rows, config)
            tag = "lora" if rows is None else f"lora_{target.partition('.')[2]}"
            wrap_linear(t.mixer, name, delta, key=adapter_key(adapter_name, tag))
            attached[f"{t.path}.{target}.lora"] = delta
    return attached


def _delta(base: nn.Linear, rows: tuple[int, int] | None, config: LoraConfig) -> LoraDelta:
    return LoraDelta(
        base, rows, r=config.r, alpha=config.lora_alpha, dropout=config.lora_dropout, use_dora=config.use_dora
    )
