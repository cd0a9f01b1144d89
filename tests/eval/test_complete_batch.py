"""Batched generation for evaluation (eval/generation.py ``complete_batch``): prompts of different lengths in one
``generate`` call give each prompt the text it gets alone, in the order given, greedy and with beams, on ssmtune's
Mamba models (state adapters, prefix, Prompt Tuning) and on a swapped transformers hybrid."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ssmtune import InitialStateConfig, PrefixTuningConfig, PromptTuningConfig, StateOffsetConfig, get_peft_model
from ssmtune.eval.generation import complete, complete_batch

sys.path.insert(0, str(Path(__file__).parents[1] / "methods"))
sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
from _peft_cases import VOCAB, perturb, tiny_model

CONFIGS = {
    "state_offset_h": StateOffsetConfig(),
    "initial_state": InitialStateConfig(conv_state=True),
    "prefix": PrefixTuningConfig(num_virtual_tokens=2),
    "prompt": PromptTuningConfig(num_virtual_tokens=2),
}


class Tok:
    """Token ids as text; EOS 3 (random models produce it now and then, so rows stop at different steps)."""

    eos_token_id, pad_token_id = 3, 0

    def decode(self, ids):
        return " ".join(map(str, ids))


def _prompts(n: int = 5, vocab: int = VOCAB) -> list[list[int]]:
    g = torch.Generator().manual_seed(n)
    lengths = [7, 2, 5, 9, 4, 3, 6][:n]
    return [torch.randint(4, vocab, (length,), generator=g).tolist() for length in lengths]


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("arch", ["m1", "m2"])
def test_batched_equals_one_by_one(arch, method, num_beams):
    model = get_peft_model(tiny_model(arch), CONFIGS[method])
    perturb(model)
    model.eval()
    prompts = _prompts()
    kw = {"max_new_tokens": 6, "num_beams": num_beams, "min_new_tokens": 1}
    alone = [complete(model, Tok(), p, **kw) for p in prompts]
    assert complete_batch(model, Tok(), prompts, batch_size=3, **kw) == alone  # two calls: 3 rows, then 2
    assert complete_batch(model, Tok(), prompts, batch_size=8, **kw) == alone
    assert len(set(alone)) >= 3  # the rows differ: a row read from another prompt would show


@pytest.mark.parametrize("num_beams", [1, 2])
@pytest.mark.parametrize("family", ["qwen3_5_text", "bamba"])
def test_batched_equals_one_by_one_on_a_hybrid(family, num_beams):
    from _hybrid import VOCAB as HYBRID_VOCAB
    from _hybrid import tiny_hybrid

    model = get_peft_model(tiny_hybrid(family), StateOffsetConfig())
    perturb(model)
    model.eval()
    prompts = _prompts(4, HYBRID_VOCAB)
    kw = {"max_new_tokens": 5, "num_beams": num_beams}
    alone = [complete(model, Tok(), p, **kw) for p in prompts]
    assert complete_batch(model, Tok(), prompts, batch_size=4, **kw) == alone
    assert len(set(alone)) >= 2


def test_cuda_graph_reaches_a_swapped_hybrid(monkeypatch):
    """``--eval.cuda_graph`` reaches the swapped hybrid's generate as it does a Mamba model's (False off CUDA)."""
    from _hybrid import tiny_hybrid

    from ssmtune.models.hybrid_decode import GenerateWithGraph

    model = get_peft_model(tiny_hybrid("bamba"), StateOffsetConfig())
    seen, call = [], GenerateWithGraph.__call__
    monkeypatch.setattr(GenerateWithGraph, "__call__", lambda self, *a, **kw: seen.append(kw.get("cuda_graph", "absent"))
                        or call(self, *a, **kw))  # fmt: skip
    complete(model, Tok(), [5, 6, 7], max_new_tokens=2, cuda_graph=True)
    assert seen == [False]


def test_bad_input_is_refused():
    model = tiny_model("m1")
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        complete_batch(model, Tok(), [[5, 6]], batch_size=0)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        complete_batch(model, Tok(), [[5, 6], []], batch_size=2)
