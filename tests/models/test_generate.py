"""generate(): greedy == argmax loop without cache, beam search, mixed prompt lengths, EOS, sampling."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from ssmtune.models import Mamba2Config, MambaConfig, causal_lm_for
from ssmtune.models.cache import decode_state_dtype
from ssmtune.models.generate import beam_search, filter_logits, prefill
from ssmtune.models.hooks import StateHook

CONFIGS = {
    "mamba": lambda v: MambaConfig(d_model=24, n_layer=2, vocab_size=v),
    "mamba2": lambda v: Mamba2Config(d_model=24, n_layer=2, vocab_size=v, headdim=8, d_state=16, ngroups=2),
}


class InitStateHook(StateHook):
    def __init__(self, mixer: nn.Module) -> None:
        super().__init__()
        self.h0 = nn.Parameter(torch.randn(mixer.state_shape))
        self.h_off = nn.Parameter(torch.randn(mixer.state_shape) * 0.3)

    def initial_state(self, batch_size: int) -> torch.Tensor:
        return self.h0

    def state_offset(self) -> torch.Tensor:
        return self.h_off


def make_model(arch: str, vocab: int = 64, hooks: bool = False):
    model = causal_lm_for(CONFIGS[arch](vocab)).eval()
    # a sharper output distribution than the tiny init gives, so argmax ties cannot occur
    with torch.no_grad():
        model.backbone.embeddings.weight.mul_(20)
    if hooks:
        for _, mixer in model.mixers():
            mixer.state_hooks["h"] = InitStateHook(mixer)
    return model


def argmax_loop(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding by full forwards without a cache."""
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_greedy_equals_argmax_loop(arch: str) -> None:
    model = make_model(arch, hooks=True)
    ids = torch.randint(0, 64, (2, 5))
    out = model.generate(ids, max_new_tokens=6)
    assert out.shape == (2, 11)
    assert torch.equal(out, argmax_loop(model, ids, 6))


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_beam_search_with_one_beam_is_greedy(arch: str) -> None:
    model = make_model(arch)
    ids = torch.randint(0, 64, (3, 4))
    cache, logits = prefill(model, ids)
    new = beam_search(model, cache, logits, max_new_tokens=5, num_beams=1)
    assert torch.equal(torch.cat([ids, new], 1), model.generate(ids, max_new_tokens=5))


def test_beam_search_with_all_beams_is_exhaustive() -> None:
    # vocab 8 and 8 beams: after two steps every 2-token continuation has been scored
    model = make_model("mamba", vocab=8)
    ids = torch.randint(0, 8, (2, 3))
    out = model.generate(ids, max_new_tokens=2, num_beams=8)
    pairs = torch.tensor(list(itertools.product(range(8), repeat=2)))  # [64, 2]
    with torch.no_grad():
        for b in range(2):
            seqs = torch.cat([ids[b].expand(64, -1), pairs], 1)  # every 2-token continuation
            lp = model(seqs).logits.log_softmax(-1)
            scores = lp[:, 2].gather(1, pairs[:, :1])[:, 0] + lp[:, 3].gather(1, pairs[:, 1:])[:, 0]
            assert torch.equal(out[b], seqs[scores.argmax()])


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_mixed_length_batch_equals_per_row(arch: str, side: str) -> None:
    model = make_model(arch, hooks=True)
    rows = [torch.randint(1, 64, (n,)) for n in (6, 3, 5)]
    ids = torch.zeros(3, 6, dtype=torch.long)
    mask = torch.zeros(3, 6, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(6 - len(r), 6) if side == "left" else slice(0, len(r))
        ids[i, sl], mask[i, sl] = r, 1
    for kwargs in ({}, {"num_beams": 3}):
        out = model.generate(ids, max_new_tokens=4, attention_mask=mask, **kwargs)
        for i, r in enumerate(rows):
            alone = model.generate(r[None], max_new_tokens=4, **kwargs)
            assert torch.equal(out[i, 6:], alone[0, len(r) :]), (kwargs, i)
            assert torch.equal(out[i, :6], ids[i])


def test_eos_stops_and_min_new_tokens() -> None:
    model = make_model("mamba2")
    ids = torch.randint(0, 64, (1, 4))
    greedy = model.generate(ids, max_new_tokens=5)
    eos = int(greedy[0, 4])
    stopped = model.generate(ids, max_new_tokens=5, eos_token_id=eos)
    assert stopped.shape == (1, 5) and stopped[0, 4] == eos
    forced = model.generate(ids, max_new_tokens=3, eos_token_id=eos, min_new_tokens=2)
    assert forced.shape == (1, 7) and eos not in forced[0, 4:6].tolist()
    # a finished row is padded while the other keeps going
    two = torch.cat([ids, torch.randint(0, 64, (1, 4))])
    out = model.generate(two, max_new_tokens=5, eos_token_id=eos, pad_token_id=63)
    if out[1, 4] != eos:
        assert out[0, 5:].tolist() == [63] * (out.shape[1] - 5)
    beams = model.generate(ids, max_new_tokens=5, eos_token_id=eos, num_beams=2, min_new_tokens=1)
    assert beams[0, 4] != eos


def test_sampling_is_seeded_and_top_k_one_is_greedy() -> None:
    model = make_model("mamba")
    ids = torch.randint(0, 64, (2, 4))
    a = model.generate(ids, 6, do_sample=True, generator=torch.Generator().manual_seed(1), temperature=2.0)
    b = model.generate(ids, 6, do_sample=True, generator=torch.Generator().manual_seed(1), temperature=2.0)
    assert torch.equal(a, b)
    g = model.generate(ids, 6, do_sample=True, top_k=1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(g, model.generate(ids, 6))


def test_filter_logits_top_p() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = filter_logits(logits, top_p=0.7).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    assert filter_logits(logits, top_k=3).isfinite().sum() == 3


def test_generate_rejects_bad_arguments() -> None:
    model = make_model("mamba")
    ids = torch.randint(0, 64, (1, 3))
    with pytest.raises(ValueError, match="num_beams must be >= 1, got 0"):
        model.generate(ids, num_beams=0)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(ids, do_sample=True, temperature=0.0)


def test_beam_search_with_more_eos_ids_than_beams_never_returns_padding():
    """With 3 EOS ids ranking first and 2 beams, the 2K candidates hold too few non-EOS tokens; unfilled beam slots
    must not win (they used to keep score 0 and return a pad-only hypothesis)."""
    from types import SimpleNamespace

    from ssmtune.models.cache import InferenceCache
    from ssmtune.models.generate import beam_search

    lp = torch.tensor([[5.0, 5.0, 5.0, -1.0, -2.0, -3.0]]).log_softmax(-1)

    class Constant:
        def __call__(self, ids, cache=None):
            return SimpleNamespace(logits=lp.expand(ids.shape[0], -1)[:, None, :].clone())

    out = beam_search(Constant(), InferenceCache(0), lp.clone(), max_new_tokens=4, num_beams=2, eos=[0, 1, 2], pad=9)
    assert 9 not in out.tolist()[0]
    assert out[0, -1].item() in (0, 1, 2)


# --- decode states in bf16 / fp16 (state_dtype) -----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["mamba", "mamba2"])
@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float16])
def test_16bit_states_track_fp32_states(arch, state_dtype) -> None:
    model = make_model(arch, hooks=True)
    ids = torch.randint(0, 64, (3, 6), generator=torch.Generator().manual_seed(0))
    steps = torch.randint(0, 64, (4, 3), generator=torch.Generator().manual_seed(1))
    logits = {}
    with torch.no_grad():
        for dt in (None, state_dtype):
            cache, first = prefill(model, ids, state_dtype=dt)
            out = [first]
            for tok in steps:  # the same tokens for both: the logits compare step by step
                out.append(model(tok[:, None], cache=cache).logits[:, -1])
                # the kernels update the state in place, in the cache's dtype
                want = torch.float32 if dt is None else dt
                assert {layer.ssm_state.dtype for layer in cache.layers} == {want}
                assert cache.state_dtype == want
            logits[dt] = torch.stack(out)
    ref, low = logits[None], logits[state_dtype]
    torch.testing.assert_close(low[0], ref[0], atol=0, rtol=0)  # the prefill's logits read the fp32 scan
    scale = ref.abs().max()
    assert (low - ref).abs().max() <= 0.05 * scale
    assert not torch.equal(low[1:], ref[1:])  # the states were rounded: a silent fp32 cache would match exactly


