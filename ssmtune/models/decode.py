"""Graphed decoding: the one-token step on static buffers, captured once per batch-size bucket and replayed.

A decode step of a small Mamba is host-bound: a few hundred small kernels, each queued by Python. ``GraphedDecoder``
owns every tensor the step touches, at fixed addresses:

- ``ids`` [bucket]: the next token of each row (rows past the batch are padding, token 0);
- ``cache``: an ``InferenceCache`` of ``bucket`` rows, filled from the prefill and updated in place by the step;
- per mixer, the state offsets h' / y' that its state hooks contribute to the step (``MergedState.h_off`` /
  ``y_off``), computed once per ``generate`` call (under a routing: one row per batch row) and copied into static
  buffers, so a new adapter mix per row only copies, it never recaptures. Per-row offsets of the mixers that set
  ``reads_offset_index`` (Mamba, Mamba-2) are kept as a table of the distinct rows' offsets (one entry per adapter
  in the batch) plus ``offset_index`` [bucket] (int32, row -> entry, ``MergedState.offset_index``): rows that share
  an adapter read the same memory, rather than a copy each. Other mixers get one offset row per batch row;
- ``logits`` [bucket, V]: the graph's output.

On CUDA the step is captured as a CUDA graph (``capture=True``); elsewhere the same object runs the step eagerly, so
the buffer logic (bucket padding, routing buffers, in-place beam reorder) is tested on the CPU too. Captured graphs
are kept on the model per (bucket, device, dtype, state dtype), one per layout of the offset buffers, and reused
while the model's modules, parameters (addresses, shapes), the LoRA modules' ``active`` / ``merged`` flags and the
backends stay the same; otherwise the next ``generate`` captures again. That is checked at every ``start`` against a
snapshot (``_Watch``) without walking the model; the walk runs again only when the snapshot sees a change. A capture
that fails warns and leaves the step eager.

The transformers hybrids decode through ``hybrid_decode.HybridDecoder``, a subclass that keeps the offset buffers,
the watch and the capture (``capture_graph``) of this one around transformers' ``StaticCache``.

Routed LoRA/DoRA (LoRA rows mixed with other rows) picks its rows on the host each step, so it cannot be replayed:
``unsupported_reason`` says why and ``generate`` then decodes eagerly. Sampling, beam bookkeeping and stopping stay outside
the graph, on the logits it returns.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .cache import InferenceCache
from .hooks import ADAPTER_ATTR, COLLECTOR_ATTR, MergedState, StateHook, collect_state

# What ``cuda_graph=None`` means on CUDA: the graphed decoder where the model supports it (checked against the eager
# step token for token by tests/models/test_graphed_decode.py, -m gpu); ``cuda_graph=False`` turns it off per call.
GRAPHED_BY_DEFAULT = True
DECODERS_ATTR = "_ssmtune_decoders"  # model attribute: {(bucket, device, dtype, state dtype, ...): GraphedDecoder}


def bucket_size(batch: int) -> int:
    """The smallest power of two >= ``batch``: 1, 2, 4, 8, 16, 32, 64, ..."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    return 1 << (batch - 1).bit_length()


def unwrap(model) -> tuple[nn.Module, object | None]:
    """(the LM, its Routing or None) for a plain LM or a ``core.routing.RoutedLM``."""
    routing = getattr(model, "routing", None) if not isinstance(model, nn.Module) else None
    return (model.model, routing) if routing is not None else (model, None)


def unsupported_reason(model, capture: bool = True) -> str | None:
    """Why ``model`` cannot decode on static buffers (``capture``: from a captured graph); None when it can."""
    lm, routing = unwrap(model)
    if not hasattr(lm, "allocate_cache"):
        return f"{type(lm).__name__} has no static inference cache"
    return routed_lora_reason(lm, routing) if capture else None


