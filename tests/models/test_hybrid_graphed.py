"""Graphed decoding of the transformers hybrids (models/hybrid_decode.py): ``generate(cuda_graph=True)`` gives the
tokens of ``generate(cuda_graph=False)`` (transformers' eager generate), greedy and seeded sampling, with adapters per
row, left padding, EOS and ``min_new_tokens``. On the CPU the static step runs without capture; ``-m gpu`` compares a
captured step with the eager one on CUDA."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
from _gdn import MIXER_LINEARS
from _hybrid import FAMILIES, ids, tiny_hybrid

from ssmtune import InitialStateConfig, LoraConfig, StateOffsetConfig, get_peft_model
from ssmtune.models.decode import DECODERS_ATTR, clear_decoders

sys.path.insert(0, str(Path(__file__).parents[1] / "methods"))
from _peft_cases import perturb

GRAPHED = ["bamba", "nemotron_h", "granitemoehybrid", "qwen3_5_text", "kimi_linear"]
EAGER = ["falcon_h1", "zamba2"]  # not marked graph-safe by transformers: the eager path, with a warning


def _lora_targets(family: str) -> list[str]:
    return ["out_proj"] if family in FAMILIES else MIXER_LINEARS[family][-1:]


def _adapted(family: str, device: str = "cpu", **overrides):
    """State offsets (h) and a LoRA adapter of the mixer, both moved away from their init."""
    model = get_peft_model(tiny_hybrid(family, **overrides), StateOffsetConfig(), adapter_name="h")
    model.add_adapter("h0", InitialStateConfig(conv_state=True))
    model.add_adapter("lora", LoraConfig(r=2, target_modules=_lora_targets(family)))
    for name in ("h", "h0", "lora"):
        model.set_adapter(name)
        perturb(model)
    model.set_adapter("h")
    return model.to(device).eval()


def _padded(batch: int = 3, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of different lengths (7, 4, 2 real tokens) and their mask."""
    x = ids(batch=batch, length=7).to(device)
    mask = torch.ones_like(x)
    for b, pad in enumerate([0, 3, 5][:batch]):
        x[b, :pad], mask[b, :pad] = 0, 0
    return x, mask


def _decoders(model) -> list:
    return list(model.base_model.__dict__.get(DECODERS_ATTR, {}).values())


