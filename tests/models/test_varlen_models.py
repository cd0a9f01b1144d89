"""Packed batches (``cu_seqlens``) through whole models: for every adapter method, the packed forward equals separate
forwards of each example on logits, the token-weighted loss and every trainable gradient."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "methods"))
from _peft_cases import CASES, perturb, tiny_model

from ssmtune import InitialStateConfig, PromptTuningConfig, get_peft_model
from ssmtune.models.lm import token_loss
from ssmtune.ops.testing import assert_close

LENS = [1, 7, 12, 5]
PACKABLE = [(c, a) for c in CASES for a in c.arches if c.id != "prompt"]


def _packed_vs_separate(model, lens, backend="auto", ratio=1e-5, device="cpu"):
    model.backend = backend
    ids = [torch.randint(0, 37, (n,), device=device) for n in lens]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    packed_ids = torch.cat(ids)[None]
    out = model(packed_ids, labels=packed_ids, cu_seqlens=cu)
    model.zero_grad()
    out.loss.backward()
    grads = [p.grad.clone() for p in params]
    logits, total, count = [], 0.0, 0
    for x in ids:
        o = model(x[None])
        logits.append(o.logits[0])
        s, c = token_loss(o.logits, x[None])
        total, count = total + s, count + c
    model.zero_grad()
    (total / count).backward()
    assert_close("logits", torch.cat(logits), out.logits[0], ratio)
    assert_close("loss", total / count, out.loss, ratio)
    assert params, "the method trains nothing"
    for p, g in zip(params, grads, strict=True):
        assert_close("grad", p.grad, g, ratio, atol=1e-9)


@pytest.mark.parametrize(("case", "arch"), PACKABLE, ids=[f"{c.id}-{a}" for c, a in PACKABLE])
def test_packed_equals_separate(case, arch):
    model = get_peft_model(tiny_model(arch, dtype=torch.float64), case.make())
    perturb(model, 0.3)
    _packed_vs_separate(model, LENS)


@pytest.mark.parametrize("arch", ["m1", "m2"])
def test_ref_backend_and_base_model(arch):
    model = tiny_model(arch, dtype=torch.float64)
    for p in model.parameters():
        p.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)
    _packed_vs_separate(model, [3, 1, 8], backend="ref")


def test_packed_refusals():
    model = get_peft_model(tiny_model("m2"), PromptTuningConfig(num_virtual_tokens=2))
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="input hooks"):
        model(torch.zeros(1, 5, dtype=torch.long), cu_seqlens=cu)
    base = tiny_model("m1")
    with pytest.raises(ValueError, match="attention_mask"):
        base(torch.zeros(1, 5, dtype=torch.long), attention_mask=torch.ones(1, 5), cu_seqlens=cu)
    with pytest.raises(ValueError, match="packed length 5"):
        base(torch.zeros(1, 5, dtype=torch.long), cu_seqlens=torch.tensor([0, 2, 4], dtype=torch.int32))


@pytest.mark.parametrize("arch", ["m1", "m2"])
def test_packed_prefill_equals_row_by_row(arch):
    from ssmtune.models import generate as gen

    model = get_peft_model(tiny_model(arch), InitialStateConfig(conv_state=True))
    perturb(model, 0.3)
    lm = model.base_model
    ids = torch.randint(0, 37, (3, 9))
    mask = torch.tensor([[1] * 9, [0] * 4 + [1] * 5, [0] * 8 + [1]])
    with torch.no_grad():
        cache, logits = gen.prefill(lm, ids, mask)
        gen._packable, packable = (lambda m: False), gen._packable
        try:
            ref_cache, ref_logits = gen.prefill(lm, ids, mask)
        finally:
            gen._packable = packable
    assert_close("logits", ref_logits, logits, 1e-5)
    for a, b in zip(ref_cache.layers, cache.layers, strict=True):
        assert_close("ssm state", a.ssm_state, b.ssm_state, 1e-5)
        assert_close("conv state", a.conv_state, b.conv_state, 1e-6)
    out = lm.generate(ids, max_new_tokens=4, attention_mask=mask)
    for r in range(3):
        row = ids[r][mask[r].bool()][None]
        assert torch.equal(lm.generate(row, max_new_tokens=4)[0, -4:], out[r, -4:])


@pytest.mark.parametrize("arch", ["m1", "m2"])
def test_routed_state_adapters_per_sequence(arch):
    from ssmtune import LoraConfig, StateOffsetConfig

    model = get_peft_model(tiny_model(arch, dtype=torch.float64), InitialStateConfig(conv_state=True), "a")
    model.add_adapter("b", StateOffsetConfig())
    model.add_adapter("c", LoraConfig(r=2, use_dora=True))  # LoRA/DoRA route each token with its sequence
    for n in model.adapter_names:  # perturb moves the trainable (active) adapter only
        model.set_adapter(n)
        perturb(model, 0.3)
    names = ["a", "b", None, "c", "a"]
    lens = [3, 6, 1, 5, 4]
    ids = [torch.randint(0, 37, (n,)) for n in lens]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    with torch.no_grad():
        packed = model(torch.cat(ids)[None], cu_seqlens=cu, adapter_names=names).logits[0]
        separate = torch.cat([model(x[None], adapter_names=[n]).logits[0] for x, n in zip(ids, names, strict=True)])
    assert_close("routed logits", separate, packed, 1e-6)
    with torch.no_grad():
        base = model(ids[0][None], adapter_names=[None]).logits
        assert all((model(ids[0][None], adapter_names=[n]).logits - base).abs().max() > 1e-3 for n in "abc")
    with pytest.raises(ValueError, match="5 sequences but 2 adapter names"):
        model(torch.cat(ids)[None], cu_seqlens=cu, adapter_names=["a", "b"])


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["m1", "m2"])
def test_packed_equals_separate_gpu(arch):
    """The fused Triton kernels of a whole model (head dim 64 on Mamba-2), 8 sequences up to 2048 tokens."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    kw = {"d_model": 128, "headdim": 64, "chunk_size": 64} if arch == "m2" else {"d_model": 128}
    model = get_peft_model(tiny_model(arch, **kw).cuda(), InitialStateConfig(conv_state=True))
    perturb(model, 0.3)
    # fp32 through TF32 dots: the tolerance of the fused-path tests
    _packed_vs_separate(model, [2048, 1, 1031, 64, 2047, 513, 7, 1500], backend="triton", ratio=5e-3, device="cuda")