def routed_lora_reason(lm: nn.Module, routing) -> str | None:
    """Why a captured step cannot serve ``routing`` on ``lm``: LoRA/DoRA with rows in a mixed batch gathers them on the
    host (``Routing.rows_of``), which a replay cannot repeat. A LoRA adapter with no rows here is a no-op in the step,
    and a batch that brings its rows in is refused here. None when the routing is replayable."""
    if routing is None or len(set(routing.names)) <= 1:
        return None
    names = set(routing.names)
    for m in lm.modules():
        lora = hasattr(m, "lora_A") and getattr(m, ADAPTER_ATTR, None) in names
        if lora and getattr(m, COLLECTOR_ATTR, None) is routing:
            return "LoRA/DoRA rows mixed with other rows select their rows on the host"
    return None


def _table(keys: list) -> tuple[list[int], list[int]]:
    """(the first row of each distinct key, in order of first appearance; each row's entry among those)."""
    first: dict = {}
    for row, key in enumerate(keys):
        first.setdefault(key, row)
    entry = {key: i for i, key in enumerate(first)}
    return list(first.values()), [entry[key] for key in keys]


class _StaticCollector:
    """A state collector (``models/hooks.py``) that hands the mixer the decoder's static offset buffers."""

    def __init__(self, merged: MergedState) -> None:
        self.merged = merged

    def collect_state(self, hooks, batch_size: int, *, initial: bool = True) -> MergedState:
        return self.merged


_FLAGS = ("active", "merged", "backend")


def _flag_defaults(cls: type) -> tuple:
    """The class defaults of ``_FLAGS`` (None where unset). A property (the LM's ``backend``) counts as None: its value
    comes from its modules' own flags (each mixer's ``backend``), which are read, and reading it would walk them."""
    found = (getattr(cls, a, None) for a in _FLAGS)
    return tuple(None if hasattr(type(v), "__get__") else v for v in found)


class _Watch:
    """A snapshot of what a captured step depends on besides its buffers, checked again without walking the model:
    ``unchanged()`` is True only when every module found is still alive and has the same children (names and
    objects), the same parameters (names, addresses, shapes, dtypes: adapters added, deleted or replaced), the same
    ``training`` (dropout) and the same ``active`` / ``merged`` / ``backend`` flags (LoRA, the backends). State hooks'
    flags are left out: the step reads their offsets from the static buffers, so another mix of adapters is a copy.
    It sees edits made behind ssmtune's back too (``.to()`` and back, ``.train()``, ``p.data = ...``, a module swapped
    or deleted). Modules are held weakly: a deleted adapter is not kept alive by a decoder."""

    def __init__(self, lm: nn.Module) -> None:
        mods = list(lm.modules())
        self.refs = [weakref.ref(m) for m in mods]
        # per module, the class defaults of its flags, read from its __dict__ (fast); None: left out (state hooks)
        self.reads = [None if isinstance(m, StateHook) else _flag_defaults(type(m)) for m in mods]
        self.state = self._probe(mods)

    def _probe(self, mods: list[nn.Module]) -> tuple:
        # children by id: every child was among the modules found, which are all alive when this runs, so an equal id
        # is the same object
        kids = [(k, id(c)) for m in mods for k, c in m._modules.items()]
        params = [
            (k, None) if p is None else (k, p.data_ptr(), p.shape, p.dtype)
            for m in mods
            for k, p in m._parameters.items()
        ]
        flags = [
            None if read is None else (m.training, *map(m.__dict__.get, _FLAGS, read))
            for m, read in zip(mods, self.reads)
        ]
        return kids, params, flags

    def unchanged(self) -> bool:
        mods = [r() for r in self.refs]
        return all(m is not None for m in mods) and self._probe(mods) == self.state


@dataclass
class _Step:
    """The step for one layout of the offset buffers: the buffers, and on CUDA its graph and output."""

    offsets: list[MergedState] = field(default_factory=list)
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None


