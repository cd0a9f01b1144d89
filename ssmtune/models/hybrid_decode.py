"""Graphed decoding for the transformers hybrids: ``generate(..., cuda_graph=True)`` on a swapped model.

Opt-in (``cuda_graph=None`` and ``False`` decode as before, eagerly through transformers' dynamic cache, unless
``GRAPHED_BY_DEFAULT``); its tokens were checked against the eager ones on an H100, its speed not yet timed.
transformers' ``generate`` still runs the loop (logits processors, sampling, EOS, ``min_new_tokens``,
left padding), with two changes:

- the cache is a transformers ``StaticCache`` of the batch and a power-of-two length, owned by a ``HybridDecoder``
  kept on the model (``decode.DECODERS_ATTR``; the ``KEPT_DECODERS`` most recently used) and ``reset()`` in place
  between calls, so its buffers keep their addresses. The hosted mixers update its conv / recurrent states in place (models/hybrid.py ``HostLayerCache``);
- the model's forward is swapped for the call: the prefill runs it as is; each one-token step copies its inputs
  (``input_ids``, ``position_ids``, the masks ``generate`` builds for a static cache) into static buffers and, on
  CUDA, replays a graph of the forward captured at the first step (warm-up on a side stream, the cache restored
  after); elsewhere the same static step runs eagerly, which is how the CPU tests check it.

The state offsets of the adapters (h', y', per row under ``adapter_names``) come from static buffers through the
machinery of the Mamba decoder (``decode.GraphedDecoder``: collected once per call, copied, never recaptured).
What cannot be replayed decodes eagerly, with a one-line warning naming the reason: a model transformers does not
mark as graph-safe (``_can_compile_fullgraph``: Falcon-H1, Zamba2), beam search, several sequences per prompt,
assisted decoding, a cache passed in, LoRA/DoRA rows mixed with other rows on CUDA, and a capture that fails (an
op that syncs with the host or allocates by data, e.g. MoE routing through ``nonzero``). A captured step then never
serves a token: the cache is restored and the step runs eagerly.

The forward is swapped on the model for the length of the call: one graphed ``generate`` at a time per model.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn

from .decode import (
    DECODERS_ATTR,
    GraphedDecoder,
    _Decoders,
    capture_failed,
    capture_graph,
    routed_lora_reason,
)
from .hooks import COLLECTOR_ATTR

# hybrid decoders kept per model. Each holds a StaticCache of its (batch, cache length) and, on CUDA, its graphs'
# memory. The Mamba decoders are bounded by their power-of-two batch buckets; a hybrid's batch is exact (transformers'
# generate prefills the cache with the caller's rows, no padding rows), so the least recently used are dropped instead
KEPT_DECODERS = 4
# generate(cuda_graph=None) on CUDA: graphed where the call can be replayed. Off until the graphed step has been timed
# against transformers' eager loop on a GPU (docs/serving.md)
GRAPHED_BY_DEFAULT = False
# generate arguments that keep a call on transformers' generate, eagerly, when set
_EAGER_ARGS = ("assistant_model", "prompt_lookup_num_tokens", "cache", "past_key_values", "inputs_embeds")


def _family(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__


def _routing(model: nn.Module):
    """The ``Routing`` attached to the model's adapters (``PeftModel.route``), or None: one walk, the state hooks
    included (they are submodules of their mixers)."""
    return next((m for m in (getattr(x, COLLECTOR_ATTR, None) for x in model.modules()) if hasattr(m, "names")), None)


def unsupported_reason(model: nn.Module, kwargs: dict, capture: bool, routing=None) -> str | None:
    """Why ``generate(**kwargs)`` on the swapped hybrid ``model`` cannot decode from static buffers (``capture``: from
    a captured graph; ``routing``: the model's ``Routing``, ``_routing``); None when it can."""
    family = _family(model)
    if not getattr(model, "_can_compile_fullgraph", False):
        return (f"{family}: transformers does not mark {type(model).__name__} as graph-safe "
                "(_can_compile_fullgraph=False)")  # fmt: skip
    config = kwargs.get("generation_config") or model.generation_config
    if (kwargs.get("num_beams") or config.num_beams or 1) > 1:
        return f"{family}: beam search stays on transformers' generate"
    if (kwargs.get("num_return_sequences") or config.num_return_sequences or 1) > 1:
        return f"{family}: several sequences per prompt (num_return_sequences)"
    if "forward" in model.__dict__:  # e.g. a compiled or hooked forward: the step would bypass it
        return f"{family}: the model's forward is replaced on the instance"
    given = [name for name in _EAGER_ARGS if kwargs.get(name) is not None]
    if given:
        return f"{family}: {given[0]} given"
    if kwargs.get("use_cache", config.use_cache) is False:
        return f"{family}: use_cache=False"
    if capture:
        reason = routed_lora_reason(model, routing)
        if reason is not None:
            return f"{family}: {reason}"
    return None


def _length(model: nn.Module, input_ids: torch.Tensor, kwargs: dict) -> int:
    """The cache length the call needs (prompt + new tokens), rounded up to a power of two so calls share decoders."""
    config = kwargs.get("generation_config") or model.generation_config
    new = kwargs.get("max_new_tokens", config.max_new_tokens)
    total = input_ids.shape[1] + new if new is not None else kwargs.get("max_length", config.max_length)
    return 1 << max(int(total) - 1, 15).bit_length()


class HybridDecoder(GraphedDecoder):
    """The one-token step of a swapped transformers hybrid on static buffers, for a batch of ``bucket`` rows (no
    padding rows: transformers' ``generate`` prefills the cache itself) and a ``StaticCache`` of ``length`` tokens.

    It keeps ``GraphedDecoder``'s offset buffers and their layouts, the model's watch, and its capture
    (``decode.capture_graph``); the cache, the step's inputs and the loop are transformers'. One graph per layout of
    the offset buffers and of the step's inputs, captured at the first step that needs it."""

    def __init__(self, model: nn.Module, batch: int, length: int, device, dtype, capture: bool) -> None:
        self.length = length
        self.forward = type(model).forward.__get__(model)  # the model's own forward, not the per-call swap
        self.served = 0  # steps run on the static buffers (replayed or eager)
        super().__init__(model, batch, device, dtype, capture)

    def _mixers(self) -> list[nn.Module]:
        from .hybrid import hybrid_mixers

        return [m for _, _, m in hybrid_mixers(self.lm)]

    def _fresh_buffers(self) -> None:
        from transformers import StaticCache

        self.cache = StaticCache(config=self.lm.config, max_cache_len=self.length)
        self._ready = False  # the cache holds this call's prefill (``_prefilled``)
        self.inputs: dict = {}  # input layout -> the static inputs of the step
        self.graphs: dict = {}  # (offset layout, input layout) -> (graph, output), or None: eager

    def begin(self, routing) -> None:
        """Per ``generate`` call, before the prefill: the cache emptied in place, the adapters' offsets loaded."""
        self.cache.reset()
        self._ready = False
        self.load_offsets(self.bucket, routing)

    def start(self, *args, **kwargs) -> None:
        raise TypeError("HybridDecoder serves transformers' generate: begin() per call, then step_call() per step")

    def reorder(self, index: torch.Tensor) -> None:
        raise TypeError("HybridDecoder does not reorder rows: beam search stays on transformers' generate")

    # --- per token --------------------------------------------------------------------------------------------------

    def serves(self, kwargs: dict) -> bool:
        """Whether a forward call is this decoder's step: one token per row, on its cache, after the prefill."""
        ids = kwargs.get("input_ids")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        return (
            cache is self.cache
            and isinstance(ids, torch.Tensor)
            and tuple(ids.shape) == (self.bucket, 1)
            and kwargs.get("inputs_embeds") is None
            and self._prefilled()
        )

    def _prefilled(self) -> bool:
        """Whether the cache holds the prefill; once true, true until ``begin`` resets the cache (checked once)."""
        if not self._ready:
            layers = [layer for layer in self.cache.layers if hasattr(layer, "has_previous_state")]
            self._ready = bool(layers) and all(layer.has_previous_state.get(0, False) for layer in layers)
        return self._ready

    def step_call(self, kwargs: dict):
        """The step for a forward call's ``kwargs``: inputs copied into static buffers, the graph replayed (on CUDA)
        or the forward run on them; returns the forward's output, its logits a static buffer."""
        layout = _layout(kwargs)
        if layout is None:  # an input the step cannot hold statically
            return self.forward(**kwargs)
        if layout not in self.inputs:
            self.inputs[layout] = _static(kwargs, self.cache)
        static = self.inputs[layout]
        _fill(static, kwargs)
        self.served += 1
        key = (self.layout, layout)
        with self._static_offsets():
            if key not in self.graphs:
                self.graphs[key] = self._capture_step(static) if self.capture else None
                self.captures += 1
            found = self.graphs[key]
            if found is None:
                return self.forward(**static)
        graph, out = found
        graph.replay()
        self.replays += 1
        return out

    def _capture_step(self, static: dict):
        """(graph, output) of the step on ``static``, or None (a warning said why) when it cannot be captured. The
        warm-up runs the step for real: the cache is put back as it was."""
        saved = [t.clone() for t in _cache_tensors(self.cache)]
        try:
            return capture_graph(functools.partial(self.forward, **static), self.device)
        except Exception as e:  # noqa: BLE001 - e.g. a host sync in the step: decode eagerly, all the same
            self.capture = False  # the same step would fail again: eager from now on, one warning
            capture_failed(e)
            return None
        finally:
            for dst, src in zip(_cache_tensors(self.cache), saved):
                dst.copy_(src)


def _cache_tensors(cache) -> list[torch.Tensor]:
    """Every tensor a step of ``cache`` writes: attention keys / values, conv and recurrent states, token counts."""
    out = []
    for layer in cache.layers:
        for name in ("keys", "values", "cumulative_length", "cumulative_length_linear"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                out.append(t)
        for states in (getattr(layer, "conv_states", {}), getattr(layer, "recurrent_states", {})):
            out.extend(t for t in states.values() if isinstance(t, torch.Tensor))
    return out


def _spec(value):
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device)
    if isinstance(value, dict):
        specs = tuple((k, _spec(v)) for k, v in sorted(value.items()))
        return None if any(s is None for _, s in specs) else ("dict", specs)
    if value is None or isinstance(value, (bool, int, float, str)):
        return ("value", value)
    return None


def _layout(kwargs: dict):
    """A hashable description of a step's inputs (shapes, dtypes, plain values), or None when one cannot be held in a
    static buffer."""
    out = []
    for k, v in sorted(kwargs.items()):
        spec = "cache" if k in ("cache", "past_key_values") else _spec(v)
        if spec is None:
            return None
        out.append((k, spec))
    return tuple(out)


def _static(kwargs: dict, cache) -> dict:
    """Static buffers shaped like the step's tensor inputs (a dict of masks gets one per entry)."""

    def copy(v):
        if isinstance(v, torch.Tensor):
            return torch.empty_like(v)
        if isinstance(v, dict):
            return {k: copy(x) for k, x in v.items()}
        return v

    return {k: cache if k in ("cache", "past_key_values") else copy(v) for k, v in kwargs.items()}


def _fill(static: dict, kwargs: dict) -> None:
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            static[k].copy_(v)
        elif isinstance(v, dict):
            _fill(static[k], v)


def decoder_for(model: nn.Module, batch: int, length: int, capture: bool) -> HybridDecoder:
    """The model's hybrid decoder for ``batch`` rows and a cache of ``length`` tokens, built on first use and kept;
    the least recently used beyond ``KEPT_DECODERS`` are dropped."""
    param = next(model.parameters())
    key = ("hybrid", batch, length, param.device, param.dtype, capture, torch.is_inference_mode_enabled())
    decoders = model.__dict__.setdefault(DECODERS_ATTR, _Decoders())
    decoder = decoders.pop(key, None)
    if decoder is None:
        kept = [k for k in decoders if k[0] == "hybrid"]  # oldest use first
        for old in kept[: max(len(kept) - KEPT_DECODERS + 1, 0)]:
            del decoders[old]  # before the new cache is allocated
        decoder = HybridDecoder(model, batch, length, param.device, param.dtype, capture)
    decoders[key] = decoder  # last: the most recently used
    return decoder


def _capturing(model: nn.Module) -> bool:
    """Whether the step is captured: on CUDA (elsewhere the static step runs eagerly)."""
    return next(model.parameters()).is_cuda


def generate(model: nn.Module, generate_fn, args: tuple, kwargs: dict):
    """transformers' ``generate_fn(*args, **kwargs)`` on the swapped hybrid ``model`` with its decode steps on static
    buffers (see the module docstring); eagerly, with a one-line warning, where that cannot run."""
    input_ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    capture = _capturing(model)
    routing = _routing(model)
    reason = unsupported_reason(model, kwargs, capture, routing)
    if reason is None and not isinstance(input_ids, torch.Tensor):
        reason = f"{_family(model)}: no input_ids tensor"
    if reason is not None:
        warnings.warn(f"graphed decoding off, decoding eagerly: {reason}", stacklevel=3)
        return generate_fn(*args, **kwargs)
    if routing is not None and len(routing) != input_ids.shape[0]:
        routing = None  # not this call's rows (a route left open elsewhere): the forwards route as they find
    decoder = decoder_for(model, input_ids.shape[0], _length(model, input_ids, kwargs), capture)
    decoder.begin(routing)

    @functools.wraps(decoder.forward)
    def forward(*a, **kw):
        if not a and decoder.serves(kw):
            return decoder.step_call(kw)
        return decoder.forward(*a, **kw)

    # the instance attribute shadows the class's forward for this call only (transformers reads its signature)
    model.forward = forward
    try:
        return generate_fn(*args, **{**kwargs, "cache": decoder.cache, "disable_compile": True})
    finally:
        del model.forward


def graph_by_default(model: nn.Module, kwargs: dict) -> bool:
    """``cuda_graph=None``: graphed when ``GRAPHED_BY_DEFAULT`` is on, the model is on CUDA and the call can be
    replayed (``unsupported_reason``); otherwise transformers' eager loop, without a warning (nothing was asked)."""
    if not (GRAPHED_BY_DEFAULT and _capturing(model)):
        return False
    return unsupported_reason(model, kwargs, True, _routing(model)) is None


def refuse_state_dtype(state_dtype: torch.dtype | None) -> None:
    """A hybrid's states live in transformers' cache, in the model's dtype: ``state_dtype`` (ssmtune's Mamba models'
    decode state dtype) is refused rather than ignored."""
    if state_dtype is not None:
        raise ValueError(f"state_dtype={state_dtype!r} is not supported on a transformers hybrid "
                         "(transformers' cache keeps its states)")  # fmt: skip


class GenerateWithGraph:
    """``generate`` of a swapped hybrid (``from_transformers`` sets it on the model): transformers' ``generate``, plus
    ``cuda_graph``: None (the default, for now) or False decode as transformers does; True decodes through a
    ``HybridDecoder`` (``generate`` above)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, *args, cuda_graph: bool | None = None, state_dtype: torch.dtype | None = None, **kwargs):
        if cuda_graph not in (None, True, False):
            raise ValueError(f"cuda_graph must be None, True or False, got {cuda_graph!r}")
        refuse_state_dtype(state_dtype)
        plain = type(self.model).generate.__get__(self.model)
        if cuda_graph is None:
            cuda_graph = graph_by_default(self.model, kwargs)
        if not cuda_graph:
            return plain(*args, **kwargs)
        return generate(self.model, plain, args, kwargs)

    def __deepcopy__(self, memo: dict) -> GenerateWithGraph:
        # the copy of the model (deepcopy registers it before copying its attributes), not the original
        return GenerateWithGraph(memo.get(id(self.model), self.model))

    def __reduce__(self):
        return GenerateWithGraph, (self.model,)
