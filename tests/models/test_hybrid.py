"""ssmtune's SSD mixer inside transformers' hybrid models: logits equal transformers' own forward (fp32, CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _hybrid import FAMILIES, NUM_MIXERS, decode_logits, ids, tiny_hf

from ssmtune import from_transformers
from ssmtune.models.hybrid import HostedSSDMixer, hybrid_mixers, set_backend
from ssmtune.ops.testing import assert_close

# (family, config overrides): groups 1 and 2, Falcon-H1's three gate/norm layouts
VARIANTS = [(f, {}) for f in FAMILIES] + [
    ("bamba", {"mamba_n_groups": 1}),
    ("nemotron_h", {"n_groups": 1, "hybrid_override_pattern": "M-M*"}),
    ("falcon_h1", {"mamba_rms_norm": True, "mamba_norm_before_gate": False}),
    ("falcon_h1", {"mamba_rms_norm": True, "mamba_norm_before_gate": True, "mamba_n_groups": 1}),
]
VARIANT_IDS = [f + "".join(f"-{k}={v}" for k, v in o.items()) for f, o in VARIANTS]


def _pair(family: str, **overrides):
    ref = tiny_hf(family, **overrides)
    return ref, from_transformers(copy.deepcopy(ref))


@pytest.mark.parametrize(("family", "overrides"), VARIANTS, ids=VARIANT_IDS)
def test_logits_match_transformers(family, overrides):
    ref, model = _pair(family, **overrides)
    set_backend(model, "torch")
    x = ids(length=21)
    with torch.no_grad():
        want = ref(x).logits
        assert_close("full forward", want, model(x).logits, 1e-5, atol=1e-5)
        # prefill + decode steps through transformers' cache, against transformers' own full forward
        assert_close("prefill + steps", want, decode_logits(model, x, prefill=11), 1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_swap_shares_parameters(family):
    ref = tiny_hf(family)
    before = {n: p for n, p in ref.named_parameters()}
    model = from_transformers(ref)
    mixers = hybrid_mixers(model)
    assert len(mixers) == NUM_MIXERS[family]
    assert all(isinstance(m, HostedSSDMixer) for _, _, m in mixers)
    # same names, same tensors (no copy): checkpoints and save_pretrained keep their keys
    after = dict(model.named_parameters())
    assert sorted(after) == sorted(before)
    assert all(after[n] is p for n, p in before.items())
    assert from_transformers(model) is model  # a second call changes nothing
    assert len(hybrid_mixers(model)) == NUM_MIXERS[family]


def test_default_backend_and_odd_lengths():
    """The default backend selection (no set_backend), lengths around the chunk size, a batch of one."""
    ref, model = _pair("bamba")
    with torch.no_grad():
        for length in (1, 7, 8, 9, 17):
            x = ids(batch=1, length=length)
            assert_close(f"L={length}", ref(x).logits, model(x).logits, 1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["bamba", "zamba2"])
def test_padded_batch_matches_transformers(family):
    ref, model = _pair(family)
    x = ids(length=12)
    mask = torch.ones_like(x)
    mask[0, :4] = 0  # left padding on row 0
    with torch.no_grad():
        want = ref(x, attention_mask=mask).logits
        got = model(x, attention_mask=mask).logits
    assert_close("padded", want[0, 4:], got[0, 4:], 1e-5, atol=1e-5)
    assert_close("unpadded row", want[1], got[1], 1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("upcast", [False, True], ids=["own-dtype", "fp32"])
def test_silu_gate_matches_autograd(dtype, upcast):
    """Falcon-H1's gate keeps y and z rather than silu(z): the output and both gradients of the plain expression,
    bit for bit, and fewer bytes kept for the backward."""
    from ssmtune.models.hybrid import SiluGate

    g = torch.Generator().manual_seed(0)
    y, z = (torch.randn(3, 7, 10, generator=g).to(dtype).requires_grad_() for _ in range(2))
    w = torch.randn(3, 7, 10, generator=g).to(dtype)

    def plain(y, z):
        return (y.float() * F.silu(z.float())).to(y.dtype) if upcast else y * F.silu(z)

    outs, grads, kept = [], [], []
    for fn in (plain, lambda y, z: SiluGate.apply(y, z, upcast)):
        sizes = []

        def pack(t, sizes=sizes):
            sizes.append(t.untyped_storage().nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn(y, z)
        outs.append(out.detach())
        grads.append(torch.autograd.grad(out, (y, z), w))
        kept.append(sum(sizes))
    assert torch.equal(outs[0], outs[1])
    assert all(torch.equal(a, b) for a, b in zip(grads[0], grads[1], strict=True))
    assert kept[1] == 2 * y.untyped_storage().nbytes() < kept[0]
    # z without a gradient (a view of a wider in_proj output): not the whole output behind the view
    zxbcdt = torch.randn(3, 7, 25, generator=g).to(dtype)
    z = zxbcdt[..., 5:15]
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: sizes.append(t.untyped_storage().nbytes()) or t, lambda t: t
    ):
        out = SiluGate.apply(y, z, upcast)
    assert sum(sizes) == z.numel() * (4 if upcast else z.element_size())  # silu(z), as autograd keeps
    assert torch.equal(out, plain(y, z))
    assert torch.equal(torch.autograd.grad(out, y, w)[0], torch.autograd.grad(plain(y, z), y, w)[0])
