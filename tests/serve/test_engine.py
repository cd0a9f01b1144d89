"""BatchEngine without HTTP: joining rows, batch limits, LoRA rows mixed in, BitFit rows kept apart, failures that do not
stop it."""

from __future__ import annotations

import queue
import re
import threading
import time

import pytest
import torch

from ssmtune import BitFitConfig, InitialStateConfig, LoraConfig, StateOffsetConfig, get_peft_model
from ssmtune.models import MambaConfig, causal_lm_for
from ssmtune.serve import BatchEngine, GenerationRequest, GenerationSettings
from ssmtune.serve.batching import MAX_BEAMS

pytestmark = pytest.mark.timeout(60)
EOS = 99  # outside the tiny vocabulary (48): every row runs to its max_new_tokens


def _peft():
    torch.manual_seed(0)
    cfg = MambaConfig(d_model=16, n_layer=2, vocab_size=48, d_state=4, dt_rank=2, pad_vocab_size_multiple=1)
    peft = get_peft_model(causal_lm_for(cfg).eval(), StateOffsetConfig(), adapter_name="h")
    peft.add_adapter("h0", InitialStateConfig())
    peft.add_adapter("lora", LoraConfig(r=2, target_modules=["out_proj"]))
    peft.add_adapter("lora2", LoraConfig(r=3, target_modules=["in_proj", "x_proj.B"], use_dora=True))
    peft.add_adapter("bias", BitFitConfig())
    with torch.no_grad():
        for n in peft.adapter_names:
            for p in peft.adapter_state_dict(n).values():
                p.add_(torch.randn(p.shape) * 0.5)
    return peft


def _run(engine, jobs, timeout=20.0):
    """Submit (prompt_ids, adapter, max_new_tokens[, num_beams]) jobs; return per job (tokens, final event)."""
    qs = []
    for ids, adapter, n, *beams in jobs:
        q: queue.Queue = queue.Queue()
        settings = GenerationSettings(max_new_tokens=n, num_beams=beams[0] if beams else 1)
        engine.submit(GenerationRequest(prompt_ids=ids, adapter=adapter, settings=settings, emit=q.put))
        qs.append(q)
    out = []
    deadline = time.monotonic() + timeout
    for q in qs:
        tokens = []
        while True:
            event = q.get(timeout=max(deadline - time.monotonic(), 0.01))
            if "token" in event:
                tokens.append(event["token"])
            else:
                out.append((tokens, event))
                break
    return out


def _alone(peft, jobs) -> list[list[int]]:
    """Each job's tokens from PeftModel.generate, one prompt at a time."""
    want = []
    for ids, adapter, n, *beams in jobs:
        gen = peft.generate(torch.tensor([ids]), max_new_tokens=n, adapter_names=[adapter], eos_token_id=EOS,
                            num_beams=beams[0] if beams else 1)  # fmt: skip
        want.append(gen[0, len(ids) :].tolist())
    return want


def _serve(engine, jobs):
    """``_run`` on a started engine, stopped afterwards."""
    engine.start()
    try:
        return _run(engine, jobs)
    finally:
        engine.stop()


def test_rows_join_and_match_generate_alone():
    peft = _peft()
    jobs = [([1, 2, 3], "h", 9), ([4], "h0", 3), ([5, 6], None, 7), ([7, 8, 9, 10], "h", 5), ([3, 3], "h0", 8)]
    want = _alone(peft, jobs)
    engine = BatchEngine(peft, eos_token_id=EOS, max_batch=3, batch_wait_s=0.05)
    got = _serve(engine, jobs)
    for (tokens, final), ref in zip(got, want):
        assert final == {"done": True, "finish_reason": "length"}
        assert tokens == ref
    assert engine.stats.max_rows == 3  # the batch limit holds, and is reached
    assert engine.stats.requests == len(jobs)


