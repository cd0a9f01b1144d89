"""transformers' hybrid models on CUDA (``-m gpu``): ssmtune's swapped mixers (Triton SSD scan and step, fla's gated
delta rule) against transformers' own forward, State-offset (h) at init, greedy generate through the cache.

transformers' path is the oracle: on CUDA it runs fla's or mamba_ssm's kernels when they are installed, else torch.
The test bodies take a device, so they run on the CPU too (``check_parity(family, "cpu")``).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from _gdn import EXTRA as GDN_EXTRA
from _gdn import GDN_FAMILIES
from _hybrid import FAMILIES, argmax_continuation, decode_logits, ids, tiny_hf

from ssmtune import StateOffsetConfig, from_transformers, get_peft_model
from ssmtune.ops.testing import assert_close

sys.path.insert(0, str(Path(__file__).parents[1] / "methods"))
from _peft_cases import perturb

_GDN_HEADS = {"linear_key_head_dim": 16, "linear_value_head_dim": 32}
# sizes the CUDA kernels take: 64-step SSD chunks (the Triton scan wants a power of two >= 16), gated delta head dims
# that fla's dots take (multiples of 16); 70 tokens span two chunks of 64
CUDA_SIZES = {
    "falcon_h1": {"mamba_chunk_size": 64},
    "nemotron_h": {"chunk_size": 64},
    "granitemoehybrid": {"mamba_chunk_size": 64},
    "bamba": {"mamba_chunk_size": 64},
    "zamba2": {"chunk_size": 64},
    "qwen3_5_text": _GDN_HEADS,
    "qwen3_5_moe_text": _GDN_HEADS,
    "qwen3_next": _GDN_HEADS,
    "olmo_hybrid": _GDN_HEADS,
    "kimi_linear": {"linear_attn_config": {**GDN_EXTRA["kimi_linear"]["linear_attn_config"], "head_dim": 16}},
}
LENGTH = 70
# fp32, RMS-relative on the logits, which move ~0.1x as much as a mixer's output does (a 1% larger out_proj: 1e-3).
# The tests compile Triton's fp32 dots (ssmtune's SSD, fla's on both sides) as IEEE, not TF32 (TRITON_F32_DEFAULT;
# a kernel compiled earlier in the process keeps its precision): prefill and steps then agree too
RATIO = 1e-4
NEW = 8
GEN = {"max_new_tokens": NEW, "min_new_tokens": NEW, "pad_token_id": 0}
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CUDA_FAMILIES = pytest.mark.parametrize(("family", "device"), [(f, "cuda") for f in FAMILIES + GDN_FAMILIES])


def _hf(family: str, device: str):
    return tiny_hf(family, **CUDA_SIZES.get(family, {})).to(device)


def check_parity(family: str, device: str) -> None:
    """Logits of the swapped model equal transformers' (full forward, and prefill + cached steps); State-offset (h) at
    init leaves them unchanged."""
    ref = _hf(family, device)
    model = from_transformers(copy.deepcopy(ref))
    x = ids(length=LENGTH).to(device)
    with torch.no_grad():
        want = ref(x).logits
        got = model(x).logits
        assert_close("forward", want, got, RATIO, atol=1e-5)
        assert_close("prefill + steps", want, decode_logits(model, x, prefill=LENGTH - 9), RATIO, atol=1e-5)
        peft = get_peft_model(model, StateOffsetConfig())
        # h' = 0 adds an exact zero; only a kernel specialised for h' may sum in another order
        assert_close("State-offset (h) at init", got, peft(x).logits, 1e-5, atol=1e-6)


def _assert_greedy(model, got: torch.Tensor, want: torch.Tensor) -> None:
    """``got`` equals the argmax continuation ``want``, but for a part at a near tie of the full forward: a prefill
    and a step round differently."""
    for row in range(got.shape[0]):
        differ = (got[row] != want[row]).nonzero()
        if not len(differ):
            continue
        p = differ[0].item()
        logits = model(want[row : row + 1, :p]).logits[0, -1]
        gap = (logits[want[row, p]] - logits[got[row, p]]).item()
        msg = f"row {row}: greedy {got[row].tolist()} != argmax {want[row].tolist()} (logit gap {gap:.2e})"
        assert gap <= 2e-3 * logits.abs().max().item(), msg


def check_greedy_generate(family: str, device: str) -> None:
    """Greedy generate through transformers' cache with a perturbed State-offset (h) adapter gives the argmax
    continuation of full forwards."""
    peft = get_peft_model(from_transformers(_hf(family, device)), StateOffsetConfig())
    perturb(peft)
    peft.eval()
    x = ids(batch=2, length=7).to(device)
    with torch.no_grad():
        got = peft.generate(x, do_sample=False, **GEN)
        _assert_greedy(peft, got, argmax_continuation(peft, x, NEW))
        out = peft(got).logits
        with peft.disable_adapters():
            base = peft(got).logits
    assert (out - base).abs().max().item() > 1e-3  # the adapter acts


@CUDA_FAMILIES
def test_logits_match_transformers_cuda(family, device, monkeypatch):
    monkeypatch.setenv("TRITON_F32_DEFAULT", "ieee")
    check_parity(family, device)


@CUDA_FAMILIES
def test_greedy_generate_with_state_offset_cuda(family, device, monkeypatch):
    monkeypatch.setenv("TRITON_F32_DEFAULT", "ieee")
    check_greedy_generate(family, device)