@pytest.mark.parametrize("arch", ["m1", "m2"])
def test_a_plan_cached_in_inference_mode_serves_training(arch):
    """The packed plan is cached per boundaries: one first built under inference_mode must not break a later backward."""
    from ssmtune import StateOffsetConfig

    model = get_peft_model(tiny_model(arch), StateOffsetConfig())
    ids = torch.randint(0, 37, (1, 13))
    cu = torch.tensor([0, 6, 13], dtype=torch.int32)
    with torch.inference_mode():
        model(ids, cu_seqlens=cu)
    model(ids, labels=ids, cu_seqlens=cu).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_packed_prefill_under_inference_mode():
    """Inference tensors have no version counter: the boundaries of an inference-mode ``cu_seqlens`` are read anew."""
    from ssmtune.models import generate as gen

    lm = tiny_model("m1")
    ids = torch.randint(0, 37, (2, 5))
    mask = torch.tensor([[1] * 5, [0] * 2 + [1] * 3])
    with torch.no_grad():
        want = gen.prefill(lm, ids, mask)[1]
    with torch.inference_mode():
        assert_close("logits", want, gen.prefill(lm, ids, mask)[1], 1e-6)
        cu = torch.tensor([0, 5, 8], dtype=torch.int32)
        assert_close("logits", want, lm(ids[mask.bool()][None], cu_seqlens=cu).logits[0, [4, 7]], 1e-6)
