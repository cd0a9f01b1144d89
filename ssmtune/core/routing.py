"""Per-row adapters: one batch in which every row uses its own adapter (or none).

``PeftModel.route(adapter_names)`` attaches a ``Routing`` to the routable modules of every adapter: the state hooks
and the LoRA/DoRA deltas.

- State hooks: ``models.hooks.collect_state`` finds the ``Routing`` on the hooks (``COLLECTOR_ATTR``) and calls
  ``Routing.collect_state`` (``routed_state``) instead of summing the hooks: each field (h0, conv0, h', y')
  becomes a [B, ...] tensor whose row b holds the contribution of the adapter named for row b, zeros for ``None``
  rows. The ops take a leading batch axis on all four, so the mixers, the kernels and the cache are the ones of a
  plain forward.
- LoRA/DoRA (``methods/lora``): each delta asks ``Routing.rows_of`` for the rows of its adapter and adapts only
  those (its low-rank product on ``x[rows]``, copied back into ``y[rows]``); other rows keep the base output.
  In a packed forward (``cu_seqlens``, one [1, total] row holding n sequences) ``Routing.packed`` makes the rows of
  ``rows_of`` the tokens: each token is routed with its sequence, while the state hooks see one row per sequence.

A batch may mix both kinds and ``None``. Methods that change shared weights or inputs otherwise (BitFit, partial /
full, SDLoRA's sparse part, Additional-scan, prompt tuning), and merged LoRA weights, are not routed per row.

``Routing.rows`` maps the rows of the current forward to the routed rows. It is ``None`` for a forward over the whole
batch (or a packed one); ``RoutedLM`` sets it for the row-by-row prefill and the beam expansion of ``models.generate``,
and
``routed_state`` for the one-row pass of a Prefix adapter over its virtual tokens (``Routing.as_adapter``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..models.hooks import ADAPTER_ATTR, COLLECTOR_ATTR, MergedState, StateHook, add_optional

# Attribute names set on hooks (plain attributes, never submodules).
ROUTING_ATTR = COLLECTOR_ATTR  # the hooks' collect_state finds the Routing there and calls Routing.collect_state
_FIELDS = ("h0", "conv0", "h_off", "y_off")


class Routing:
    """Adapter name per batch row (``None``: the bare base model for that row)."""

    def __init__(self, adapter_names: Sequence[str | None]) -> None:
        self.names: list[str | None] = list(adapter_names)
        if not self.names:
            raise ValueError("adapter_names is empty: give one adapter name (or None) per batch row")
        # slot 0 is "no adapter"; adapters get slots in order of first appearance
        self.adapters: list[str] = list(dict.fromkeys(n for n in self.names if n is not None))
        slot = {n: i + 1 for i, n in enumerate(self.adapters)}
        self.slots = torch.tensor([0 if n is None else slot[n] for n in self.names], dtype=torch.long)  # [B]
        self.rows: torch.Tensor | None = None
        # under ``packed``: the routed row of each token of the packed forward (what ``rows_of`` selects from)
        self.tokens: torch.Tensor | None = None
        self._slot = slot
        # (adapter, batch size, device) -> rows_of's answer, valid until ``rows`` changes
        self._rows_cache: dict[tuple[str, int, torch.device], torch.Tensor | None] = {}

    def __len__(self) -> int:
        return len(self.names)

    @contextlib.contextmanager
    def select(self, rows: torch.Tensor | Sequence[int] | None) -> Iterator[None]:
        """Within the block, forward row i is routed row ``rows[i]`` (e.g. one row of a row-by-row prefill)."""
        prev = self.rows, self.tokens
        self.rows = None if rows is None else torch.as_tensor(rows, dtype=torch.long)
        self.tokens = None  # a selected forward is unpacked (e.g. a Prefix adapter's pass inside a packed one)
        self._rows_cache = {}
        try:
            yield
        finally:
            self.rows, self.tokens = prev
            self._rows_cache = {}

    @contextlib.contextmanager
    def packed(self, cu_seqlens: torch.Tensor | None) -> Iterator[None]:
        """Within the block, forwards are packed (``cu_seqlens`` [n + 1], one sequence per routed row): ``rows_of``
        answers with the tokens of each adapter's sequences. None: a no-op (an unpacked forward)."""
        if cu_seqlens is None:
            yield
            return
        lengths = cu_seqlens.diff().long().cpu()
        if lengths.numel() != len(self):
            raise ValueError(
                f"the packed batch has {lengths.numel()} sequences but {len(self)} adapter names are routed "
                f"(adapter_names={self.names}): give one adapter name (or None) per sequence"
            )
        prev = self.tokens
        self.tokens = torch.arange(len(self)).repeat_interleave(lengths)
        self._rows_cache = {}
        try:
            yield
        finally:
            self.tokens = prev
            self._rows_cache = {}

    def as_adapter(self, adapter: str) -> contextlib.AbstractContextManager[None]:
        """Within the block, a one-row forward is routed to ``adapter`` (a Prefix adapter's pass over its tokens)."""
        return self.select([self.names.index(adapter)])

    def collect_state(self, hooks: Sequence[StateHook], batch_size: int, *, initial: bool = True) -> MergedState:
        """The state collector protocol of ``models/hooks.py``: ``collect_state`` delegates here under a routing."""
        return routed_state(hooks, batch_size, self, initial=initial)

    def slot_index(self, batch_size: int) -> torch.Tensor:
        """Slot of each row of the current forward, [batch_size] (CPU)."""
        idx = self.slots if self.rows is None else self.slots[self.rows]
        if idx.numel() != batch_size:
            raise ValueError(
                f"the batch has {batch_size} rows but {idx.numel()} adapter names are routed "
                f"(adapter_names={self.names if self.rows is None else [self.names[i] for i in self.rows.tolist()]})"
            )
        return idx

    def rows_of(self, adapter: str, batch_size: int, device: torch.device) -> torch.Tensor | None:
        """Rows of the current forward routed to ``adapter``, as indices on ``device``; None when it is all of them.
        Under ``packed`` the rows are the tokens of the packed forward (``batch_size``: their number)."""
        key = (adapter, batch_size, device)
        if key not in self._rows_cache:
            if self.tokens is None:
                idx = self.slot_index(batch_size)
            elif self.tokens.numel() == batch_size:
                idx = self.slots[self.tokens]
            else:
                raise ValueError(f"a packed forward of {self.tokens.numel()} tokens got {batch_size} rows to route")
            mine = idx == self._slot.get(adapter, -1)
            # every row: the caller takes its plain path (no gather, no copy)
            self._rows_cache[key] = None if bool(mine.all()) else mine.nonzero().squeeze(1).to(device)
        return self._rows_cache[key]


