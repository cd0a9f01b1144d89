"""The serving engine on a hybrid model: requests run in groups through transformers' generate (prompts left-padded,
one adapter per row), each row's tokens those of the request alone; beam and seeded sampled requests run alone."""

from __future__ import annotations

import queue
import sys
from pathlib import Path

import pytest
import torch
from _gdn import GDN_FAMILIES, MIXER_LINEARS
from _hybrid import FAMILIES, tiny_hybrid

from ssmtune import BitFitConfig, InitialStateConfig, LoraConfig, StateOffsetConfig, get_peft_model
from ssmtune.serve import BatchEngine, GenerationRequest, GenerationSettings

sys.path.insert(0, str(Path(__file__).parents[1] / "serve"))
from test_engine import _serve

sys.path.insert(0, str(Path(__file__).parents[1] / "methods"))
from _peft_cases import perturb

pytestmark = pytest.mark.timeout(120)
EOS = 1000  # outside the tiny vocabulary (128): every request runs to its max_new_tokens


def _alone(peft, jobs, eos=EOS) -> list[list[int]]:
    """Each job's tokens from PeftModel.generate, one prompt at a time (no padding)."""
    out = []
    for ids, adapter, n, *beams in jobs:
        gen = peft.generate(torch.tensor([ids]), max_new_tokens=n, adapter_names=[adapter], eos_token_id=eos,
                            pad_token_id=eos, num_beams=beams[0] if beams else 1)  # fmt: skip
        out.append(gen[0, len(ids) :].tolist())
    return out


def _events(q: queue.Queue) -> tuple[list[int], dict]:
    """A request's tokens and final event, from the queue its emit fills."""
    tokens = []
    while "token" in (event := q.get(timeout=60)):
        tokens.append(event["token"])
    return tokens, event


def _adapted(family: str, *extra):
    """State-offset "h", Initial State "h0" and LoRA "lora" (a mixer Linear and q_proj), perturbed; then ``extra``."""
    peft = get_peft_model(tiny_hybrid(family), StateOffsetConfig(), adapter_name="h")
    peft.add_adapter("h0", InitialStateConfig(conv_state=True))
    mixer = MIXER_LINEARS[family][-1:] if family in MIXER_LINEARS else ["out_proj"]
    peft.add_adapter("lora", LoraConfig(r=2, target_modules=[*mixer, "q_proj"]))
    for name, config in extra:
        peft.add_adapter(name, config)
    for name in peft.adapter_names:
        peft.set_adapter(name)
        perturb(peft, 2.0)  # enough for every adapter to change greedy tokens of these tiny models
    return peft.eval()


def _engine(peft, jobs, eos=EOS) -> BatchEngine:
    # room for every job: the first collection takes them all (it stops waiting once max_batch have come)
    return BatchEngine(peft, eos_token_id=eos, max_batch=len(jobs), batch_wait_s=5.0)


# prompts of 1 to 9 tokens (left padding of 0 to 8), max_new_tokens 3 to 7, every adapter kind and none
MIXED = [
    ([5, 9, 2, 7, 1, 3, 8, 4, 6], "h", 6),
    ([4, 5], "lora", 5),
    ([7], "h0", 7),  # one token: the initial state still shows in the greedy tokens
    ([6, 8, 3, 2], None, 6),
    ([11, 12, 13, 14, 15, 16], "lora", 3),
    ([2, 2, 2], "h", 7),
    ([9, 10, 11, 12, 13], None, 4),
]


@pytest.mark.parametrize("family", FAMILIES + GDN_FAMILIES)
def test_grouped_requests_match_each_alone(family):
    """One generate call for requests of mixed adapters and prompt lengths: every row's tokens are those of its
    request alone (left padding changes no token), each cut at its own max_new_tokens."""
    peft = _adapted(family)
    want = _alone(peft, MIXED)
    engine = _engine(peft, MIXED)
    assert engine.solo
    got = _serve(engine, MIXED)
    assert [tokens for tokens, _ in got] == want
    assert all(final == {"done": True, "finish_reason": "length"} for _, final in got)
    assert (engine.stats.generate_calls, engine.stats.max_rows, engine.stats.max_adapters) == (1, len(MIXED), 4)
    assert engine.stats.steps == 0  # transformers' generate decoded them, not the engine's own batch
    with torch.no_grad():
        base = _alone(peft, [(ids, None, n) for ids, _, n in MIXED])
    # the State-offset and LoRA rows' adapters act (a row routed to no adapter would show); Initial State's tokens
    # need not differ (Falcon-H1's do not, the state decays)
    acts = [w != b for (w, b, (_, a, _)) in zip(want, base, MIXED) if a != "h0"]
    assert acts == [a is not None for _, a, _ in MIXED if a != "h0"]


@pytest.mark.parametrize("family", ["bamba", "qwen3_5_text"])
def test_graphed_groups_match_each_alone(family, monkeypatch):
    """``cuda_graph=True`` on a hybrid's engine: its groups decode through the hybrid's static step (on the CPU
    without capture), every row's tokens still those of its request alone."""
    from ssmtune.models import hybrid_decode

    peft = _adapted(family)
    want = _alone(peft, MIXED)
    steps = []
    step_call = hybrid_decode.HybridDecoder.step_call
    monkeypatch.setattr(
        hybrid_decode.HybridDecoder, "step_call", lambda self, kw: steps.append(1) or step_call(self, kw)
    )
    engine = BatchEngine(peft, eos_token_id=EOS, max_batch=len(MIXED), batch_wait_s=5.0, cuda_graph=True)
    assert engine.hybrid_graph
    got = _serve(engine, MIXED)
    assert [tokens for tokens, _ in got] == want
    assert steps, "the group did not decode through the hybrid's static step"
    assert not BatchEngine(peft, eos_token_id=EOS).hybrid_graph  # the default stays transformers' eager decoding