def test_rows_of_different_prompt_lengths_and_adapters_prefill_in_one_forward(monkeypatch):
    peft = _peft()
    jobs = [
        ([1, 2, 3], "h", 4),
        ([4], "lora", 4),
        ([5, 6], None, 4),
        ([7, 8, 9, 10, 11], "lora2", 4),
        ([3, 3], "h0", 4),
    ]
    want = _alone(peft, jobs)
    lm = peft.base_model
    prefills = []
    forward = type(lm).forward

    def counting(self, input_ids=None, *a, **k):
        if input_ids.shape[1] > 1:  # decode steps have one token per row
            prefills.append(input_ids.shape)
        return forward(self, input_ids, *a, **k)

    monkeypatch.setattr(type(lm), "forward", counting)
    engine = BatchEngine(peft, eos_token_id=EOS, batch_wait_s=0.5)
    got = _serve(engine, jobs)
    assert [tokens for tokens, _ in got] == want
    assert engine.stats.max_rows == len(jobs)  # admitted together ...
    assert prefills == [torch.Size([1, 13])]  # ... and prefilled in one packed forward


def _spy_steps(engine) -> list[set]:
    """The adapters of the live rows at every decode step."""
    seen = []
    step = engine._step

    def spy():
        seen.append({r.req.adapter for r in engine._rows})
        step()

    engine._step = spy
    return seen


def test_lora_rows_share_steps_with_other_adapters():
    peft = _peft()
    jobs = [([1, 2], "h", 5), ([1, 2], "lora", 5), ([3], "lora2", 4), ([1, 2], None, 5), ([4, 5, 6], "lora", 3)]
    want = _alone(peft, jobs)
    assert want[0] != want[1] != want[3]  # the LoRA adapter changes the tokens
    engine = BatchEngine(peft, eos_token_id=EOS, max_batch=8, batch_wait_s=0.05)
    seen = _spy_steps(engine)
    got = _serve(engine, jobs)
    assert [tokens for tokens, _ in got] == want
    assert any({"h", "lora", "lora2", None} <= s for s in seen)


def test_non_mixable_rows_wait_for_their_own_batch():
    peft = _peft()
    engine = BatchEngine(peft, eos_token_id=EOS, max_batch=8, batch_wait_s=0.05)
    seen = _spy_steps(engine)
    engine.start()
    try:
        got = _run(engine, [([1, 2], "h", 4), ([1, 2], "bias", 4), ([3], "lora", 4), ([2], "bias", 4)])
    finally:
        engine.stop()
    assert all(final["done"] for _, final in got)
    # bias never shares a step with another adapter, and the lora request behind it waited (first come, first served)
    assert {"bias"} in seen and all(s == {"bias"} or "bias" not in s for s in seen)
    assert {"h", "lora"} not in seen
    ref = peft.generate(torch.tensor([[1, 2]]), max_new_tokens=4, adapter_names=["bias"], eos_token_id=EOS)
    assert got[1][0] == ref[0, 2:].tolist()


