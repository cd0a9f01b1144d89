"""The serving engine on a hybrid model: each request runs alone through transformers' generate, with its adapter."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from _hybrid import tiny_hybrid

from ssmtune import InitialStateConfig, LoraConfig, StateOffsetConfig, get_peft_model
from ssmtune.serve import BatchEngine

sys.path.insert(0, str(Path(__file__).parents[1] / "serve"))
from test_engine import _serve

sys.path.insert(0, str(Path(__file__).parents[1] / "methods"))
from _peft_cases import perturb

pytestmark = pytest.mark.timeout(120)
EOS = 1000  # outside the tiny vocabulary (128): every request runs to its max_new_tokens


def _alone(peft, jobs) -> list[list[int]]:
    """Each job's tokens from PeftModel.generate, one prompt at a time."""
    out = []
    for ids, adapter, n, *beams in jobs:
        gen = peft.generate(torch.tensor([ids]), max_new_tokens=n, adapter_names=[adapter], eos_token_id=EOS,
                            pad_token_id=EOS, num_beams=beams[0] if beams else 1)  # fmt: skip
        out.append(gen[0, len(ids) :].tolist())
    return out


@pytest.mark.parametrize("family", ["bamba", "qwen3_5_text"])
def test_requests_match_generate_alone(family):
    peft = get_peft_model(tiny_hybrid(family), StateOffsetConfig(), adapter_name="h")
    peft.add_adapter("h0", InitialStateConfig(conv_state=True))
    peft.add_adapter("lora", LoraConfig(r=2, target_modules=["out_proj", "q_proj"]))
    for name in peft.adapter_names:
        peft.set_adapter(name)
        perturb(peft)
    peft.eval()
    jobs = [([1, 2, 3], "h", 6), ([4, 5], "lora", 5, 2), ([6], None, 4), ([7, 8], "h0", 6)]
    want = _alone(peft, jobs)
    engine = BatchEngine(peft, eos_token_id=EOS, max_batch=4, batch_wait_s=0.05)
    assert engine.solo
    got = _serve(engine, jobs)
    assert [tokens for tokens, _ in got] == want
    assert all(final == {"done": True, "finish_reason": "length"} for _, final in got)
    assert engine.stats.steps == 0  # no shared decode step: every request ran alone
    with torch.no_grad():
        other = _alone(peft, [([1, 2, 3], "h0", 6)])[0]
    assert want[0] != other  # the adapter of the request acts


def test_sampled_requests_follow_their_seed():
    import queue

    from ssmtune.serve import GenerationRequest, GenerationSettings

    engine = BatchEngine(tiny_hybrid("zamba2"), eos_token_id=EOS, batch_wait_s=0.0)
    engine.start()
    try:
        outs = []
        for seed in (3, 3, 4):
            q: queue.Queue = queue.Queue()
            settings = GenerationSettings(max_new_tokens=8, do_sample=True, temperature=2.0, seed=seed)
            engine.submit(GenerationRequest(prompt_ids=[1, 2], adapter=None, settings=settings, emit=q.put))
            events = [q.get(timeout=60)]
            while "token" in events[-1]:
                events.append(q.get(timeout=60))
            outs.append([e["token"] for e in events if "token" in e])
    finally:
        engine.stop()
    assert outs[0] == outs[1] != outs[2] and len(outs[0]) == 8