class GraphedDecoder:
    """The decode step of ``lm`` for up to ``bucket`` rows on static buffers (see the module docstring)."""

    def __init__(
        self,
        lm: nn.Module,
        bucket: int,
        device: torch.device,
        dtype: torch.dtype,
        capture: bool,
        state_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.lm, self.bucket, self.device, self.dtype, self.capture = lm, bucket, device, dtype, capture
        self.state_dtype = state_dtype  # of the static cache's SSM states: the captured step reads and writes them
        self.mixers = self._mixers()
        self._fresh_buffers()
        self.ids = torch.zeros(bucket, dtype=torch.long, device=device)
        # row -> entry of the per-row offset tables (shared by every mixer that reads through it); pad rows read entry 0
        self.offset_index = torch.zeros(bucket, dtype=torch.int32, device=device)
        # one step per layout of the offset buffers (which fields are set, per row or shared, dtypes); all are dropped
        # when the model changes
        self.steps: dict[tuple, _Step] = {}
        self.current = _Step([MergedState() for _ in self.mixers])
        self.watch: _Watch | None = None  # tells start() when the model changed
        self.batch = 0
        self.routing = None
        self.rows: torch.Tensor | None = None
        self.replays = 0  # graph replays
        self.captures = 0  # steps built: captured on CUDA (on other devices, the captures that CUDA would make)

    @property
    def offsets(self) -> list[MergedState]:
        """Per mixer, the static h' / y' buffers the step reads."""
        return self.current.offsets

    @property
    def graph(self) -> torch.cuda.CUDAGraph | None:
        return self.current.graph

    # --- per generate call ------------------------------------------------------------------------------------------

    def start(self, cache: InferenceCache, routing=None, rows: torch.Tensor | None = None) -> None:
        """Load a prefilled ``cache`` of B <= bucket rows and the adapters' offsets for these rows (``rows``: the
        routed row of each cache row, e.g. beams; None: one cache row per routed row)."""
        batch = cache.batch_size
        if batch is None or batch > self.bucket:
            raise ValueError(f"cache batch {batch} does not fit the decoder's bucket of {self.bucket} rows")
        if cache.state_dtype != self.state_dtype:
            raise ValueError(f"cache states are {cache.state_dtype}, the decoder's are {self.state_dtype}")
        if self.load_offsets(batch, routing, rows):
            if self.capture:
                try:
                    self._capture()
                except Exception as e:  # noqa: BLE001 - an op that cannot be captured: decode, eagerly, all the same
                    self.capture, self.current.graph = False, None
                    capture_failed(e)
            self.captures += 1
        self.ids.zero_()
        for static, layer in zip(self.cache.layers, cache.layers):
            static.conv_state.zero_()
            static.ssm_state.zero_()
            static.conv_state[:batch].copy_(layer.conv_state)
            static.ssm_state[:batch].copy_(layer.ssm_state)
        self.cache.seqlen_offset = max(cache.seqlen_offset, 1)

    def load_offsets(self, batch: int, routing=None, rows: torch.Tensor | None = None) -> bool:
        """Copy the adapters' offsets for ``batch`` rows into the static buffers of their layout (``rows``: as in
        ``start``); True when that layout has no step yet (it must be built). A model that changed (``_Watch``) drops
        its steps and gets fresh buffers (``_fresh_buffers``)."""
        self.batch, self.routing = batch, routing
        pad = self.bucket - batch
        self.rows = None
        # the routing indexes its slot table (on the CPU) with these rows: beam search passes them on the device
        rows = None if rows is None else rows.cpu()
        if routing is not None:
            base = torch.arange(len(routing)) if rows is None else rows
            # pad rows follow row 0's adapter: their logits are never read
            self.rows = torch.cat([base, base[:1].expand(pad)]) if pad else base
        offsets, keys = self._collect(batch, routing, rows)
        layout = tuple(self._layout(mixer, st) for mixer, st in zip(self.mixers, offsets))
        # the check is cheap (the engine starts a decoder whenever its rows change); the model is walked again only
        # after a change
        if self.watch is None or not self.watch.unchanged():
            # the state shapes may have changed too (Additional-scan extends N): fresh buffers
            self.steps = {}
            self._fresh_buffers()
            self.watch = _Watch(self.lm)
        self.layout = layout
        new = layout not in self.steps
        if new:
            self.steps[layout] = _Step([self._buffers(m, entry) for m, entry in zip(self.mixers, layout)])
        self.current = self.steps[layout]
        firsts, index = _table(keys)
        self.offset_index.copy_(torch.tensor(index + [0] * pad, dtype=torch.int32))
        firsts = torch.tensor(firsts, device=self.device)
        for st, buf, entry in zip(offsets, self.offsets, layout):
            for src, dst, e in ((st.h_off, buf.h_off, entry[0]), (st.y_off, buf.y_off, entry[1])):
                if dst is None:
                    continue
                if e[0] and buf.offset_index is not None:  # per row, read through the index: the distinct rows
                    src = src.index_select(0, firsts)
                if dst.shape == src.shape:
                    dst.copy_(src)
                else:  # per-row offsets of fewer rows than the bucket
                    dst.zero_()
                    dst[: src.shape[0]].copy_(src)
        return new

    def _mixers(self) -> list[nn.Module]:
        """The mixers whose state hooks the step reads, in layer order."""
        return [m for _, m in self.lm.mixers()]

    def _fresh_buffers(self) -> None:
        """The static cache, new (at the start and when the model changed)."""
        self.cache = self.lm.allocate_cache(
            self.bucket, dtype=self.dtype, device=self.device, state_dtype=self.state_dtype
        )

    def _collect(self, batch: int, routing, rows: torch.Tensor | None) -> tuple[list[MergedState], list]:
        """The step's h' / y' of every mixer, for the B cache rows (batched [B, ...] under a routing), and a key per
        row such that rows with equal keys have equal per-row offsets: the routing's adapter slot (its per-row
        offsets are gathered by slot), else the row itself."""
        select = contextlib.nullcontext() if routing is None else routing.select(rows)
        out = []
        with select:
            for mixer in self.mixers:
                st = collect_state(mixer.state_hooks.values(), batch, initial=False) if mixer.state_hooks else None
                out.append(MergedState(h_off=st.h_off, y_off=st.y_off) if st is not None else MergedState())
            keys = list(range(batch)) if routing is None else routing.slot_index(batch).tolist()
        return out, keys

    @staticmethod
    def _layout(mixer: nn.Module, st: MergedState) -> tuple:
        """((batched, shape, dtype) or None) for h' and y': what the captured step reads, whatever the batch."""
        out = []
        for t, dims in ((st.h_off, len(mixer.state_shape)), (st.y_off, len(mixer.state_shape) - 1)):
            batched = t is not None and t.dim() > dims
            out.append(None if t is None else (batched, tuple(t.shape[1:] if batched else t.shape), t.dtype))
        return tuple(out)

    def _buffers(self, mixer: nn.Module, entry: tuple) -> MergedState:
        """Static offset buffers of one mixer: [bucket, ...] for per-row offsets (a table of up to ``bucket`` distinct
        rows when the mixer reads them through ``offset_index``), the offset's own shape otherwise."""
        bufs = [
            None if e is None else torch.zeros((self.bucket, *e[1]) if e[0] else e[1], dtype=e[2], device=self.device)
            for e in entry
        ]
        indexed = getattr(mixer, "reads_offset_index", False) and any(e is not None and e[0] for e in entry)
        return MergedState(h_off=bufs[0], y_off=bufs[1], offset_index=self.offset_index if indexed else None)

    # --- per token --------------------------------------------------------------------------------------------------

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens`` [B]; returns the next-token logits [B, V] (a view of a static buffer on CUDA: read it
        before the next step)."""
        self.ids[: self.batch].copy_(tokens)
        if self.graph is not None:
            self.graph.replay()
            self.replays += 1
            logits = self.current.logits
        else:
            logits = self._forward()
        self.cache.seqlen_offset += 1
        return logits[: self.batch]

    def reorder(self, index: torch.Tensor) -> None:
        """Rows become ``row[index]`` (beam search), in place: the buffers keep their addresses."""
        index = index.to(self.device)
        n = index.numel()
        if n != self.batch:
            raise ValueError(f"reorder index has {n} rows, the decoder holds {self.batch}")
        for layer in self.cache.layers:
            for buf in (layer.conv_state, layer.ssm_state):
                buf[:n].copy_(buf.index_select(0, index))

    @contextlib.contextmanager
    def _static_offsets(self) -> Iterator[None]:
        """Within the block every mixer's hooks hand out the static offset buffers (the previous collectors, e.g. a
        Routing, are put back after)."""
        saved = []
        try:
            for mixer, st in zip(self.mixers, self.offsets):
                collector = _StaticCollector(st)
                for hook in mixer.state_hooks.values():
                    saved.append((hook, getattr(hook, COLLECTOR_ATTR, None)))
                    object.__setattr__(hook, COLLECTOR_ATTR, collector)
            yield
        finally:
            for hook, prev in saved:
                object.__setattr__(hook, COLLECTOR_ATTR, prev)

    def _forward(self) -> torch.Tensor:
        select = contextlib.nullcontext() if self.routing is None else self.routing.select(self.rows)
        offset = self.cache.seqlen_offset
        with self._static_offsets(), select:
            logits = self.lm(self.ids[:, None], cache=self.cache).logits[:, -1]
        self.cache.seqlen_offset = offset  # the mixers count tokens on the host; step() does it once
        return logits

    def _capture(self) -> None:
        # the warm-up changes the static states, which start() overwrites after the capture
        self.cache.seqlen_offset = 1
        self.current.graph, self.current.logits = capture_graph(self._forward, self.device)


def capture_graph(forward, device: torch.device, warmup: int = 2) -> tuple[torch.cuda.CUDAGraph, object]:
    """(graph, output) of ``forward()`` captured on ``device``, after ``warmup`` eager calls on a side stream
    (allocator, Triton compilation and autotuning happen outside the graph). The warm-up runs the step for real: the
    caller restores what it changes. Replaying the graph reruns the step on the same buffers."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            forward()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    # capture_begin / capture_end rather than the torch.cuda.graph context, which empties the allocator's cache
    # first: a model change frees the captured steps, and emptying the cache after freed graphs has faulted
    # (bench/train_step.py)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        graph.capture_begin()
        try:
            out = forward()
        finally:
            graph.capture_end()
    torch.cuda.current_stream(device).wait_stream(side)
    return graph, out