def test_beam_requests_run_alone_between_steps():
    peft = _peft()
    jobs = [([1, 2, 3], "h", 12), ([4, 5], "lora2", 8, 3), ([6], None, 10), ([7, 8], "bias", 6, 2), ([2, 2], "lora", 9)]
    want = _alone(peft, jobs)
    greedy = peft.generate(torch.tensor([[4, 5]]), max_new_tokens=8, adapter_names=["lora2"], eos_token_id=EOS)
    assert greedy[0, 2:].tolist() != want[1]  # beam search changes the tokens here
    engine = BatchEngine(peft, eos_token_id=EOS, max_batch=8, batch_wait_s=0.05)
    seen = _spy_steps(engine)
    live = []
    beam_search = engine._beam_search

    def spy(req):
        live.append((len(seen), {r.req.adapter for r in engine._rows}))
        beam_search(req)

    engine._beam_search = spy
    got = _serve(engine, jobs)
    assert [tokens for tokens, _ in got] == want
    assert all(final == {"done": True, "finish_reason": "length"} for _, final in got)
    assert engine.stats.beam_requests == 2
    # the beam requests ran while the batch of the other three was live, and it went on decoding after them
    assert [rows for _, rows in live] == [{"h", None, "lora"}] * 2
    assert len(seen) > live[-1][0] and all(s <= {"h", None, "lora"} for s in seen)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"num_beams": 0}, "num_beams must be an int in 1..8, got 0"),
        ({"num_beams": MAX_BEAMS + 1}, "num_beams must be an int in 1..8, got 9"),
        ({"num_beams": 2.0}, "got 2.0"),
        ({"num_beams": True}, "got True"),
        ({"num_beams": 2, "do_sample": True}, "num_beams=2 is beam search, which is greedy: do_sample must be false"),
    ],
)
def test_beam_settings_are_checked(kw, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        GenerationSettings(**kw)


def test_a_failing_request_does_not_stop_the_engine():
    peft = _peft()
    engine = BatchEngine(peft, eos_token_id=EOS, batch_wait_s=0.0)
    engine.start()
    try:
        (tokens, bad), = _run(engine, [([10**6], "h", 3)])  # fmt: skip
        (tokens_ok, good), = _run(engine, [([1, 2], "h", 3)])  # fmt: skip
    finally:
        engine.stop()
    assert tokens == [] and "IndexError" in bad["error"]
    assert good["done"] and len(tokens_ok) == 3
    assert engine.stats.errors == 1


def test_submit_needs_a_running_engine():
    engine = BatchEngine(_peft(), eos_token_id=EOS)
    req = GenerationRequest(prompt_ids=[1], adapter=None, settings=GenerationSettings(), emit=lambda e: None)
    with pytest.raises(RuntimeError, match="not running"):
        engine.submit(req)
    with pytest.raises(ValueError, match="max_batch must be >= 1, got 0"):
        BatchEngine(_peft(), eos_token_id=EOS, max_batch=0)


def test_stop_says_so_while_the_worker_still_runs(monkeypatch):
    """A worker stuck in a step past stop()'s timeout: stop raises, and the engine stays "stopping" (no new requests,
    no second worker, the rows left to the worker) until the next stop() sees the worker end; the worker sends its
    row the shutdown event as it ends, and the engine can start again."""
    engine = BatchEngine(_peft(), eos_token_id=EOS, batch_wait_s=0.0)
    entered, release = threading.Event(), threading.Event()
    step = engine._step

    def slow_step():
        entered.set()
        release.wait(timeout=30)
        step()

    monkeypatch.setattr(engine, "_step", slow_step)
    engine.start()
    events: queue.Queue = queue.Queue()

    def request(q: queue.Queue) -> GenerationRequest:
        return GenerationRequest(prompt_ids=[1, 2], adapter="h", settings=GenerationSettings(max_new_tokens=40),
                                 emit=q.put)  # fmt: skip

    engine.submit(request(events))
    try:
        assert entered.wait(timeout=20)
        with pytest.raises(RuntimeError, match=re.escape("worker is still running 0.05 s after stop()")):
            engine.stop(timeout=0.05)
        assert engine.stopping and not engine.running
        with pytest.raises(RuntimeError, match="the engine is stopping: it takes no new requests"):
            engine.submit(request(queue.Queue()))
        with pytest.raises(RuntimeError, match="still stopping: its worker has not ended"):
            engine.start()
        with pytest.raises(RuntimeError, match="still running"):
            engine.stop(timeout=0.01)
        assert all("token" in e for e in list(events.queue))  # the row is still the worker's: no error from stop()
    finally:
        release.set()
    engine.stop(timeout=20)
    assert not engine.stopping and not engine.running
    got = list(events.queue)
    assert got[-1] == {"error": "the server is shutting down"} and all("token" in e for e in got[:-1])
    engine.stop()  # stopped: a no-op
    with pytest.raises(RuntimeError, match="not running"):
        engine.submit(request(queue.Queue()))
    monkeypatch.setattr(engine, "_step", step)
    ((tokens, done),) = _serve(engine, [([1, 2], "h", 3)])
    assert done == {"done": True, "finish_reason": "length"} and len(tokens) == 3


def test_requests_waiting_at_stop_get_the_shutdown_event():
    """Requests queued behind a busy worker are not dropped: the worker sends each the shutdown event as it ends."""
    engine = BatchEngine(_peft(), eos_token_id=EOS, batch_wait_s=0.0, max_batch=1)
    qs = [queue.Queue() for _ in range(3)]
    engine.start()
    for q in qs:
        engine.submit(GenerationRequest(prompt_ids=[3], adapter=None, settings=GenerationSettings(max_new_tokens=500),
                                        emit=q.put))  # fmt: skip
    qs[0].get(timeout=20)  # the first one is decoding
    engine.stop(timeout=20)
    for q in qs:
        got = list(q.queue)
        assert got[-1] == {"error": "the server is shutting down"}, got[-1:]
        assert all("token" in e for e in got[:-1])


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"seed": 2**64}, "seed must be an int in 0..18446744073709551615 (64 bits) or None, got 18446744073709551616"),
        ({"seed": -1}, "seed must be an int in 0..18446744073709551615"),
        ({"temperature": 0.0}, "temperature must be a number in [0.0001, 100.0], got 0.0"),
        ({"temperature": float("nan")}, "got nan"),
        ({"temperature": float("inf")}, "got inf"),
        ({"top_p": 0.0}, "top_p must be a number in (0, 1] or None, got 0.0"),
        ({"top_k": 0}, "top_k must be an int >= 1 or None, got 0"),
        ({"max_new_tokens": "8"}, "max_new_tokens must be an int >= 1, got '8'"),
    ],
)
def test_sampling_settings_that_cannot_work_are_refused(kw, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        GenerationSettings(**kw)
    GenerationSettings(seed=2**64 - 1, temperature=1e-4, do_sample=True)  # the ends of the ranges work


def test_a_failing_row_fails_alone_and_its_neighbours_keep_their_tokens():
    """Two requests that fail inside the worker (one at set-up: a seed torch refuses; one at sampling: a temperature
    whose softmax is not finite) decode beside good rows of the same prompt length: each bad one gets its own error,
    each good one the tokens it gets alone, and the engine keeps serving."""
    peft = _peft()
    good = [([1, 2], "h", 5), ([3, 4], None, 5), ([5, 6], "lora", 5)]
    want = _alone(peft, good)
    engine = BatchEngine(peft, eos_token_id=EOS, batch_wait_s=0.2)
    engine.start()
    try:
        bad_seed = GenerationSettings(max_new_tokens=5, do_sample=True, seed=1)
        bad_seed.seed = 2**64  # past validation, as a caller that mutates settings could do
        bad_temp = GenerationSettings(max_new_tokens=5, do_sample=True, seed=1)
        bad_temp.temperature = float("nan")
        qs = []
        settings = [GenerationSettings(max_new_tokens=5), bad_seed, GenerationSettings(max_new_tokens=5), bad_temp,
                    GenerationSettings(max_new_tokens=5)]  # fmt: skip
        jobs = [good[0], ([7, 8], "h", 5), good[1], ([9, 10], "h0", 5), good[2]]
        for (ids, adapter, _), s in zip(jobs, settings):
            q: queue.Queue = queue.Queue()
            engine.submit(GenerationRequest(prompt_ids=ids, adapter=adapter, settings=s, emit=q.put))
            qs.append(q)
        events = []
        for q in qs:
            got = [q.get(timeout=20)]
            while "token" in got[-1]:
                got.append(q.get(timeout=20))
            events.append(got)
        assert engine.stats.max_rows >= 3  # the good rows decoded together
        (again,) = _run(engine, [([1, 2], "h", 5)])
    finally:
        engine.stop()
    for i, w in zip((0, 2, 4), want):
        assert [e["token"] for e in events[i][:-1]] == w and events[i][-1] == {"done": True, "finish_reason": "length"}
    assert "Overflow" in events[1][-1]["error"] and len(events[1]) == 1
    assert "not finite" in events[3][-1]["error"] and len(events[3]) == 1
    assert again[0] == want[0]
    assert engine.stats.errors == 2