def _expected_shape(hook: nn.Module, field: str) -> tuple[int, ...] | None:
    """Unbatched shape of a field, from the mixer the hook hangs on (None when unknown)."""
    info = getattr(hook, "_ssmtune_attach", None)
    mixer = info[1] if info else None
    if mixer is None or not hasattr(mixer, "state_shape"):
        return None
    if field in ("h0", "h_off"):
        return tuple(mixer.state_shape)
    if field == "y_off":
        return tuple(getattr(mixer, "output_offset_shape", mixer.state_shape[:-1]))
    return tuple(mixer.conv_state_shape)


def _gather(values: dict[int, torch.Tensor], shape: tuple[int, ...] | None, idx: torch.Tensor) -> torch.Tensor:
    """[B, *shape]: row b takes ``values[idx[b]]`` (its row b when batched), zeros where idx[b] has no value."""
    ref = next(iter(values.values()))
    dtype = ref.dtype
    for v in values.values():
        dtype = torch.promote_types(dtype, v.dtype)
    if shape is None:
        shape = tuple(ref.shape)
    batch = idx.numel()
    idx = idx.to(ref.device)
    if all(tuple(v.shape) == shape for v in values.values()):
        # the usual case (per-adapter parameters): one stacked table, one gather
        top = max(values) + 1
        table = [values[s].to(dtype) if s in values else ref.new_zeros(shape, dtype=dtype) for s in range(top)]
        table.append(ref.new_zeros(shape, dtype=dtype))
        safe = torch.where(idx < top, idx, torch.full_like(idx, top))
        return torch.stack(table).index_select(0, safe)  # [B, *shape]
    out = ref.new_zeros((batch, *shape), dtype=dtype)
    for s, v in values.items():
        mask = (idx == s).view(batch, *([1] * len(shape)))
        out = torch.where(mask, v.to(dtype), out)
    return out


