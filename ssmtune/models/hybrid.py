"""Hybrid transformers models (Falcon-H1, Nemotron-H, Granite-4.0-H, Bamba, Zamba2) with ssmtune's SSD mixer.

``from_transformers(model)`` replaces every supported recurrent mixer of a transformers model, in place, with a
``HostedSSDMixer``: ssmtune's ``Mamba2Mixer`` (fused SSD kernels, initial state h0, state offset h', output offset y',
conv state, per-row routing through state hooks) built around the host mixer's own parameters (shared by reference,
not copied), called with the host layer's signature. Attention, MLP / MoE, norms, rotary embeddings, the cache and
``generate`` stay transformers'.

The mixer reads and writes its states through the public cache API of transformers (``get_conv_state``,
``update_conv_state``, ``get_recurrent_state``, ``update_recurrent_state``; ``increase_count`` where it exists).
The cache always holds the un-offset state: h' and y' act on the read-out only. Padded positions
(``attention_mask == 0``) take a zero step, so h0 acts at each row's first real token under left padding, and an
initial conv window sits right before it.

``MIXER_BUILDERS`` maps a transformers mixer class name to the builder of ours; a new family with an SSD mixer is one
row there plus its tiny-config test.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .cache import LayerCache
from .mamba2 import Mamba2Mixer, RMSNormGated

# transformers releases the builders and the cache adapter were tested against (pyproject's ``hf`` extra)
TESTED_TRANSFORMERS = ">=5.23,<5.26"

# model_type -> the transformers class of its recurrent mixer
HYBRID_MODEL_TYPES: dict[str, str] = {
    "falcon_h1": "FalconH1Mixer",
    "nemotron_h": "NemotronHMamba2Mixer",
    "granitemoehybrid": "GraniteMoeHybridMambaLayer",
    "bamba": "BambaMixer",
    "zamba2": "Zamba2MambaMixer",
}

# what every SSD builder reads from the host mixer
SSD_ATTRIBUTES = (
    "in_proj", "conv1d", "dt_bias", "A_log", "D", "norm", "out_proj", "num_heads", "head_dim", "n_groups",
    "ssm_state_size", "intermediate_size", "chunk_size", "layer_idx", "time_step_limit", "activation",
)  # fmt: skip
FALCON_H1_ATTRIBUTES = ("mup_vector", "ssm_in_multiplier", "mamba_rms_norm")
# the host forward's parameters our mixer accepts (the cache under either of its names)
FORWARD_PARAMETERS = ("hidden_states", "attention_mask")
CACHE_METHODS = ("get_conv_state", "update_conv_state", "get_recurrent_state", "update_recurrent_state",
                 "is_recording_past")  # fmt: skip
# keyword arguments of packed (padding-free) batches: the mixer cannot honour them
_PACKED_KWARGS = ("seq_idx", "cu_seq_lens_q", "cu_seq_lens_k", "cu_seqlens")


def host_cache(mixer: nn.Module, cache, cache_params, attention_mask: torch.Tensor | None, kwargs: dict):
    """The checks every hosted mixer makes on the host layer's call, and its cache as a ``LayerCache``: transformers'
    cache (``cache`` or ``cache_params``) behind ``HostLayerCache``; packed-sequence arguments and masks other than a
    2D padding mask are refused."""
    packed = [k for k in _PACKED_KWARGS if kwargs.get(k) is not None]
    if packed:
        raise ValueError(f"{mixer.family}: packed sequences ({packed}) are not supported by ssmtune's mixer")
    cache = cache if cache is not None else cache_params
    if cache is not None and not isinstance(cache, LayerCache):
        cache = HostLayerCache(cache, mixer.layer_idx, mixer.conv1d.weight.shape[-1])
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"{mixer.family}: the mixer takes a 2D padding mask, got shape {tuple(attention_mask.shape)}")
    return cache


def _in_tested_range(version: str) -> bool:
    import re

    found = re.match(r"(\d+)\.(\d+)", version)
    return found is not None and (5, 23) <= (int(found[1]), int(found[2])) < (5, 26)


def _family(host: nn.Module) -> str:
    cls = type(host).__name__
    return next((t for t, c in HYBRID_MODEL_TYPES.items() if c == cls), cls)


def _version() -> str:
    try:
        import transformers
    except ImportError:  # pragma: no cover - the host model comes from transformers
        return "?"
    return transformers.__version__


def check_contract(host: nn.Module, attributes: tuple[str, ...] = SSD_ATTRIBUTES) -> None:
    """ValueError naming the family and the attribute when the host mixer lacks what the builder reads, or its
    forward no longer takes ``hidden_states``, ``attention_mask`` and the cache."""
    cls = type(host).__name__
    where = f"{_family(host)} ({cls}, transformers {_version()}; tested {TESTED_TRANSFORMERS})"
    for name in attributes:
        if not hasattr(host, name):
            raise ValueError(f"{where}: the mixer has no attribute {name!r}, which ssmtune's builder reads")
    params = inspect.signature(type(host).forward).parameters
    missing = [p for p in FORWARD_PARAMETERS if p not in params]
    if not ("cache" in params or "cache_params" in params):
        missing.append("cache")
    if missing:
        raise ValueError(f"{where}: the mixer's forward no longer takes {missing} (it takes {list(params)[1:]})")


class HostLayerCache:
    """``LayerCache``'s interface over layer ``layer_idx`` of a transformers cache, through its public API.

    transformers keeps the last K conv inputs, the mixer the last K-1: ``conv_state`` is a view of the cache's window
    without its oldest column, which the decode step rolls in place (as transformers' own step does).
    """

    def __init__(self, cache, layer_idx: int, kernel_size: int) -> None:
        missing = [m for m in CACHE_METHODS if not hasattr(cache, m)]
        if missing:
            raise ValueError(
                f"{type(cache).__name__} lacks {missing}: ssmtune's hybrid mixers need transformers "
                f"{TESTED_TRANSFORMERS} (found {_version()})"
            )
        if cache.is_recording_past(layer_idx):
            raise ValueError(
                "ssmtune's hybrid mixers do not record past states (assisted decoding); use plain generate"
            )
        self.cache = cache
        self.layer_idx = layer_idx
        self.kernel_size = kernel_size
        window = cache.get_conv_state(layer_idx)  # [B, C, K] or None before the first forward
        self.fresh = window is None
        self.conv_state = None if window is None else window[..., 1:]
        self.ssm_state = None if window is None else cache.get_recurrent_state(layer_idx)
        self._stored: tuple[torch.Tensor, torch.Tensor] | None = None

    def store(self, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> None:
        self._stored = (conv_state, ssm_state)

    @property
    def seqlen_offset(self) -> int:
        return 0

    @seqlen_offset.setter
    def seqlen_offset(self, seqlen: int) -> None:
        """The mixer advances the cache by ``seqlen`` tokens last; the states are written here."""
        if self._stored is None:  # a decode step: the states were updated in place
            count = getattr(
                self.cache, "increase_count", None
            )  # transformers >= 5.25 counts the tokens of linear layers
            if count is not None:
                count(self.layer_idx, 0)
            return
        conv_last, h_last = self._stored
        batch, channels, _ = conv_last.shape
        # the cache counts the conv inputs it is given (the token count of linear layers), then keeps the last K;
        # a zero view of the right length counts them without a copy, and the true window is written after
        counter = conv_last.new_zeros(()).expand(batch, channels, seqlen)
        self.cache.update_conv_state(counter, self.layer_idx, conv_kernel_size=self.kernel_size)
        self.cache.get_conv_state(self.layer_idx)[..., 1:].copy_(conv_last)
        self.cache.update_recurrent_state(h_last, self.layer_idx)


class HostedSSDMixer(Mamba2Mixer):
    """ssmtune's Mamba-2 mixer around a transformers SSD mixer's parameters, with the host's call signature:
    ``forward(hidden_states, cache=None, attention_mask=None, **kwargs)``.

    ``cache`` is the transformers cache (or an ssmtune ``LayerCache``, as Prefix-Tuning passes). Parameter names stay
    the host's (``in_proj``, ``conv1d``, ``dt_bias``, ``A_log``, ``D``, ``norm``, ``out_proj``), so checkpoints and
    ``save_pretrained`` keep their keys.
    """

    def __init__(self, host: nn.Module) -> None:
        nn.Module.__init__(self)
        check_contract(host)
        family = _family(host)
        if host.activation not in ("silu", "swish"):
            raise ValueError(f"{family}: conv activation {host.activation!r} is not supported (only 'silu')")
        if host.D.dim() != 1:
            raise ValueError(f"{family}: D of shape {tuple(host.D.shape)} is not supported (one value per head)")
        self.family = family
        self.layer_idx = host.layer_idx
        self.d_inner = host.intermediate_size
        self.ngroups = host.n_groups
        self.headdim = host.head_dim
        self.chunk_size = host.chunk_size
        lo, hi = host.time_step_limit if host.time_step_limit is not None else (0.0, float("inf"))
        self.dt_limit = None if (lo, hi) == (0.0, float("inf")) else (float(lo), float(hi))
        # the host's parameters, by reference
        self.in_proj = host.in_proj
        self.conv1d = host.conv1d
        self.dt_bias = host.dt_bias
        self.A_log = host.A_log
        self.D = host.D
        self.norm = self._gated_norm(host)
        self.out_proj = host.out_proj
        self.state_hooks = nn.ModuleDict()
        self.backend = "auto"
        shapes = (self.nheads * self.headdim, self.d_inner, self.conv_dim)
        want = (self.d_inner, self.d_inner, self.d_inner + 2 * self.ngroups * host.ssm_state_size)
        if shapes != want:
            raise ValueError(f"{family}: mixer shapes (heads*head_dim, D, conv channels) {shapes} != expected {want}")
        # the block's pre-norm, for Prefix-Tuning's pass over virtual tokens (a plain reference: the block owns it)
        object.__setattr__(self, "host_norm", None)

    def _gated_norm(self, host: nn.Module) -> nn.Module | None:
        norm = host.norm
        if not hasattr(norm, "weight"):
            return None
        group = getattr(norm, "group_size", None) or self.d_inner // self.ngroups
        ours = RMSNormGated(self.d_inner, group_size=group, eps=norm.variance_epsilon)
        ours.weight = norm.weight
        return ours

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache=None,
        attention_mask: torch.Tensor | None = None,
        *,
        use_state_hooks: bool = True,
        cache_params=None,
        **kwargs,
    ) -> torch.Tensor:
        cache = host_cache(self, cache, cache_params, attention_mask, kwargs)
        return super().forward(hidden_states, cache, use_state_hooks=use_state_hooks, attention_mask=attention_mask)

    def scan_dt(
        self, dt: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        if self.dt_limit is None:
            return super().scan_dt(dt, attention_mask)
        # transformers clamps the step of its chunked scan (not of its decode step); here both clamp, so decoding
        # equals the full forward. Done outside the kernel, which then takes the final step size.
        step = F.softplus(dt.float() + self.dt_bias.float()).clamp(*self.dt_limit)
        if attention_mask is not None:
            step = step.masked_fill(attention_mask[:, -dt.shape[1] :, None] == 0, 0.0)
        return step, None, False

    def extra_repr(self) -> str:
        return f"{self.family}, layer_idx={self.layer_idx}, state_shape={self.state_shape}"


class FalconH1SSDMixer(HostedSSDMixer):
    """Falcon-H1: the input times ``ssm_in_multiplier``, the projection times ``mup_vector``; the gated norm is
    optional and may normalise before the gate (``mamba_rms_norm``, ``norm_before_gate``)."""

    def __init__(self, host: nn.Module) -> None:
        super().__init__(host)
        check_contract(host, FALCON_H1_ATTRIBUTES)
        self.ssm_in_multiplier = float(host.ssm_in_multiplier)
        self.register_buffer("mup_vector", host.mup_vector, persistent=False)
        self.norm_before_gate = bool(getattr(host.norm, "norm_before_gate", False)) if host.mamba_rms_norm else False
        if not host.mamba_rms_norm:
            self.norm = None

    def project(self, u: torch.Tensor) -> torch.Tensor:
        return self.in_proj(u * self.ssm_in_multiplier) * self.mup_vector

    def gate_norm(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if self.norm is None:
            return SiluGate.apply(y, z, False)
        if not self.norm_before_gate:
            return self.norm(y, z)
        n = self.norm
        normed = ops.rms_norm(y, n.weight, eps=n.eps, group_size=n.group_size, backend=n.backend)
        return SiluGate.apply(normed, z, True)


class SiluGate(torch.autograd.Function):
    """y · silu(z) (in fp32 and rounded to y's dtype when ``upcast``), keeping y and z for the backward, where autograd
    would keep silu(z) (and fp32 copies of both when upcast): z is a view of the in_proj output, kept anyway when it
    takes a gradient. Without one (the first mixer of a state adapter) it keeps what autograd keeps, silu(z). The
    gradients are autograd's, bit for bit (silu(z) is recomputed from the same view)."""

    @staticmethod
    def forward(ctx, y, z, upcast):
        zc = z.float() if upcast else z
        s = F.silu(zc)
        out = (y.float() * s).to(y.dtype) if upcast else y * s
        if ctx.needs_input_grad[1]:
            ctx.save_for_backward(y, z)
        else:  # only dy = g · silu(z): not the whole in_proj output behind the view
            ctx.save_for_backward(None, s)
        ctx.upcast, ctx.y_dtype = upcast, y.dtype
        return out

    @staticmethod
    def backward(ctx, g):
        y, t = ctx.saved_tensors
        need_y, need_z = ctx.needs_input_grad[:2]
        if ctx.upcast:  # the cast back to y's dtype hands the product an fp32 gradient
            g = g.float()
        zc = s = t
        if need_z:
            zc = t.float() if ctx.upcast else t
            s = F.silu(zc)
        dy = (g * s).to(ctx.y_dtype) if need_y else None
        dz = None
        if need_z:
            yc = y.float() if ctx.upcast else y
            dz = torch.ops.aten.silu_backward((g * yc).to(zc.dtype), zc).to(t.dtype)
        return dy, dz, None


MIXER_BUILDERS: dict[str, Callable[[nn.Module], HostedSSDMixer]] = {
    "FalconH1Mixer": FalconH1SSDMixer,
    "NemotronHMamba2Mixer": HostedSSDMixer,
    "GraniteMoeHybridMambaLayer": HostedSSDMixer,
    "BambaMixer": HostedSSDMixer,
    "Zamba2MambaMixer": HostedSSDMixer,
}


# the block's norm in front of the mixer, by the attribute name the decoder layers use
_PRE_NORMS = ("input_layernorm", "norm")


def _hosted() -> tuple[type, ...]:
    from .gated_delta import HostedGDNMixer

    return (HostedSSDMixer, HostedGDNMixer)


def _supported() -> str:
    return f"model types {sorted(HYBRID_MODEL_TYPES)} (mixers {sorted(MIXER_BUILDERS)})"


def _looks_recurrent(module: nn.Module) -> bool:
    return hasattr(module, "A_log") and hasattr(module, "conv1d")


def from_transformers(model: nn.Module) -> nn.Module:
    """Swap every supported recurrent mixer of a transformers model for ssmtune's, in place; returns the model.

    The new mixers share the host's parameters (no copy). Raises ValueError, listing what is supported, when the
    model has no supported mixer or an unsupported recurrent one. Calling it twice is harmless.

    Example::

        model = ssmtune.from_transformers(AutoModelForCausalLM.from_pretrained("tiiuae/Falcon-H1-0.5B-Base"))
        peft = ssmtune.get_peft_model(model, ssmtune.StateOffsetConfig())
        out = peft.generate(input_ids, max_new_tokens=32)  # transformers' generate and cache, h' active
    """
    swaps, unsupported = [], []
    for name, module in model.named_modules():
        if isinstance(module, _hosted()):
            continue
        builder = MIXER_BUILDERS.get(type(module).__name__)
        if builder is not None:
            swaps.append((name, module, builder))
        elif _looks_recurrent(module):
            unsupported.append(type(module).__name__)
    if unsupported:
        raise ValueError(
            f"unsupported recurrent mixers {sorted(set(unsupported))}; ssmtune supports {_supported()} (load "
            "mamba / mamba2 checkpoints with ssmtune.load_model)"
        )
    if not swaps and not hybrid_mixers(model):
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ValueError(f"model type {model_type!r} has no supported recurrent mixer; ssmtune supports {_supported()}")
    if swaps and not _in_tested_range(_version()):
        warnings.warn(
            f"ssmtune's hybrid mixers are tested with transformers{TESTED_TRANSFORMERS}, found {_version()}: the "
            "contract checks still run, and decoding with a cache needs transformers' linear-attention cache API",
            stacklevel=2,
        )
    modules = dict(model.named_modules())
    for name, host, builder in swaps:
        parent_name, _, attr = name.rpartition(".")
        parent = modules[parent_name]
        mixer = builder(host)
        norm = next((getattr(parent, n) for n in _PRE_NORMS if isinstance(getattr(parent, n, None), nn.Module)), None)
        object.__setattr__(mixer, "host_norm", norm)
        mixer.train(host.training)
        setattr(parent, attr, mixer)
    if hasattr(type(model), "generate") and "generate" not in model.__dict__:
        from .hybrid_decode import GenerateWithGraph

        model.generate = GenerateWithGraph(model)  # generate(..., cuda_graph=True): models/hybrid_decode.py
    return model


def swap_if_hybrid(model: nn.Module) -> nn.Module:
    """``from_transformers(model)`` when the model holds a mixer of ``MIXER_BUILDERS``; otherwise the model as is."""
    if any(type(m).__name__ in MIXER_BUILDERS for m in model.modules()):
        from_transformers(model)
    return model


def hybrid_mixers(model: nn.Module) -> list[tuple[int, str, HostedSSDMixer]]:
    """(layer index, module path, mixer) of every swapped mixer, in layer order."""
    found = [(m.layer_idx, name, m) for name, m in model.named_modules() if isinstance(m, _hosted())]
    return sorted(found, key=lambda t: t[0])


def is_hybrid(model: nn.Module) -> bool:
    return not hasattr(model, "mixers") and bool(hybrid_mixers(model))


@dataclass
class HostBlock:
    """What Prefix-Tuning reads of a block: the norm in front of the mixer, and the mixer."""

    norm: nn.Module
    mixer: HostedSSDMixer

    @property
    def training(self) -> bool:
        return self.mixer.training


def host_block(model: nn.Module, layer: int) -> HostBlock:
    mixer = next((m for i, _, m in hybrid_mixers(model) if i == layer), None)
    if mixer is None or mixer.host_norm is None:
        raise ValueError(f"layer {layer} has no recurrent mixer with a pre-norm in {type(model).__name__}")
    return HostBlock(mixer.host_norm, mixer)


def get_backend(model: nn.Module) -> str:
    backends = {m.backend for _, _, m in hybrid_mixers(model)}
    return backends.pop() if len(backends) == 1 else "mixed"


def set_backend(model: nn.Module, value: str) -> None:
    """The scan / conv / gated-norm backend of every swapped mixer (``ssmtune.ops.BACKENDS``)."""
    if value not in ops.BACKENDS:
        raise ValueError(f"backend must be one of {ops.BACKENDS}, got {value!r}")
    for _, _, mixer in hybrid_mixers(model):
        mixer.backend = value
        if isinstance(getattr(mixer, "norm", None), RMSNormGated):
            mixer.norm.backend = value


def generate_routed(model: nn.Module, routing, *args, **kwargs):
    """transformers' ``generate`` under a per-row routing (``PeftModel.generate(adapter_names=...)``).

    ``generate`` expands each row into its beams (or samples) next to each other before the first forward, so a
    forward of B·K rows routes row r to ``adapter_names[r // K]``.
    """

    selected: list = []

    def enter(module, args, kwargs):
        x = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        if x is None and args:
            x = args[0]
        n, b = len(routing), x.shape[0]
        if b % n != 0:
            raise ValueError(f"generate: a batch of {b} rows cannot follow {n} routed rows (adapter_names)")
        block = routing.select(None if b == n else torch.arange(n).repeat_interleave(b // n))
        block.__enter__()
        selected.append(block)

    def leave(module, args, kwargs, output):
        selected.pop().__exit__(None, None, None)

    handles = [
        model.register_forward_pre_hook(enter, with_kwargs=True),
        model.register_forward_hook(leave, with_kwargs=True),
    ]
    try:
        return model.generate(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
        while selected:  # a forward that raised
            selected.pop().__exit__(None, None, None)


def load_hybrid(folder, *, dtype: torch.dtype | None = None, device=None, tokenizer=None) -> nn.Module:
    """transformers' ``AutoModelForCausalLM.from_pretrained(folder)`` with ssmtune's mixers, in eval mode.

    ``dtype`` defaults to fp32; ``model.tokenizer`` is set to ``tokenizer`` (ssmtune's tokenizer interface). Plain
    forwards build no transformers cache unless called with ``use_cache=True`` (``generate`` still caches)."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise ValueError(f"{str(folder)!r} is a transformers hybrid model: pip install 'ssmtune[hf]'") from e
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype or torch.float32)
    if device is not None:
        model = model.to(device)
    from_transformers(model)
    # plain forwards (training, scoring) build no cache unless asked; generate keeps its own use_cache setting
    model.config.use_cache = False
    model.tokenizer = tokenizer
    return model.eval()


# the Gated DeltaNet / KDA hybrids build on this module's cache adapter and add their rows to the tables above
from . import gated_delta  # noqa: F401