def _both(model, *args, seed: int | None = None, **kwargs) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(graphed tokens, eager tokens, warnings of the graphed call), each call seeded alike when ``seed`` is set."""
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        if seed is not None:
            torch.manual_seed(seed)
        graphed = model.generate(*args, cuda_graph=True, **kwargs)
    with torch.no_grad():
        if seed is not None:
            torch.manual_seed(seed)
        eager = model.generate(*args, cuda_graph=False, **kwargs)
    return graphed, eager, [str(w.message) for w in caught if "graph" in str(w.message)]


@pytest.mark.parametrize("family", GRAPHED)
def test_greedy_left_padded_eos_min_new_tokens(family):
    model = _adapted(family)
    x, mask = _padded()
    base = {"attention_mask": mask, "do_sample": False, "pad_token_id": 0, "max_new_tokens": 8}
    graphed, eager, warned = _both(model, x, **base)
    assert torch.equal(graphed, eager) and not warned
    (decoder,) = _decoders(model)
    assert decoder.served == 7 and decoder.captures == 1  # every step after the prefill ran on the static buffers
    # an EOS the rows produce, held back for the first tokens: rows stop at different steps
    eos = int(eager[0, 9])
    graphed, eager, warned = _both(model, x, **base, eos_token_id=eos, min_new_tokens=3)
    assert torch.equal(graphed, eager) and not warned
    assert decoder.captures == 1  # the same decoder, buffers and step served the second call


@pytest.mark.parametrize("family", GRAPHED)
def test_adapters_per_row_and_lora_rows(family):
    model = _adapted(family)
    x, mask = _padded(batch=3)
    x, mask = torch.cat([x, x[:1]]), torch.cat([mask, mask[:1]])
    rows = ["h", "lora", None, "h0"]
    kw = {"attention_mask": mask, "do_sample": False, "pad_token_id": 0, "max_new_tokens": 6, "min_new_tokens": 6}
    graphed, eager, warned = _both(model, x, adapter_names=rows, **kw)
    assert torch.equal(graphed, eager) and not warned
    # the offsets act per row: row 0 (h) and row 3 (h0, same prompt) differ
    assert not torch.equal(graphed[0], graphed[3])
    # State rows only: the offsets come from the static table, one entry per adapter
    graphed, eager, _ = _both(model, x, adapter_names=["h", None, "h", "h0"], **kw)
    assert torch.equal(graphed, eager)


@pytest.mark.parametrize("family", GRAPHED)
def test_seeded_sampling(family):
    model = _adapted(family)
    x, mask = _padded()
    kw = {"attention_mask": mask, "do_sample": True, "top_k": 20, "temperature": 0.8, "pad_token_id": 0}
    graphed, eager, warned = _both(model, x, seed=7, max_new_tokens=8, **kw)
    assert torch.equal(graphed, eager) and not warned
    again, _, _ = _both(model, x, seed=8, max_new_tokens=8, **kw)
    assert not torch.equal(graphed, again)  # the seed matters: sampling, not argmax


@pytest.mark.parametrize("family", EAGER)
def test_family_without_graph_falls_back_with_warning(family):
    model = _adapted(family)
    x, mask = _padded()
    graphed, eager, warned = _both(model, x, attention_mask=mask, do_sample=False, pad_token_id=0, max_new_tokens=5)
    assert torch.equal(graphed, eager)
    assert len(warned) == 1 and family in warned[0] and "_can_compile_fullgraph" in warned[0]
    assert not _decoders(model)


def test_beam_search_stays_eager():
    model = _adapted("bamba")
    x = ids(batch=2, length=5)
    graphed, eager, warned = _both(model, x, num_beams=2, do_sample=False, pad_token_id=0, max_new_tokens=4)
    assert torch.equal(graphed, eager)
    assert len(warned) == 1 and "beam search" in warned[0]


@pytest.mark.parametrize("family", ["bamba", "qwen3_5_text"])
def test_states_update_in_place(family):
    """The hosted mixers write the static cache's conv / recurrent states in place: the buffers keep their addresses
    through the prefill and every step, and the step changes them."""
    from ssmtune.models.hybrid_decode import _cache_tensors

    model = _adapted(family)
    x = ids(batch=2, length=5)
    with torch.no_grad():
        model.generate(x, cuda_graph=True, do_sample=False, pad_token_id=0, max_new_tokens=3)
        (decoder,) = _decoders(model)
        before = [(t.data_ptr(), t.clone()) for t in _cache_tensors(decoder.cache)]
        model.generate(x[:, :4], cuda_graph=True, do_sample=False, pad_token_id=0, max_new_tokens=3)
    after = _cache_tensors(decoder.cache)
    assert [p for p, _ in before] == [t.data_ptr() for t in after]
    assert any(not torch.equal(t, old) for (_, old), t in zip(before, after))
    clear_decoders(model.base_model)
    assert not _decoders(model)


def test_decoders_kept_are_bounded(monkeypatch):
    """Each batch size gets a decoder of its own (the batch is exact); beyond ``KEPT_DECODERS`` the least recently
    used is dropped, and a decoder in use stays."""
    from ssmtune.models import hybrid_decode

    monkeypatch.setattr(hybrid_decode, "KEPT_DECODERS", 2)
    model = _adapted("bamba")

    def run(batch: int) -> None:
        with torch.no_grad():
            model.generate(ids(batch=batch, length=4), cuda_graph=True, do_sample=False, pad_token_id=0,
                           max_new_tokens=2)  # fmt: skip

    run(1)
    (first,) = _decoders(model)
    run(2)
    run(1)  # the batch of 1 is now the most recently used
    run(3)
    assert [d.bucket for d in _decoders(model)] == [1, 3] and _decoders(model)[0] is first
    run(4)
    assert [d.bucket for d in _decoders(model)] == [3, 4]


class _ReplayedForward:
    """A stand-in for a CUDA graph on the CPU: ``replay()`` reruns the captured forward on the same static inputs
    and writes the captured output's logits in place, as a replay does."""

    def __init__(self, forward) -> None:
        self.forward = forward

    def replay(self) -> None:
        self.out.logits.copy_(self.forward().logits)


def _fake_capture(fail: bool):
    def capture(forward, device, warmup=2):
        for _ in range(warmup):  # the warm-up writes the cache for real, as on CUDA
            forward()
        if fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        graph = _ReplayedForward(forward)
        graph.out = forward()
        return graph, graph.out

    return capture


