"""Token cross-entropy: the Triton kernels against ``F.cross_entropy`` on fp64 logits, loss and gradient (outputs
NaN-poisoned by tests/conftest.py), and the op's argument checks.

On CPU the kernels run under the Triton interpreter (small vocabularies, several BLOCK_V chunks); ``-m gpu`` runs a
50k vocabulary on CUDA.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _triton_interp import interpret_on_cpu, reload_compiled

interpret_on_cpu()

from ssmtune import ops
from ssmtune.ops import cross_entropy_fused
from ssmtune.ops.testing import assert_close

reload_compiled(cross_entropy_fused)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RATIO = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def run_case(rows, vocab, dtype, reduction, *, ignore_every=3, strided=False, block_v=None, device=DEVICE,
             monkeypatch=None):  # fmt: skip
    if block_v is not None:
        # several chunks per row at a small vocabulary: the online logsumexp across chunks
        monkeypatch.setattr(cross_entropy_fused, "_block_v", lambda v: (block_v, 1))
    torch.manual_seed(rows * 7 + vocab)
    width = vocab + (5 if strided else 0)
    base = (3 * torch.randn(rows, width, device=device)).to(dtype)
    logits = base[:, :vocab] if strided else base  # strided: rows of a wider tensor (a head's padded vocabulary)
    logits.requires_grad_()
    labels = torch.randint(0, vocab, (rows,), device=device)
    if ignore_every:
        labels[::ignore_every] = -100
    out = ops.cross_entropy(logits, labels, reduction=reduction, backend="triton")
    ref_logits = logits.detach().double().requires_grad_()
    ref = F.cross_entropy(ref_logits, labels, reduction=reduction)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert_close("loss", ref, out.double(), 1e-6, atol=1e-5)
    gout = torch.rand_like(ref) + 0.5
    (g,) = torch.autograd.grad((out.double() * gout).sum(), [logits])
    (rg,) = torch.autograd.grad((ref * gout).sum(), [ref_logits])
    assert g.dtype == dtype and g.shape == logits.shape
    assert_close("dlogits", rg, g.double(), RATIO[dtype], atol=1e-7)
    if ignore_every:
        assert (g[::ignore_every] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_torch(dtype, reduction):
    run_case(9, 67, dtype, reduction)


@pytest.mark.parametrize("block_v", [16, 32])
def test_cross_entropy_several_chunks_per_row(block_v, monkeypatch):
    run_case(5, 77, torch.float32, "mean", block_v=block_v, monkeypatch=monkeypatch)
    run_case(6, 64, torch.bfloat16, "sum", block_v=block_v, strided=True, monkeypatch=monkeypatch)


def test_cross_entropy_strided_rows_and_no_ignored_rows():
    run_case(7, 50, torch.float32, "mean", strided=True, ignore_every=0)


def test_cross_entropy_masked_vocabulary_and_large_logits(monkeypatch):
    # -inf logits (a masked vocabulary, the first whole chunk of it) and logits far outside exp's range. At |x| ~ 1e3
    # an fp32 logsumexp is only good to ~1e-4 (its ulp): the bound is torch's own fp32 error against fp64, times 4.
    monkeypatch.setattr(cross_entropy_fused, "_block_v", lambda v: (16, 1))
    logits = torch.randn(4, 40, device=DEVICE)
    logits[:, :20] = float("-inf")
    logits[1, 30] = 1e4
    logits[2] *= 1e3
    logits.requires_grad_()
    labels = torch.tensor([25, 30, 39, -100], device=DEVICE)
    out = ops.cross_entropy(logits, labels, reduction="none", backend="triton")
    (g,) = torch.autograd.grad(out.sum(), [logits])
    rl = logits.detach().double().requires_grad_()
    ref = F.cross_entropy(rl, labels, reduction="none")
    (rg,) = torch.autograd.grad(ref.sum(), [rl])
    tl32 = logits.detach().clone().requires_grad_()
    t32 = F.cross_entropy(tl32, labels, reduction="none")
    (tg,) = torch.autograd.grad(t32.sum(), [tl32])
    for name, ours, theirs, exact in (("loss", out, t32, ref), ("dlogits", g, tg, rg)):
        finite = torch.isfinite(exact)
        assert torch.equal(torch.isfinite(ours), finite), name
        err = (ours.double() - exact)[finite].abs().max().item()
        # + a few fp32 ulps of the largest value, should torch's rounding happen to be exact
        ulps = 8 * 2**-24 * exact[finite].abs().max().item()
        bound = 4 * (theirs.double() - exact)[finite].abs().max().item() + ulps + 1e-6
        assert err <= bound, f"{name}: max abs err {err:.3e} > {bound:.3e} (4x torch fp32's + 8 ulps)"


def test_cross_entropy_all_rows_ignored_gives_nan_mean_and_zero_gradient():
    logits = torch.randn(3, 20, device=DEVICE, requires_grad=True)
    labels = torch.full((3,), -100, device=DEVICE)
    out = ops.cross_entropy(logits, labels, backend="triton")
    assert torch.isnan(out)  # as F.cross_entropy: 0 / 0
    assert torch.isnan(F.cross_entropy(logits.detach(), labels))
    (g,) = torch.autograd.grad(out, [logits])
    assert (g == 0).all()


def test_cross_entropy_label_out_of_range_gives_nan_for_its_row():
    logits = torch.randn(3, 20, device=DEVICE)
    out = ops.cross_entropy(logits, torch.tensor([1, 20, -7], device=DEVICE), reduction="none", backend="triton")
    assert torch.isfinite(out[0]) and torch.isnan(out[1]) and torch.isnan(out[2])


def test_cross_entropy_auto_on_cpu_is_the_torch_path():
    logits = torch.randn(5, 11, dtype=torch.bfloat16)
    labels = torch.randint(0, 11, (5,))
    out = ops.cross_entropy(logits, labels, backend="auto")
    assert torch.equal(out, F.cross_entropy(logits.float(), labels))


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"logits": torch.randn(2, 3, 4)}, r"logits must be a 2-D tensor \[tokens, vocab\], got \[2, 3, 4\]"),
        (
            {"logits": torch.ones(2, 4, dtype=torch.long)},
            r"logits must be a floating-point tensor, got dtype torch.int64",
        ),
        ({"labels": torch.zeros(3, dtype=torch.long)}, r"labels must have shape \[2\] \(logits' rows\), got \[3\]"),
        ({"labels": torch.zeros(2)}, r"labels must be an integer tensor, got dtype torch.float32"),
        ({"reduction": "avg"}, r"reduction must be one of \('mean', 'sum', 'none'\), got 'avg'"),
    ],
)
def test_cross_entropy_bad_arguments(kwargs, pattern):
    args = {"logits": torch.randn(2, 4), "labels": torch.zeros(2, dtype=torch.long)} | kwargs
    with pytest.raises(ValueError, match="cross_entropy: " + pattern):
        ops.cross_entropy(**args, backend="torch")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cross_entropy_gpu_lm_vocabulary(dtype):
    # a mamba-130m head: 50280 columns (padded 50288-wide rows), 8 × 512 tokens; chunks of 4096 on 8 warps
    run_case(4096, 50280, dtype, "mean", strided=True, ignore_every=7)
    run_case(257, 50280, dtype, "sum")
