"""BatchEngine decoding on a GraphedDecoder (run eagerly on the CPU): rows join, leave and mix adapters with the same
tokens as generate alone; the states move between the decoder's buffers and the engine's cache."""

from __future__ import annotations

import pytest
from test_engine import EOS, _alone, _peft, _serve

from ssmtune.serve import BatchEngine

pytestmark = pytest.mark.timeout(60)


def _spy_decoders(engine) -> list:
    seen = []
    step = engine._step

    def spy():
        step()
        seen.append(engine._decoder)

    engine._step = spy
    return seen


def test_graphed_engine_matches_generate_alone():
    peft = _peft()
    # a batch limit of 3: rows join and leave while others decode; a beam request pauses the batch
    jobs = [([1, 2, 3], "h", 9), ([4], "h0", 3), ([5, 6], None, 7), ([7, 8, 9, 10], "h", 5), ([3, 3], "h0", 8),
            ([2, 4], "h", 6, 2), ([1], None, 4)]  # fmt: skip
    want = _alone(peft, jobs)
    engine = BatchEngine(peft, eos_token_id=EOS, max_batch=3, batch_wait_s=0.05, cuda_graph=True)
    seen = _spy_decoders(engine)
    got = _serve(engine, jobs)
    assert [tokens for tokens, _ in got] == want
    assert any(seen)  # steps ran on the decoder


def test_graphed_engine_with_lora_rows():
    peft = _peft()
    jobs = [([1, 2], "h", 5), ([1, 2], "lora", 5), ([3], "lora2", 4), ([1, 2], None, 5), ([4, 5, 6], "lora", 3)]
    want = _alone(peft, jobs)
    engine = BatchEngine(peft, eos_token_id=EOS, max_batch=8, batch_wait_s=0.05, cuda_graph=True)
    assert [tokens for tokens, _ in _serve(engine, jobs)] == want


def test_auto_is_eager_on_cpu():
    assert BatchEngine(_peft(), eos_token_id=EOS).cuda_graph is False


@pytest.mark.gpu
def test_cuda_graphed_engine_matches_eager_engine():
    peft = _peft().cuda()
    jobs = [([1, 2, 3], "h", 9), ([4], "h0", 3), ([5, 6], None, 7), ([7, 8, 9, 10], "h", 5), ([3, 3], "h0", 8),
            ([2, 4], "h", 6, 2), ([1], None, 4), ([1, 2], "lora", 5)]  # fmt: skip
    got = {}
    for cg in (False, None):
        engine = BatchEngine(peft, eos_token_id=EOS, max_batch=4, batch_wait_s=0.05, cuda_graph=cg)
        seen = _spy_decoders(engine)
        got[cg] = [tokens for tokens, _ in _serve(engine, jobs)]
    assert got[None] == got[False]
    assert any(d and d.graph is not None for d in seen)  # the graphed engine replayed captured steps


@pytest.mark.parametrize("cuda_graph", [True, False], ids=["decoder", "eager"])
def test_bf16_state_engine_matches_generate_alone(cuda_graph):
    import torch

    peft = _peft()
    jobs = [([1, 2, 3], "h", 7), ([4], "h0", 3), ([5, 6], None, 6), ([2, 4], "h", 5, 2), ([7, 8], "h", 4)]
    want = []
    for ids, adapter, n, *beams in jobs:
        gen = peft.generate(torch.tensor([ids]), max_new_tokens=n, adapter_names=[adapter], eos_token_id=EOS,
                            num_beams=beams[0] if beams else 1, state_dtype=torch.bfloat16)  # fmt: skip
        want.append(gen[0, len(ids) :].tolist())
    engine = BatchEngine(peft, eos_token_id=EOS, max_batch=3, batch_wait_s=0.05, cuda_graph=cuda_graph,
                         state_dtype=torch.bfloat16)  # fmt: skip
    dtypes = []
    step = engine._step

    def spy():
        dec = engine._decoder
        states = dec.cache if dec else engine._cache
        dtypes.append(states.layers[0].ssm_state.dtype)
        step()

    engine._step = spy
    assert [tokens for tokens, _ in _serve(engine, jobs)] == want
    assert dtypes and set(dtypes) == {torch.bfloat16}


def test_engine_state_dtype_is_checked():
    import torch

    with pytest.raises(ValueError, match=r"^state_dtype must be None, .* got torch.float64$"):
        BatchEngine(_peft(), eos_token_id=EOS, state_dtype=torch.float64)