@pytest.mark.parametrize("fail", [False, True])
def test_capture_and_replay_logic(monkeypatch, fail):
    """The capture path on the CPU, with a stand-in graph: the warm-up's writes to the cache are undone, replays read
    the static inputs; a capture that fails warns once and the call decodes eagerly, with the same tokens."""
    from ssmtune.models import hybrid_decode

    monkeypatch.setattr(hybrid_decode, "_capturing", lambda model: True)
    monkeypatch.setattr(hybrid_decode, "capture_graph", _fake_capture(fail))
    model = _adapted("qwen3_5_text")
    x, mask = _padded()
    kw = {"attention_mask": mask, "do_sample": False, "pad_token_id": 0, "max_new_tokens": 6}
    graphed, eager, warned = _both(model, x, adapter_names=["h", None, "h0"], **kw)
    assert torch.equal(graphed, eager)
    (decoder,) = _decoders(model)
    if fail:
        assert len(warned) == 1 and "the capture failed (RuntimeError: operation not permitted" in warned[0]
        assert decoder.replays == 0 and not decoder.capture
    else:
        assert not warned and decoder.replays == 5  # every step a replay, the first right after its capture


@pytest.mark.parametrize("default", [False, True])
def test_default_follows_graphed_by_default(monkeypatch, default):
    """``cuda_graph=None`` replays (stand-in graph, as if on CUDA) when ``GRAPHED_BY_DEFAULT`` is on and the call can
    be replayed; what cannot (beam search here) decodes eagerly without a warning; off, None decodes eagerly."""
    from ssmtune.models import hybrid_decode

    monkeypatch.setattr(hybrid_decode, "GRAPHED_BY_DEFAULT", default)
    monkeypatch.setattr(hybrid_decode, "_capturing", lambda model: True)
    monkeypatch.setattr(hybrid_decode, "capture_graph", _fake_capture(False))
    model = _adapted("qwen3_5_text")
    x, mask = _padded()
    kw = {"attention_mask": mask, "pad_token_id": 0, "max_new_tokens": 5}
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        auto = model.generate(x, do_sample=False, **kw)
        beams = model.generate(x, num_beams=2, do_sample=False, **kw)
    with torch.no_grad():
        eager = model.generate(x, cuda_graph=False, do_sample=False, **kw)
        eager_beams = model.generate(x, cuda_graph=False, num_beams=2, do_sample=False, **kw)
    assert torch.equal(auto, eager) and torch.equal(beams, eager_beams)
    assert not [w for w in caught if "graph" in str(w.message)]
    replays = [d.replays for d in _decoders(model)]
    assert replays == ([4] if default else [])


def test_default_is_eager_off_cuda(monkeypatch):
    from ssmtune.models import hybrid_decode

    monkeypatch.setattr(hybrid_decode, "GRAPHED_BY_DEFAULT", True)
    model = _adapted("bamba")
    with torch.no_grad():
        model.generate(ids(batch=1, length=3), do_sample=False, pad_token_id=0, max_new_tokens=3)
    assert _decoders(model) == []


def test_cuda_graph_argument_checked():
    model = _adapted("bamba")
    with pytest.raises(ValueError, match="cuda_graph must be None, True or False, got 'yes'"):
        model.generate(ids(batch=1, length=3), cuda_graph="yes", max_new_tokens=2)


# --- on CUDA: a captured step against the eager one -------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", GRAPHED + EAGER)
def test_captured_matches_eager_on_cuda(family):
    from test_hybrid_gpu import CUDA_SIZES

    model = _adapted(family, "cuda", **CUDA_SIZES.get(family, {}))
    x, mask = _padded(device="cuda")
    kw = {"attention_mask": mask, "pad_token_id": 0, "max_new_tokens": 12}
    graphed, eager, warned = _both(model, x, do_sample=False, **kw)
    assert torch.equal(graphed, eager)
    if family in EAGER:
        assert len(warned) == 1 and family in warned[0]
        return
    assert not warned, warned  # a capture that failed says why here
    (decoder,) = _decoders(model)
    assert decoder.replays == 11
    graphed, eager, _ = _both(model, x, adapter_names=["h", None, "h0"], do_sample=False, **kw)
    assert torch.equal(graphed, eager)
    graphed, eager, _ = _both(model, x, seed=3, do_sample=True, top_k=20, **kw)
    assert torch.equal(graphed, eager)


def test_state_dtype_is_refused_on_a_hybrid() -> None:
    # transformers' cache keeps the hybrids' states: the option is for ssmtune's own Mamba models
    from ssmtune.serve import BatchEngine

    model = _adapted(FAMILIES[0])
    msg = r"^state_dtype=torch.bfloat16 is not supported on a transformers hybrid \(transformers' cache keeps its "
    msg += r"states\)$"
    with pytest.raises(ValueError, match=msg):
        model.generate(ids(), max_new_tokens=2, state_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=msg):
        model.generate(ids(), max_new_tokens=2, state_dtype=torch.bfloat16, adapter_names=["h", "h"])
    with pytest.raises(ValueError, match=msg):
        BatchEngine(model, eos_token_id=0, state_dtype=torch.bfloat16)