def routed_state(hooks: Sequence[StateHook], batch_size: int, routing: Routing, *, initial: bool = True) -> MergedState:
    """``collect_state`` under a routing: per-row [B, ...] tensors gathered from each row's adapter."""
    idx = routing.slot_index(batch_size)  # [B]
    present = set(idx.tolist())
    slot = {n: i + 1 for i, n in enumerate(routing.adapters)}
    per_slot: dict[int, MergedState] = {}
    shapes: dict[str, tuple[int, ...] | None] = {}
    shared = MergedState()
    for hook in hooks:
        if not getattr(hook, "active", True):
            continue
        name = getattr(hook, ADAPTER_ATTR, None)
        if name is None:
            # a hook outside any named adapter acts on every row, as in a plain forward
            target = shared
        elif slot.get(name) in present:
            target = per_slot.setdefault(slot[name], MergedState())
        else:
            continue
        if initial:
            # a Prefix hook runs its mixer on one row of virtual tokens: the LoRA deltas of its own adapter (only)
            # must apply there, as when that adapter is active alone
            with contextlib.nullcontext() if name is None else routing.as_adapter(name):
                target.h0 = add_optional(target.h0, hook.initial_state(batch_size))
                target.conv0 = add_optional(target.conv0, hook.initial_conv_state(batch_size))
        target.h_off = add_optional(target.h_off, hook.state_offset())
        target.y_off = add_optional(target.y_off, hook.output_offset())
        for f in _FIELDS:
            if f not in shapes and getattr(target, f) is not None:
                shapes[f] = _expected_shape(hook, f)
    merged = MergedState()
    for f in _FIELDS:
        values = {s: getattr(ms, f) for s, ms in per_slot.items() if getattr(ms, f) is not None}
        routed = _gather(values, shapes.get(f), idx) if values else None
        setattr(merged, f, add_optional(routed, getattr(shared, f)))
    return merged


class RoutedLM:
    """A causal LM seen through a routing, for ``models.generate.generate``.

    It sets ``Routing.rows`` from each call, following ``generate``'s row order: a batch of all B rows is routed as
    is, and so is a packed one (``cu_seqlens``: B sequences, ``Routing.packed``); a fresh one-row cache while B > 1 is
    the next row of the row-by-row prefill (rows in order); B·K rows are K beams per row (beam search only reorders
    beams within a row). Everything else is delegated to the model.
    """

    def __init__(self, model: nn.Module, routing: Routing) -> None:
        self.model = model
        self.routing = routing
        self._next_row = 0

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def __call__(self, input_ids: torch.Tensor | None = None, *, cache=None, **kwargs):
        x = input_ids if input_ids is not None else kwargs["inputs_embeds"]
        n, b = len(self.routing), x.shape[0]
        fresh = cache is None or cache.seqlen_offset == 0
        cu = kwargs.get("cu_seqlens")
        if cu is not None:
            with self.routing.packed(cu):
                return self.model(input_ids, cache=cache, **kwargs)
        if b == n:
            rows = None
        elif fresh and b == 1:
            if self._next_row >= n:
                raise ValueError(f"RoutedLM: more one-row prefills than the {n} routed rows")
            rows = [self._next_row]
            self._next_row += 1
        elif b % n == 0:
            rows = torch.arange(n).repeat_interleave(b // n)
        else:
            raise ValueError(f"RoutedLM: a batch of {b} rows cannot follow {n} routed rows")
        with self.routing.select(rows):
            return self.model(input_ids, cache=cache, **kwargs)
