"""The gated delta rule's read-out offsets (out = o + q̂ S' + y') as Triton kernels against ``naive.read_offsets`` in
fp64: the output and the gradients of o, q, S' and y', shared and per-row offsets, grouped value heads, odd sizes,
with and without the l2norm; the output NaN-poisoned (tests/conftest.py fills every torch.empty made inside
ssmtune.ops). On CPU the kernels run under the Triton interpreter; ``-m gpu`` runs a Qwen3.5 layer's shape on CUDA.
"""

from __future__ import annotations

import pytest
import torch
from _triton_interp import interpret_on_cpu, reload_compiled

interpret_on_cpu()

from ssmtune.ops.gated_delta import offsets_triton
from ssmtune.ops.gated_delta.naive import prepare_q, read_offsets
from ssmtune.ops.testing import assert_close

reload_compiled(offsets_triton)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RATIO = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def run_case(b, seqlen, hk, h, dk, dv, dtype, *, batched, l2norm, has_s=True, has_y=True, scale=None, device=DEVICE):
    gen = torch.Generator().manual_seed(seqlen * 31 + dk)
    r = lambda *s: torch.randn(*s, generator=gen).to(device)
    lead = (b,) if batched else ()
    leaves = {
        "o": r(b, h, seqlen, dv).to(dtype).transpose(1, 2),  # not contiguous: the kernel must not read it as such
        # q as the mixers pass it: a strided view of the conv output
        "q": r(b, seqlen, 2 * hk * dk).to(dtype)[..., 1 : 1 + hk * dk].reshape(b, seqlen, hk, dk),
        "state_offset": r(*lead, h, dk, dv) * 0.5 if has_s else None,
        "output_offset": r(*lead, h, dv) * 0.5 if has_y else None,
    }
    for t in leaves.values():
        if t is not None:
            t.requires_grad_()
    ref = {k: None if t is None else t.detach().float().requires_grad_() for k, t in leaves.items()}
    out = offsets_triton.read_offsets_triton(
        leaves["o"], leaves["q"], leaves["state_offset"], leaves["output_offset"], scale=scale, use_qk_l2norm=l2norm
    )
    q_hat = prepare_q(ref["q"], h, scale=scale, use_qk_l2norm=l2norm)
    rout = read_offsets(ref["o"], q_hat, ref["state_offset"], ref["output_offset"])
    assert out.dtype == dtype and out.shape == rout.shape
    assert_close("out", rout, out.float(), RATIO[dtype])
    gout = torch.randn(rout.shape, generator=gen).to(device)
    (out.float() * gout).sum().backward()
    (rout * gout).sum().backward()
    for name, t in leaves.items():
        if t is None:
            continue
        if name == "q" and not has_s:
            assert t.grad is None, "q gets no gradient without a state offset"
            continue
        assert t.grad is not None, f"no gradient for {name}"
        assert_close(f"d{name}", ref[name].grad, t.grad.float(), RATIO[dtype])


CASES = [  # (id, B, L, Hk, H, K, V)
    ("L1", 2, 1, 2, 2, 8, 8),
    ("L70-grouped-odd", 2, 70, 2, 6, 5, 7),
    ("L300-two-ds-blocks", 1, 300, 1, 2, 16, 24),
    ("L65-V80", 1, 65, 2, 2, 32, 80),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("batched", [False, True], ids=["shared", "per_row"])
@pytest.mark.parametrize("l2norm", [True, False], ids=["l2norm", "raw"])
def test_readout_offsets(case, batched, l2norm):
    run_case(*case[1:], torch.float32, batched=batched, l2norm=l2norm)


@pytest.mark.parametrize(
    "has_s,has_y,scale", [(True, False, None), (False, True, None), (True, True, 0.3)], ids=["s", "y", "scale"]
)
def test_readout_offsets_flags(has_s, has_y, scale):
    run_case(2, 33, 1, 2, 8, 8, torch.float32, batched=False, l2norm=True, has_s=has_s, has_y=has_y, scale=scale)


def test_readout_offsets_bf16():
    run_case(2, 40, 2, 4, 16, 16, torch.bfloat16, batched=True, l2norm=True)


def test_readout_without_offsets_is_o():
    o, q = torch.randn(1, 3, 2, 4), torch.randn(1, 3, 2, 4)
    assert offsets_triton.read_offsets_triton(o, q, None, None) is o


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("batched", [False, True], ids=["shared", "per_row"])
def test_readout_offsets_gpu(dtype, batched):
    run_case(4, 1031, 16, 16, 128, 128, dtype, batched=batched, l2norm=True)
    run_case(2, 257, 4, 8, 128, 128, dtype, batched=batched, l2norm=True)