@pytest.mark.parametrize("arch", ["mamba", "mamba2"])
def test_bf16_state_prefill_rounds_the_final_states(arch) -> None:
    model = make_model(arch, hooks=True)
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # packed prefill of rows of different lengths
    with torch.no_grad():
        wide, _ = prefill(model, ids, mask)
        low, _ = prefill(model, ids, mask, state_dtype=torch.bfloat16)
    for a, b in zip(wide.layers, low.layers):
        assert b.ssm_state.dtype == torch.bfloat16 and b.ssm_state.is_contiguous()
        torch.testing.assert_close(b.ssm_state, a.ssm_state.to(torch.bfloat16), atol=0, rtol=0)
        torch.testing.assert_close(b.conv_state, a.conv_state, atol=0, rtol=0)


@pytest.mark.parametrize(("weights", "want"), [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_default_state_dtype_follows_the_model(weights, want) -> None:
    """None decodes with the model's dtype where 16-bit (as mamba_ssm and transformers keep their states), fp32
    adapters on a bf16 base included; an explicit fp32 keeps fp32 on any model."""
    model = make_model("mamba2", hooks=True).to(weights)
    for _, mixer in model.mixers():
        mixer.state_hooks["h"].float()  # the training recipe: trainables in fp32 on a 16-bit base
    ids = torch.randint(0, 64, (2, 4), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for dt, expect in ((None, want), (torch.float32, torch.float32)):
            cache, _ = prefill(model, ids, state_dtype=dt)
            assert {layer.ssm_state.dtype for layer in cache.layers} == {expect}
    assert decode_state_dtype(model, None) == want


@pytest.mark.parametrize("bad", [torch.float64, torch.int8, "bf16"])
def test_invalid_state_dtype(bad) -> None:
    model = make_model("mamba")
    with pytest.raises(ValueError, match=r"^state_dtype must be None, torch.float32, torch.bfloat16 or torch.float16, "
                       rf"got {bad!r}$"):  # fmt: skip
        model.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=0, state_dtype=bad)


def test_caches_of_different_state_dtypes_do_not_concatenate() -> None:
    from ssmtune.models.cache import InferenceCache

    model = make_model("mamba2")
    ids = torch.randint(0, 64, (1, 4))
    with torch.no_grad():
        parts = [prefill(model, ids, state_dtype=dt)[0] for dt in (torch.bfloat16, torch.bfloat16, None)]
    assert InferenceCache.cat(parts[:2]).layers[0].ssm_state.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"^InferenceCache.cat: the caches keep states in different dtypes"):
        InferenceCache.cat(parts)
