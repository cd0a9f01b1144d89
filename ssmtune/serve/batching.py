"""Continuous batching of generation requests, each row with its own adapter.

One worker thread owns the model. Requests wait in a queue; when the engine is idle it collects the requests that
arrive within ``batch_wait_s`` (up to ``max_batch``), and while it is decoding it admits new requests at every step
boundary. New rows are prefilled together in one forward, each on its own tokens with its adapter (prompts of
different lengths packed, no padding entering a state; ``models.generate.prefill``), and their cache is concatenated
to the running batch: an SSM's state is a fixed-size tensor per row, so rows of different lengths
and ages decode together with no padding. Each step runs one forward over all live rows, with
``adapter_names=[adapter of each row]`` (``PeftModel.route``); rows that finish are dropped from the cache.

Rows of state-based adapters, of LoRA/DoRA adapters (per-row low-rank products) and of no adapter mix freely. A request
for another kind of adapter (prompt, BitFit, partial, SDLoRA, Additional-scan) only joins a batch whose rows all use
that same adapter; it waits otherwise, and so do the requests behind it (first come, first served).

A beam-search request (``num_beams`` > 1) never joins the batch: the worker runs it alone, between two decode steps,
through ``generate(..., num_beams=k, adapter_names=[adapter])``, and sends its tokens when it is done.

A transformers hybrid model (``ssmtune.from_transformers``) keeps its cache in transformers' classes, so its requests
run through transformers' ``generate`` instead of the batch above, a group of them per call: the first waiting request
with the later ones that can share its call (up to ``max_batch``), their prompts left-padded (``attention_mask``; the
mixers start each row's state at its first real token, so a row's tokens are those it gets alone, as the tests check
for every hybrid family), with ``adapter_names=[adapter of each row]`` and the group's largest ``max_new_tokens``.
Each row's tokens are sent as generate picks them, and the row stops at its own ``max_new_tokens`` or EOS (generate
stops once every row has). Requests share a call when they decode alike: all greedy, or all sampled with the same
temperature, top_k and top_p; rows of adapters that are not routable (above) only with rows of the same adapter. A
sampled request with a ``seed`` runs alone: transformers samples every row from one global generator, so only alone
are its tokens a function of its seed (the same tokens each time); one without a seed shares. Beam requests run alone.
Later requests may join a call ahead of an earlier one that cannot; that one leads the next call.

With ``cuda_graph`` on, decode steps run through a ``models.decode.GraphedDecoder``: the live rows' states
move into its static buffers when the batch changes (rows joined or finished) and stay there while it does not, each
step replaying the captured one-token forward. Rows that join or leave hand the states back to ``_cache`` first.

``state_dtype`` (an engine setting; None, the default, is the model's dtype where 16-bit, else fp32) is the dtype the
rows' SSM states are kept in, as in ``models.generate`` (bf16 halves their memory traffic per step). It applies to ssmtune's own Mamba models: a
transformers hybrid keeps transformers' cache and refuses it.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.peft_model import PeftModel
from ..core.routing import RoutedLM
from ..models.cache import InferenceCache, decode_state_dtype, state_dtype_of
from ..models.decode import GRAPHED_BY_DEFAULT, GraphedDecoder, decoder_for, unsupported_reason
from ..models.generate import filter_logits, left_pad, prefill
from ..models.hybrid_decode import refuse_state_dtype

MAX_BEAMS = 8
"""Largest ``num_beams`` a request may ask for: a beam request decodes its k beams alone, pausing the batch."""
MAX_SEED = 2**64 - 1
"""Largest seed a ``torch.Generator`` takes."""
MIN_TEMPERATURE = 1e-4
"""Smallest sampling temperature: far below it the scaled logits of float32 overflow (sampling is greedy by then)."""
MAX_TEMPERATURE = 100.0
"""Largest sampling temperature (sampling is uniform long before)."""


@dataclass(kw_only=True)
class GenerationSettings:
    """Per-request decoding settings, checked here: a request that cannot be decoded is refused before it is queued."""

    max_new_tokens: int = 32
    """Longest continuation, EOS included."""
    do_sample: bool = False
    """Sample instead of greedy decoding."""
    temperature: float = 1.0
    """Sampling temperature in [MIN_TEMPERATURE, MAX_TEMPERATURE]."""
    top_k: int | None = None
    """Keep the k most likely tokens when sampling."""
    top_p: float | None = None
    """Nucleus sampling threshold in (0, 1]."""
    seed: int | None = None
    """Seed of this request's sampling generator. Default: `None`, a random seed."""
    num_beams: int = 1
    """Beam search with this many beams (greedy, 1..MAX_BEAMS); > 1 runs outside the batch, tokens sent at the end."""

    def __post_init__(self) -> None:
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {n!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not MIN_TEMPERATURE <= t <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be a number in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], got {t!r}")
        if self.top_k is not None and (
            isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1
        ):
            raise ValueError(f"top_k must be an int >= 1 or None, got {self.top_k!r}")
        p = self.top_p
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1):
            raise ValueError(f"top_p must be a number in (0, 1] or None, got {p!r}")
        seed = self.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED):
            raise ValueError(f"seed must be an int in 0..{MAX_SEED} (64 bits) or None, got {seed!r}")
        k = self.num_beams
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_BEAMS:
            raise ValueError(f"num_beams must be an int in 1..{MAX_BEAMS}, got {k!r}")
        if k > 1 and self.do_sample:
            raise ValueError(f"num_beams={k} is beam search, which is greedy: do_sample must be false (got true)")


