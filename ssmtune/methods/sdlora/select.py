"""Phase 1 of SDT / SDLoRA (docs/methods.md §5.5): warm-up, then selection of channels and states by update
magnitude."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...core.inject import ParamDelta, adapter_key, detach, parametrize_param, wrap_linear
from ...core.targets import iter_mixers
from ..lora.layer import LoraDelta, slice_rows
from .config import SDLoraConfig
from .layer import Layout, SparseDelta, _tensor_owner, targets_for

WARMUP_NAME = "_sdt_warmup"


@dataclass
class SDTSelection:
    """The selection of one layer and the warm-up deltas it came from."""

    channels: torch.Tensor
    """Mamba-1: channels 𝒞 [k_c], ascending. Mamba-2: heads [k_h]."""
    states: torch.Tensor
    """Mamba-1: states 𝒮_d [k_c, k_s] of each selected channel, ascending. Mamba-2: B/C rows [k_s] (of G·N)."""
    warmup: dict[str, torch.Tensor] = field(default_factory=dict)
    """The warm-up deltas G: ``"A_log"`` [D, N] (Mamba-2: ``"A_log"``, ``"dt_bias"`` [H], ``"in_proj.BC"`` [2GN, d_model])."""


def select_dims(delta_a: torch.Tensor, k_c: int, k_s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-1 rule: channels by s_d = Σ_n G[d, n]², then per selected channel the states by G[d, n]².

    Args:
        delta_a (torch.Tensor): shape [D, N], the warm-up delta G of A_log.
    Returns:
        channels [k_c] and states [k_c, k_s], each sorted ascending.
    """
    g2 = delta_a.detach().float().pow(2)  # [D, N]
    channels = torch.topk(g2.sum(1), k_c).indices.sort().values  # [k_c]
    states = torch.topk(g2[channels], k_s, dim=1).indices.sort(dim=1).values  # [k_c, k_s]
    return channels, states