def test_rows_stop_at_their_eos():
    """A row that reaches EOS ends there ("eos", the EOS not sent); the others go on to their own length."""
    peft = _adapted("falcon_h1")
    jobs = MIXED[:4]
    plain = _alone(peft, jobs)
    eos = plain[0][2]  # row 0's third token
    want = [tokens[: tokens.index(eos)] if eos in tokens else tokens for tokens in _alone(peft, jobs, eos=eos)]
    assert len(want[0]) == 2 and any(len(w) == n for w, (_, _, n) in zip(want, jobs))  # both endings happen
    engine = _engine(peft, jobs, eos=eos)
    got = _serve(engine, jobs)
    assert [tokens for tokens, _ in got] == want
    reasons = [final["finish_reason"] for _, final in got]
    assert reasons == ["length" if len(w) == n else "eos" for w, (_, _, n) in zip(want, jobs)]
    assert engine.stats.generate_calls == 1


def test_unroutable_adapter_groups_alone_and_beams_run_alone():
    """BitFit rows share a call with BitFit rows only; a beam request runs alone; the tokens are each request's own."""
    peft = _adapted("bamba", ("bias", BitFitConfig()))
    jobs = [([1, 2, 3], "bias", 5), ([4, 5], "h", 5), ([6], "bias", 4), ([7, 8], "lora", 5, 2), ([9], None, 3)]
    want = _alone(peft, jobs)
    engine = _engine(peft, jobs)
    got = _serve(engine, jobs)
    assert [tokens for tokens, _ in got] == want
    # calls: the two BitFit rows; "h" with None (the beam request waits apart); the beam request alone
    assert (engine.stats.generate_calls, engine.stats.beam_requests, engine.stats.max_rows) == (2, 1, 2)


def test_sampled_requests_follow_their_seed():
    engine = BatchEngine(tiny_hybrid("zamba2"), eos_token_id=EOS, batch_wait_s=0.0)
    engine.start()
    try:
        outs = []
        for seed in (3, 3, 4):
            q: queue.Queue = queue.Queue()
            settings = GenerationSettings(max_new_tokens=8, do_sample=True, temperature=2.0, seed=seed)
            engine.submit(GenerationRequest(prompt_ids=[1, 2], adapter=None, settings=settings, emit=q.put))
            outs.append(_events(q)[0])
    finally:
        engine.stop()
    assert outs[0] == outs[1] != outs[2] and len(outs[0]) == 8


def test_seeded_sampling_runs_alone_unseeded_shares():
    """Seeded sampled requests run alone (the same seed, the same tokens, whatever was submitted with them); unseeded
    ones with equal settings share a call, and other settings start another."""
    engine = BatchEngine(tiny_hybrid("falcon_h1"), eos_token_id=EOS, max_batch=6, batch_wait_s=5.0)
    settings = [
        {"seed": 3},
        {},
        {"seed": 3},
        {},
        {"temperature": 1.5},
        {"seed": 4},
    ]
    engine.start()
    try:
        qs = []
        for kw in settings:
            q: queue.Queue = queue.Queue()
            s = GenerationSettings(max_new_tokens=8, do_sample=True, **{"temperature": 2.0, **kw})
            engine.submit(GenerationRequest(prompt_ids=[1, 2], adapter=None, settings=s, emit=q.put))
            qs.append(q)
        got = [_events(q) for q in qs]
    finally:
        engine.stop()
    outs = [tokens for tokens, _ in got]
    assert all(final == {"done": True, "finish_reason": "length"} for _, final in got)
    assert outs[0] == outs[2] != outs[5] and all(len(o) == 8 for o in outs)
    # seed 3, the two unseeded at 2.0, seed 3, the one at 1.5, seed 4
    assert (engine.stats.generate_calls, engine.stats.max_rows) == (5, 2)


def test_cancelled_row_stops_the_others_go_on():
    """A row cancelled mid-call (client gone) gets no more events; the call goes on for the others."""
    peft = _adapted("qwen3_5_text")
    jobs = MIXED[:3]
    want = _alone(peft, jobs)
    engine = _engine(peft, jobs)
    engine.start()
    try:
        qs, reqs = [], []
        for ids, adapter, n in jobs:
            q: queue.Queue = queue.Queue()
            req = GenerationRequest(prompt_ids=ids, adapter=adapter, settings=GenerationSettings(max_new_tokens=n),
                                    emit=q.put)  # fmt: skip
            qs.append(q)
            reqs.append(req)
        emit0 = reqs[0].emit

        def cancel_after_two(event):
            emit0(event)
            if qs[0].qsize() == 2:
                reqs[0].cancelled.set()

        reqs[0].emit = cancel_after_two
        for req in reqs:
            engine.submit(req)
        outs = [_events(q)[0] for q in qs[1:]]
    finally:
        engine.stop()
    assert outs == want[1:]
    assert [qs[0].get_nowait()["token"] for _ in range(2)] == want[0][:2] and qs[0].empty()