@dataclass(kw_only=True)
class GenerationRequest:
    """One prompt for one adapter. ``emit`` is called from the worker thread with each event (a dict):
    ``{"token": id}``, then ``{"done": True, "finish_reason": "eos" | "length"}``, or ``{"error": message}``."""

    prompt_ids: list[int]
    adapter: str | None
    settings: GenerationSettings
    emit: Callable[[dict[str, Any]], None]
    cancelled: threading.Event = field(default_factory=threading.Event)


class QueueFullError(RuntimeError):
    """The engine has ``max_queue`` requests waiting."""


_SHUTDOWN = {"error": "the server is shutting down"}  # to every request waiting or running when the worker ends


@dataclass
class _Row:
    req: GenerationRequest
    generator: torch.Generator | None
    last: int = 0
    produced: int = 0


@dataclass
class EngineStats:
    """Counters for monitoring and tests."""

    requests: int = 0
    """Requests admitted into a batch."""
    steps: int = 0
    """Batched decode steps (of the engine's own batch; a hybrid's requests decode in ``generate_calls``)."""
    max_rows: int = 0
    """Most rows decoded together in one step."""
    max_adapters: int = 0
    """Most distinct adapters (None included) in one step."""
    errors: int = 0
    """Requests that failed with an exception (each got its error event)."""
    beam_requests: int = 0
    """Beam-search requests run (each alone, outside the batch)."""
    generate_calls: int = 0
    """transformers ``generate`` calls running a group of a hybrid model's requests (beam requests not included)."""