def capture_failed(error: Exception) -> None:
    """The one-line warning of a capture that failed (the step then runs eagerly)."""
    warnings.warn(f"graphed decoding off for this model, decoding eagerly: the capture failed "
                  f"({type(error).__name__}: {str(error)[:200]})", stacklevel=4)  # fmt: skip


class _Decoders(dict):
    """The decoders kept on a model: copies of the model (``copy.deepcopy``, pickling) start without them."""

    def __deepcopy__(self, memo) -> _Decoders:
        return _Decoders()

    def __reduce__(self):
        return _Decoders, ()


def decoder_for(model, cache: InferenceCache, *, capture: bool, owner: object = None) -> GraphedDecoder:
    """The model's decoder for the cache's batch (its bucket), built on first use and kept on the LM. ``owner``: a
    user that keeps live states in the decoder between calls (the serving engine) gets decoders of its own, kept on
    the owner."""
    lm, _ = unwrap(model)
    batch = cache.batch_size
    ref = cache.layers[0].conv_state
    # buffers made under inference_mode cannot be updated outside it (and the other way round); the state dtype is
    # part of the key: an fp32-state step and a bf16-state one are different graphs over different buffers
    key = (bucket_size(batch), ref.device, ref.dtype, cache.state_dtype, capture, torch.is_inference_mode_enabled())
    decoders = (lm if owner is None else owner).__dict__.setdefault(DECODERS_ATTR, _Decoders())
    if key not in decoders:
        decoders[key] = GraphedDecoder(lm, key[0], ref.device, ref.dtype, capture, cache.state_dtype)
    return decoders[key]


def clear_decoders(model) -> None:
    """Drop the model's captured decoders and their buffers (e.g. to free GPU memory)."""
    lm, _ = unwrap(model)
    lm.__dict__.pop(DECODERS_ATTR, None)