def select_heads_rows(
    delta_a: torch.Tensor, delta_dt: torch.Tensor, delta_bc: torch.Tensor, k_h: int, k_s: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-2 proposal: heads by ΔA_log² + Δdt_bias², B/C rows n by ‖ΔW_B[n]‖² + ‖ΔW_C[n]‖².

    Args:
        delta_a, delta_dt (torch.Tensor): shape [H]. delta_bc (torch.Tensor): shape [2GN, d_model], B rows then C rows.
    """
    heads = torch.topk(delta_a.float().pow(2) + delta_dt.float().pow(2), k_h).indices.sort().values
    gn = delta_bc.shape[0] // 2
    row = delta_bc.float().pow(2).sum(1)  # [2GN]
    rows = torch.topk(row[:gn] + row[gn:], k_s).indices.sort().values
    return heads, rows


class _DenseRows(ParamDelta):
    """Warm-up delta: X[start:stop] += δ, dense, fp32, zero-init."""

    def __init__(self, like: torch.Tensor, start: int, stop: int) -> None:
        super().__init__()
        self.start, self.stop = start, stop
        self.delta = nn.Parameter(torch.zeros((stop - start, *like.shape[1:]), dtype=torch.float32, device=like.device))

    def transform(self, X: torch.Tensor) -> torch.Tensor:
        mid = (X[self.start : self.stop].float() + self.delta).to(X.dtype)
        return torch.cat([X[: self.start], mid, X[self.stop :]], dim=0)


def _default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return model(batch, labels=batch).loss
    if isinstance(batch, dict):
        return model(**batch).loss
    raise TypeError(f"sdt_select: a batch must be a token tensor or a dict of model inputs, got {type(batch).__name__}")


def _attach_warmup(mixer: nn.Module, path: str, lora_targets: list[str], config: SDLoraConfig) -> dict[str, nn.Module]:
    """Dense warm-up deltas (M1: A_log; M2: A_log, dt_bias, in_proj B/C rows) and a fresh LoRA on the LoRA targets."""
    out: dict[str, nn.Module] = {}
    layout = Layout.of(mixer)
    if layout.mamba2:
        start = 2 * layout.d_inner
        specs = [
            ("A_log", 0, layout.nheads),
            ("dt_bias", 0, layout.nheads),
            ("in_proj.BC", start, start + 2 * layout.d_state),
        ]
    else:
        specs = [("A_log", 0, layout.d_inner)]
    for key, start, stop in specs:
        module, name = _tensor_owner(mixer, "in_proj.B" if key == "in_proj.BC" else key)
        out[key] = parametrize_param(module, name, _DenseRows(getattr(module, name), start, stop))
    for target in lora_targets:
        name, rows = slice_rows(mixer, target)
        lin = getattr(mixer, name)
        delta = LoraDelta(
            getattr(lin, "base_layer", lin), rows, r=config.r, alpha=config.lora_alpha, dropout=config.lora_dropout
        )
        delta.train(mixer.training)
        wrap_linear(mixer, name, delta, key=adapter_key(WARMUP_NAME, f"lora_{target.replace('.', '_')}"))
        out[f"lora:{target}"] = delta
    return out


def sdt_select(
    model: nn.Module,
    warmup_batches: Iterable[Any],
    *,
    lr: float,
    steps: int | None = None,
    total_steps: int | None = None,
    max_grad_norm: float | None = 1.0,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    adapter_name: str | None = None,
) -> dict[str, SDTSelection]:
    """Run the SDT warm-up on a ``PeftModel`` holding an SDLoRA adapter and write the selection into that adapter.

    1. Every adapter is switched off; dense zero-init deltas (Mamba-1: Δ_A [D, N]; Mamba-2: A_log, dt_bias, B/C rows)
       and a fresh LoRA on the config's LoRA targets are attached and trained for ``steps`` batches with AdamW
       (β = (0.9, 0.999), weight decay 0), linear decay planned over ``total_steps`` (None: constant lr), clipping
       at ``max_grad_norm`` — the main run's optimiser, as in the reference.
    2. Everything but the warm-up deltas is discarded (the warm-up LoRA included); the base weights never change.
    3. Per layer, channels and states are selected (``select_dims`` / ``select_heads_rows``), written into the
       adapter's sparse deltas, which are zeroed, and the adapter's LoRA gets a fresh init: phase 2 starts from the
       pretrained model with fresh adapters.

    Args:
        model: the ``PeftModel``; the adapter ``adapter_name`` (default: the single active one) holds an SDLoRA config.
        warmup_batches: batches for ``loss_fn(model, batch)``; default loss: ``model(**batch).loss`` for a dict,
            ``model(ids, labels=ids).loss`` for a token tensor [B, L]. Autocast, if wanted, is the caller's context.
        steps: warm-up steps T_w. Default: the config's ``warmup_steps``. Fewer batches than steps warns.
    Returns:
        layer path (e.g. ``backbone.layers.0.mixer``) -> ``SDTSelection``.
    """
    from ...core.peft_model import PeftModel

    if not isinstance(model, PeftModel):
        raise TypeError(f"sdt_select needs a PeftModel with an SDLoRA adapter, got {type(model).__name__}")
    name = model._one_name(adapter_name)
    configs = [c for c in model.peft_config[name] if isinstance(c, SDLoraConfig)]
    if len(configs) != 1:
        raise ValueError(f"sdt_select: adapter {name!r} must hold exactly one SDLoraConfig, got {len(configs)}")
    config = configs[0]
    steps = config.warmup_steps if steps is None else steps
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"sdt_select: steps must be a positive int, got {steps!r}")
    if lr <= 0:
        raise ValueError(f"sdt_select: lr must be positive, got {lr!r}")
    if total_steps is not None and total_steps < steps:
        raise ValueError(f"sdt_select: total_steps={total_steps!r} is shorter than the warm-up steps={steps!r}")
    mine = [m for m in model.adapter_modules(name).values() if getattr(m, "_ssmtune_method", None) == "sdlora"]
    sparse = [m for m in mine if isinstance(m, SparseDelta)]
    loras = [m for m in mine if isinstance(m, LoraDelta)]

    # every adapter off and frozen, so the warm-up starts from the pretrained model
    flags = [
        (m, m.active, [(p, p.requires_grad) for p in m.parameters()])
        for modules in model._adapters.values()
        for m in modules.values()
    ]
    for m, _, params in flags:
        m.active = False
        for p, _ in params:
            p.requires_grad_(False)
    targets = iter_mixers(model.base_model, config.layers_to_transform)
    layouts = {t.path: Layout.of(t.mixer) for t in targets}
    warm: dict[str, dict[str, nn.Module]] = {}
    modes = [(m, m.training) for m in model.modules()]
    try:
        for t in targets:
            warm[t.path] = _attach_warmup(t.mixer, t.path, targets_for(t.mixer, config)[1], config)
        params = [p for mods in warm.values() for m in mods.values() for p in m.parameters()]
        opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        horizon = total_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if horizon is None else max(0.0, 1 - s / horizon))
        model.train()
        done = 0
        for batch in warmup_batches:
            if done == steps:
                break
            loss = (loss_fn or _default_loss)(model, batch)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            done += 1
        if done == 0:
            raise ValueError("sdt_select: warmup_batches yielded no batch")
        if done < steps:
            warnings.warn(f"sdt_select: warmup_batches ended after {done} of {steps} steps", stacklevel=2)
        grads = {path: {k: m.delta.detach().clone() for k, m in mods.items() if not k.startswith("lora:")}
                 for path, mods in warm.items()}  # fmt: skip
    finally:
        # detach in reverse attachment order: chained parametrizations are a stack
        for mods in warm.values():
            for m in reversed(list(mods.values())):
                detach(m)
        for m, active, params in flags:
            m.active = active
            for p, rg in params:
                p.requires_grad_(rg)
        for m, mode in modes:
            m.training = mode

    out: dict[str, SDTSelection] = {}
    for t in targets:
        layout = layouts[t.path]
        k_c, k_s = layout.sizes(config)
        g = grads[t.path]
        if layout.mamba2:
            channels, states = select_heads_rows(g["A_log"], g["dt_bias"], g["in_proj.BC"], k_c, k_s)
        else:
            channels, states = select_dims(g["A_log"], k_c, k_s)
        out[t.path] = SDTSelection(channels, states, g)
        for m in sparse:
            if m.layer_path == t.path:
                m.set_selection(channels, states)
    with torch.no_grad():
        for m in loras:
            nn.init.kaiming_uniform_(m.lora_A, a=math.sqrt(5))
            m.lora_B.zero_()
    return out