class BatchEngine:
    """Runs ``GenerationRequest``s on ``model`` (a ``PeftModel`` or a bare causal LM) in one worker thread."""

    def __init__(
        self,
        model: nn.Module,
        *,
        eos_token_id: int | None,
        max_batch: int = 16,
        batch_wait_s: float = 0.005,
        max_queue: int = 256,
        cuda_graph: bool | None = None,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        state_dtype_of(state_dtype)
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch!r}")
        if batch_wait_s < 0:
            raise ValueError(f"batch_wait_s must be >= 0, got {batch_wait_s!r}")
        self.model = model
        self.eos_token_id = eos_token_id
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self.max_queue = max_queue
        self.stats = EngineStats()
        self._queue: queue.Queue[GenerationRequest] = queue.Queue()
        self._deferred: list[GenerationRequest] = []
        # set apart from the batch: beam requests, and every request to a hybrid (run by _next_group's calls)
        self._apart: list[GenerationRequest] = []
        self._rows: list[_Row] = []
        self._cache: InferenceCache | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # submit() puts under it, the worker's last drain of the queue takes it: no request is queued after the drain
        self._submit_lock = threading.Lock()
        self.device = next(model.parameters()).device
        base = model.base_model if isinstance(model, PeftModel) else model
        # a transformers hybrid keeps its cache in transformers' classes: its requests are set apart with the beam requests and
        # run in groups through transformers' generate (_generate)
        self.solo = not hasattr(base, "backbone")
        self.n_layer = 0 if self.solo else len(base.backbone.layers)
        if self.solo:
            refuse_state_dtype(state_dtype)
        # of the rows' SSM states: the model's dtype where 16-bit, else fp32, unless given (cache.decode_state_dtype)
        self.state_dtype = None if self.solo else decode_state_dtype(base, state_dtype)
        self.base = base
        # decode steps on a GraphedDecoder (captured on CUDA; True on the CPU runs it eagerly); None: the library default
        self.cuda_graph = (
            (GRAPHED_BY_DEFAULT and self.device.type == "cuda") if cuda_graph is None else bool(cuda_graph)
        )
        # the decoder holding the live rows' states; None: they are in _cache; False: this batch decodes eagerly
        self._decoder: GraphedDecoder | bool | None = None
        # a hybrid's groups decode through its graphed step only when asked for (cuda_graph=True): that path is opt-in
        # until measured on a GPU (models/hybrid_decode.py)
        self.hybrid_graph = self.solo and cuda_graph is True

    # --- public -----------------------------------------------------------------------------------------------------

    @property
    def adapters(self) -> list[str]:
        return self.model.adapter_names if isinstance(self.model, PeftModel) else []

    def routable(self, adapter: str | None) -> bool:
        """Whether rows of this adapter can share a batch with rows of other adapters."""
        return adapter is None or self.model.routable(adapter)

    @property
    def pending(self) -> int:
        return self._queue.qsize() + len(self._deferred) + len(self._apart)

    @property
    def active_rows(self) -> int:
        return len(self._rows)

    @property
    def running(self) -> bool:
        """Started and not asked to stop."""
        return self._thread is not None and not self._stop.is_set()

    @property
    def stopping(self) -> bool:
        """Asked to stop, but the worker is still running (``stop`` timed out): it cannot be started again yet."""
        return self._thread is not None and self._stop.is_set()

    def start(self) -> None:
        """Start the worker; a no-op on a running engine. RuntimeError while a timed-out ``stop`` is still pending."""
        if self.stopping:
            raise RuntimeError("the engine is still stopping: its worker has not ended; call stop() again to wait")
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="ssmtune-serve-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker and wait up to ``timeout`` seconds for it to end; requests still waiting or running get an
        error event from the worker as it ends. A no-op on an engine that is not running.

        RuntimeError when the worker is still running after ``timeout`` (a forward or beam search in progress): the
        engine is then ``stopping``, refuses new requests and cannot be started; call ``stop`` again to wait longer.
        The model is the worker's until ``stop`` returns."""
        thread = self._thread
        if thread is None:
            return
        self._stop.set()
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError(
                f"the engine's worker is still running {timeout} s after stop() (a forward or beam search in "
                f"progress); it ends after that step; call stop() again to wait for it"
            )
        self._thread = None

    def submit(self, req: GenerationRequest) -> None:
        with self._submit_lock:
            if self._thread is None:
                raise RuntimeError("the engine is not running (call start())")
            if self._stop.is_set():
                raise RuntimeError("the engine is stopping: it takes no new requests")
            if self.pending >= self.max_queue:
                raise QueueFullError(f"{self.pending} requests are waiting (max_queue={self.max_queue}); retry later")
            self._queue.put(req)

    # --- worker -----------------------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while not self._stop.is_set():
                    try:
                        self._admit()
                        if self._apart:
                            self._detach_decoder()
                            # one call at a time, so the batch only pauses for one beam search per step
                            group = self._next_group()
                            if group[0].settings.num_beams > 1:
                                self._beam_search(group[0])
                            else:
                                self._generate(group)
                        if self._rows:
                            self._step()
                    # keep serving: a failed forward fails the rows of this batch only (a row's own failure is caught
                    # in _emit_all and fails that row alone)
                    except Exception as e:  # noqa: BLE001
                        for row in self._rows:
                            self._fail(row.req, e)
                        self._rows, self._cache, self._decoder = [], None, None
        finally:
            self._shut_down()

    def _shut_down(self) -> None:
        """The worker's last act: every request it still holds or that waits gets the shutdown event (here, as the
        worker owns the rows: a ``stop`` that timed out leaves them alone)."""
        reqs = [row.req for row in self._rows] + self._deferred + self._apart
        self._rows, self._cache, self._decoder, self._deferred, self._apart = [], None, None, [], []
        with self._submit_lock:
            while True:
                try:
                    reqs.append(self._queue.get_nowait())
                except queue.Empty:
                    break
        for req in reqs:
            # a caller's broken callback must not keep the others from their event
            with contextlib.suppress(Exception):
                req.emit(dict(_SHUTDOWN))

    def _collect(self) -> list[GenerationRequest]:
        """Requests to consider now: the deferred ones first, then new ones from the queue."""
        new: list[GenerationRequest] = []
        room = self.max_batch - len(self._rows)
        if not self._rows and not self._deferred and not self._apart:
            # idle: wait for a first request, then a few ms for the ones that arrive with it
            try:
                new.append(self._queue.get(timeout=0.05))
            except queue.Empty:
                return []
            deadline = time.monotonic() + self.batch_wait_s
            while len(new) < room:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    new.append(self._queue.get(timeout=remaining))
                except queue.Empty:
                    break
        while len(self._deferred) + len(new) < room:
            try:
                new.append(self._queue.get_nowait())
            except queue.Empty:
                break
        out, self._deferred = self._deferred + new, []
        return out

    def _admit(self) -> None:
        names = {r.req.adapter for r in self._rows}
        admitted: list[GenerationRequest] = []
        blocked = False
        for req in self._collect():
            if req.cancelled.is_set():
                continue
            if req.settings.num_beams > 1 or self.solo:
                # runs outside the batch (alone, or in a hybrid's generate call): it takes no row, waits for nobody
                self._apart.append(req)
                continue
            joined = names | {req.adapter}
            fits = len(self._rows) + len(admitted) < self.max_batch
            mixable = len(joined) == 1 or all(self.routable(n) for n in joined)
            if blocked or not fits or not mixable:
                # first come, first served: nothing overtakes a waiting request
                blocked = True
                self._deferred.append(req)
                continue
            names = joined
            admitted.append(req)
        if admitted:
            self._prefill(admitted)

    def _forward(self, ids: torch.Tensor, cache: InferenceCache, adapters: list[str | None]) -> torch.Tensor:
        """Logits [B, V] at the last position, each row with its adapter."""
        if isinstance(self.model, PeftModel):
            out = self.model(ids, cache=cache, adapter_names=adapters)
        else:
            out = self.model(ids, cache=cache)
        return out.logits[:, -1].float()

    def _prefill(self, reqs: list[GenerationRequest]) -> None:
        """Prefill new rows in one forward (``models.generate.prefill``: prompts of different lengths packed, each on
        its real tokens with its adapter) and append them to the batch."""
        self._detach_decoder()
        self.stats.requests += len(reqs)
        # per-request set-up first: a request that cannot start fails alone, before it shares a forward
        rows = []
        for req in reqs:
            try:
                rows.append(_Row(req, self._generator(req.settings)))
            except Exception as e:  # noqa: BLE001
                self._fail(req, e)
        if not rows:
            return
        try:
            ids, mask = left_pad([r.req.prompt_ids for r in rows], self.device)  # the prefill never reads the pads
            with self._route([r.req.adapter for r in rows]) as routing:
                model = self.base if routing is None else RoutedLM(self.base, routing)
                cache, logits = prefill(model, ids, mask, self.state_dtype)  # [b, V]
            logits = logits.float()
        except Exception as e:  # noqa: BLE001
            for row in rows:
                self._fail(row.req, e)
            return
        keep = [i for i, alive in enumerate(self._emit_all(rows, logits)) if alive]
        if keep:
            if len(keep) < len(rows):
                cache.reorder(torch.tensor(keep, device=self.device))
            self._cache = cache if self._cache is None else InferenceCache.cat([self._cache, cache])
            self._rows.extend(rows[i] for i in keep)

    def _next_group(self) -> list[GenerationRequest]:
        """The first request set apart, with (on a hybrid) the later ones that can share its ``generate`` call."""
        head = self._apart.pop(0)
        key = _group_key(head.settings)
        if not self.solo or key is None:
            return [head]
        group, rest = [head], []
        head_routable = self.routable(head.adapter)
        for req in self._apart:
            mixes = req.adapter == head.adapter or (head_routable and self.routable(req.adapter))
            if len(group) < self.max_batch and mixes and _group_key(req.settings) == key:
                group.append(req)
            else:
                rest.append(req)
        self._apart = rest
        return group

    def _generate(self, reqs: list[GenerationRequest]) -> None:
        """Run a group of a hybrid model's requests in one transformers ``generate`` call (``_next_group``): prompts
        left-padded, each row with its adapter; each row's tokens are sent as they come (``_RowStops``)."""
        reqs = [r for r in reqs if not r.cancelled.is_set()]
        if not reqs:
            return
        self.stats.requests += len(reqs)
        self.stats.generate_calls += 1
        self.stats.max_rows = max(self.stats.max_rows, len(reqs))
        self.stats.max_adapters = max(self.stats.max_adapters, len({r.adapter for r in reqs}))
        stops = _RowStops(self, [_Row(r, None) for r in reqs])
        s = reqs[0].settings  # the group decodes alike (_group_key)
        try:
            ids, mask = left_pad([r.prompt_ids for r in reqs], self.device)  # the mixers and attention skip the pads
            kw = {
                "attention_mask": mask,
                "max_new_tokens": max(r.settings.max_new_tokens for r in reqs),
                "eos_token_id": self.eos_token_id,
                # what generate feeds the rows that are done (_RowStops): a valid id, read by no other row
                "pad_token_id": 0,
                "do_sample": s.do_sample,
                "stopping_criteria": [stops],
            }
            if self.hybrid_graph:
                kw["cuda_graph"] = True
            if s.do_sample:
                # transformers samples from the global generator; top_k=0 and top_p=1 filter nothing
                torch.manual_seed(s.seed if s.seed is not None else torch.seed())
                kw.update(temperature=s.temperature, top_k=s.top_k or 0, top_p=s.top_p or 1.0)
            if isinstance(self.model, PeftModel):
                self.model.generate(ids, adapter_names=[r.adapter for r in reqs], **kw)
            else:
                self.model.generate(ids, **kw)
        except Exception as e:  # noqa: BLE001
            for i, row in enumerate(stops.rows):
                if not stops.done[i]:
                    self._fail(row.req, e)
            return
        for i, row in enumerate(stops.rows):
            if not stops.done[i]:  # generate stopped on a criterion of the model's own generation config
                row.req.emit({"done": True, "finish_reason": "length"})

    def _beam_search(self, req: GenerationRequest) -> None:
        """Run a beam-search request alone with the library's ``generate``, then send its tokens at once."""
        if req.cancelled.is_set():
            return
        self.stats.beam_requests += 1
        s = req.settings
        try:
            ids = torch.tensor([req.prompt_ids], dtype=torch.long, device=self.device)  # [1, L]
            kw = {"max_new_tokens": s.max_new_tokens, "num_beams": s.num_beams, "eos_token_id": self.eos_token_id}
            if self.solo:  # beam search is greedy (GenerationSettings); sampled requests go to _generate
                kw.update(pad_token_id=self.eos_token_id, do_sample=False)
            else:
                kw["state_dtype"] = self.state_dtype
            if isinstance(self.model, PeftModel):
                out = self.model.generate(ids, adapter_names=[req.adapter], **kw)
            else:
                out = self.model.generate(ids, **kw)
            tokens = out[0, ids.shape[1] :].tolist()
        except Exception as e:  # noqa: BLE001
            self._fail(req, e)
            return
        # as a batch row: tokens up to the EOS, which ends the request without a token event
        ended = self.eos_token_id is not None and self.eos_token_id in tokens
        for tok in tokens[: tokens.index(self.eos_token_id)] if ended else tokens:
            req.emit({"token": tok})
        req.emit({"done": True, "finish_reason": "eos" if ended else "length"})

    def _generator(self, s: GenerationSettings) -> torch.Generator | None:
        if not s.do_sample:
            return None
        gen = torch.Generator(device=self.device)
        gen.manual_seed(s.seed if s.seed is not None else torch.seed())
        return gen

    def _step(self) -> None:
        rows = self._rows
        adapters = [r.req.adapter for r in rows]
        self.stats.steps += 1
        self.stats.max_rows = max(self.stats.max_rows, len(rows))
        self.stats.max_adapters = max(self.stats.max_adapters, len(set(adapters)))
        ids = torch.tensor([[r.last] for r in rows], dtype=torch.long, device=self.device)  # [B, 1]
        logits = self._decode(ids, adapters)  # [B, V]
        keep = [i for i, alive in enumerate(self._emit_all(rows, logits)) if alive]
        if len(keep) < len(rows):
            self._detach_decoder()
            self._rows = [rows[i] for i in keep]
            if keep:
                self._cache.reorder(torch.tensor(keep, device=self.device))
            else:
                self._cache = None

    # --- graphed decode steps -------------------------------------------------------------------------------------

    def _route(self, adapters: list[str | None]):
        return self.model.route(adapters) if isinstance(self.model, PeftModel) else contextlib.nullcontext(None)

    def _decode(self, ids: torch.Tensor, adapters: list[str | None]) -> torch.Tensor:
        """One step of the live rows: on the decoder (its states stay in its buffers), else eagerly on ``_cache``."""
        if self.cuda_graph and self._decoder is None:
            self._decoder = self._start_decoder(adapters)
        dec = self._decoder
        if not dec:
            return self._forward(ids, self._cache, adapters)
        if dec.graph is not None:
            return dec.step(ids[:, 0]).float()
        with self._route(adapters) as routing:  # run eagerly: the adapters' flags and LoRA rows must be set
            dec.routing = routing  # this block's Routing (the rows are those of start())
            return dec.step(ids[:, 0]).float()

    def _start_decoder(self, adapters: list[str | None]) -> GraphedDecoder | bool:
        """Move the live rows into the engine's decoder for their bucket; False when this batch cannot use one."""
        capture = self.device.type == "cuda"
        with self._route(adapters) as routing:
            model = self.base if routing is None else RoutedLM(self.base, routing)
            reason = unsupported_reason(model, capture=capture)
            if reason is not None:
                warnings.warn(f"graphed decoding off for this batch, decoding eagerly: {reason}", stacklevel=2)
                return False
            dec = decoder_for(model, self._cache, capture=capture, owner=self)
            dec.start(self._cache, routing)
        return dec

    def _detach_decoder(self) -> None:
        """Copy the live rows' states from the decoder's buffers back into ``_cache`` (the rows are about to change)."""
        dec, self._decoder = self._decoder, None
        if dec and self._cache is not None:
            for mine, static in zip(self._cache.layers, dec.cache.layers):
                mine.conv_state.copy_(static.conv_state[: dec.batch])
                mine.ssm_state.copy_(static.ssm_state[: dec.batch])

    def _fail(self, req: GenerationRequest, e: BaseException) -> None:
        self.stats.errors += 1
        req.emit({"error": f"generation failed: {type(e).__name__}: {e}"})

    def _emit_all(self, rows: list[_Row], logits: torch.Tensor) -> list[bool]:
        """Next token of every row (greedy rows in one argmax); False for the rows that are finished or failed."""
        greedy = logits.argmax(-1).tolist()  # [B], one device sync
        alive = []
        for i, row in enumerate(rows):
            try:
                alive.append(self._emit(row, logits[i], None if row.req.settings.do_sample else greedy[i]))
            except Exception as e:  # noqa: BLE001
                # this row's sampling failed: it ends with its error, the others go on with their own tokens
                self._fail(row.req, e)
                alive.append(False)
        return alive

    def _emit(self, row: _Row, logits: torch.Tensor, greedy: int | None) -> bool:
        """Pick (sample, or take ``greedy``) and send the next token of a row; False when it is finished."""
        if row.req.cancelled.is_set():
            return False
        s = row.req.settings
        if s.do_sample:
            # shifted first, so that a low temperature cannot overflow the scaled logits to inf (inf - inf = nan)
            scaled = (logits - logits.max()) / s.temperature
            probs = filter_logits(scaled[None], s.top_k, s.top_p).softmax(-1)  # [1, V]
            if not bool(torch.isfinite(probs).all()):
                raise ValueError(f"the sampling probabilities are not finite (temperature={s.temperature})")
            tok = int(torch.multinomial(probs, 1, generator=row.generator)[0, 0])
        else:
            tok = greedy
        return self._send(row, tok)

    def _send(self, row: _Row, tok: int) -> bool:
        """Send a row's next token (or its end, at EOS or ``max_new_tokens``); False when it is finished."""
        s = row.req.settings
        row.produced += 1
        row.last = tok
        if self.eos_token_id is not None and tok == self.eos_token_id:
            row.req.emit({"done": True, "finish_reason": "eos"})
            return False
        row.req.emit({"token": tok})
        if row.produced >= s.max_new_tokens:
            row.req.emit({"done": True, "finish_reason": "length"})
            return False
        return True


def _group_key(s: GenerationSettings) -> tuple | None:
    """Requests of a hybrid model with equal keys can share one ``generate`` call; None: the request runs alone."""
    if s.num_beams > 1 or (s.do_sample and s.seed is not None):
        return None
    if not s.do_sample:
        return ("greedy",)
    return ("sample", float(s.temperature), s.top_k or 0, float(s.top_p or 1.0))


class _RowStops:
    """A stopping criterion of transformers' ``generate`` (which only calls it: no base class needed) that sends each
    row's new token as soon as it is picked (``BatchEngine._send``) and stops the rows finished, cancelled or failed."""

    def __init__(self, engine: BatchEngine, rows: list[_Row]) -> None:
        self.engine, self.rows = engine, rows
        self.done = [False] * len(rows)

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        for i, tok in enumerate(input_ids[:, -1].tolist()):  # one device sync per step
            if self.done[i]:
                continue
            row = self.rows[i]
            try:
                self.done[i] = row.req.cancelled.is_set() or not self.engine._send(row, tok)
            except Exception as e:  # noqa: BLE001
                # this row's emit failed: it ends with its error, the others go on
                self.engine._fail(row.req, e)
                self.done[i] = True
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)
