"""Triton RMSNorm (plain, gated, grouped) against the torch path in fp64: output and every gradient (outputs
NaN-poisoned by tests/conftest.py); ``add_rms_norm`` (the residual add in the norm's kernel) against the add followed
by the norm.

On CPU the kernels run under the Triton interpreter (small shapes); ``-m gpu`` runs the models' shapes on CUDA.
"""

from __future__ import annotations

import pytest
import torch
from _triton_interp import interpret_on_cpu, reload_compiled

interpret_on_cpu()

from ssmtune import ops
from ssmtune.ops import norm_fused
from ssmtune.ops.norm import add_rms_norm_torch, rms_norm_torch
from ssmtune.ops.testing import assert_close

reload_compiled(norm_fused)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RATIO = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def run_case(shape, dtype, w_dtype, *, gated, group_size, z_slice=False, device=DEVICE):
    torch.manual_seed(sum(shape))
    hidden = shape[-1]
    x = torch.randn(*shape, device=device).to(dtype).requires_grad_()
    z = None
    if gated:
        # the mixer's z: a slice of a wider projection (rows strided, channels contiguous)
        extra = 3 if z_slice else 0
        z = torch.randn(*shape[:-1], hidden + extra, device=device).to(dtype)[..., extra:].requires_grad_()
    w = (1 + 0.1 * torch.randn(hidden, device=device)).to(w_dtype).requires_grad_()
    out = ops.rms_norm(x, w, z=z, eps=1e-5, group_size=group_size, backend="triton")
    assert out.dtype == torch.promote_types(w_dtype, dtype)
    leaves = [t for t in (x, w, z) if t is not None]
    refs = [t.detach().double().requires_grad_() for t in leaves]
    rz = refs[2] if gated else None
    # the reference rounds n to x's dtype as the modules do; in fp64 that rounding is to fp64
    ref = rms_norm_torch(refs[0], refs[1], z=rz, eps=1e-5, group_size=group_size)
    assert_close("out", ref, out.double(), RATIO[dtype])
    gout = torch.randn_like(ref)
    grads = torch.autograd.grad((out.double() * gout).sum(), leaves)
    rgrads = torch.autograd.grad((ref * gout).sum(), refs)
    for name, g, rg in zip(["dx", "dw", "dz"][: len(grads)], grads, rgrads, strict=True):
        assert g.shape == rg.shape and g.dtype == (w_dtype if name == "dw" else dtype), name
        assert_close(name, rg, g.double(), RATIO[dtype] if name != "dw" else max(RATIO[dtype], 1e-5))


@pytest.mark.parametrize("shape", [(2, 3, 5), (1, 7, 24), (37, 96)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_plain_rms_norm(shape, dtype):
    run_case(shape, dtype, dtype, gated=False, group_size=None)


@pytest.mark.parametrize("group_size", [None, 8, 12])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_grouped_rms_norm(group_size, dtype):
    run_case((2, 9, 24), dtype, torch.float32, gated=True, group_size=group_size, z_slice=True)


def test_fp32_weight_on_bf16_input_promotes():
    run_case((3, 4, 16), torch.bfloat16, torch.float32, gated=False, group_size=None)


def test_frozen_weight_and_bad_group_size():
    x = torch.randn(2, 5, 8, device=DEVICE, requires_grad=True)
    w = torch.ones(8, device=DEVICE)
    out = ops.rms_norm(x, w, backend="triton")
    (dx,) = torch.autograd.grad(out.sum(), [x])
    assert torch.isfinite(dx).all()
    assert ops.rms_norm(x[:0], w, backend="triton").shape == (0, 5, 8)
    with pytest.raises(ValueError, match="group_size must divide"):
        ops.rms_norm(x, w, group_size=3)
    with pytest.raises(ValueError, match="weight must have shape"):
        ops.rms_norm(x, torch.ones(7))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_input_dtype_cast_in_the_kernel(dtype):
    """``input_dtype``: an fp32 x (the residual stream) normalised as ``x.to(dtype)``, the cast in the kernel's load,
    gives the bits of the cast-then-norm on CUDA (the interpreter rounds fp32 -> bf16 by truncation, torch to nearest:
    one ulp here); with autograd the cast stays a torch op (the same gradient as before)."""
    x = torch.randn(3, 2, 40, device=DEVICE) * 3
    w = (1 + 0.1 * torch.randn(40, device=DEVICE)).to(dtype)
    with torch.no_grad():
        fused = ops.rms_norm(x, w, input_dtype=dtype, backend="triton")
        cast = ops.rms_norm(x.to(dtype), w, backend="triton")
        ref = ops.rms_norm(x, w, input_dtype=dtype, backend="torch")
    assert fused.dtype == cast.dtype == ref.dtype == dtype
    if DEVICE == "cuda":
        assert torch.equal(fused, cast)
    assert_close("out", cast.double(), fused.double(), RATIO[dtype])
    assert_close("out", ref.double(), fused.double(), RATIO[dtype])
    xg = x.clone().requires_grad_()
    (dx,) = torch.autograd.grad(ops.rms_norm(xg, w, input_dtype=dtype, backend="triton").float().sum(), [xg])
    xc = x.clone().requires_grad_()
    (dx_cast,) = torch.autograd.grad(ops.rms_norm(xc.to(dtype), w, backend="triton").float().sum(), [xc])
    assert dx.dtype == torch.float32 and torch.equal(dx, dx_cast)


def add_case(shape, x_dtype, y_dtype, w_dtype, *, group_size=None, input_dtype=None, device=DEVICE):
    """add_rms_norm on the Triton kernel (x and y strided row slices) == the add, then the Triton norm; ~= fp64."""
    torch.manual_seed(sum(shape))
    hidden = shape[-1]
    # the stream of a block and its mixer's output: rows strided (slices of wider tensors), channels contiguous
    x = (torch.randn(*shape[:-1], hidden + 2, device=device) * 3).to(x_dtype)[..., 2:]
    y = torch.randn(*shape[:-1], hidden + 5, device=device).to(y_dtype)[..., :hidden]
    w = (1 + 0.1 * torch.randn(hidden, device=device)).to(w_dtype)
    kw = {"eps": 1e-5, "group_size": group_size, "input_dtype": input_dtype}
    with torch.no_grad():
        res, out = ops.add_rms_norm(x, y, w, backend="triton", **kw)
        s = x + y
        unfused = ops.rms_norm(s, w, backend="triton", **kw)
        # the norm reads the sum as stored (rounded to the stream's dtype), whatever the rounding
        of_res = ops.rms_norm(res, w, backend="triton", **kw)
    base = torch.promote_types(x_dtype, y_dtype)
    assert res.dtype == s.dtype == base and res.shape == x.shape
    assert torch.equal(out, of_res)
    assert out.dtype == unfused.dtype == torch.promote_types(w_dtype, input_dtype or base) and out.shape == x.shape
    if base == torch.float32 or DEVICE == "cuda":
        # the add in fp32 either way: the same bits (a bf16 stream on the interpreter, which rounds the fp32 sum to
        # bf16 by truncation where torch's add rounds to nearest, is one ulp off: the else branch)
        assert torch.equal(res, s)
        assert torch.equal(out, unfused)
    else:
        assert_close("residual", s.double(), res.double(), RATIO[base])
        assert_close("out", unfused.double(), out.double(), RATIO[base])
    ref_s = x.double() + y.double()
    ref = rms_norm_torch(ref_s, w.double(), eps=1e-5, group_size=group_size)
    assert_close("residual", ref_s, res.double(), RATIO[base])
    assert_close("out", ref, out.double(), RATIO[input_dtype or base])
    # the torch path: the add, then the torch norm
    t_res, t_out = ops.add_rms_norm(x, y, w, backend="torch", **kw)
    assert torch.equal(t_res, s)
    assert torch.equal(t_out, rms_norm_torch(s, w, **kw))


# (fp32 stream, bf16 output): the models' case; a bf16 stream; one whose sum is wider than the stream (x + y's dtype)
ADD_DTYPES = [(torch.float32, torch.bfloat16), (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
              (torch.bfloat16, torch.float32)]  # fmt: skip


@pytest.mark.parametrize("shape", [(2, 3, 5), (1, 7, 24), (37, 96)])
@pytest.mark.parametrize("x_dtype,y_dtype", ADD_DTYPES)
def test_add_rms_norm(shape, x_dtype, y_dtype):
    add_case(shape, x_dtype, y_dtype, y_dtype)


@pytest.mark.parametrize("input_dtype", [torch.bfloat16, torch.float16])
def test_add_rms_norm_cast_in_the_kernel(input_dtype):
    """The models' pre-norm: the fp32 stream plus a low-precision block output, normalised as ``s.to(input_dtype)``."""
    add_case((3, 2, 40), torch.float32, input_dtype, input_dtype, input_dtype=input_dtype)


@pytest.mark.parametrize("group_size", [8, 12])
def test_add_rms_norm_grouped(group_size):
    add_case((2, 9, 24), torch.float32, torch.bfloat16, torch.float32, group_size=group_size)


def test_add_rms_norm_with_autograd_adds_in_torch():
    """With a gradient to take the add is a torch op before the (autograd) norm: the gradients of the unfused pair."""
    x = torch.randn(2, 5, 16, device=DEVICE, requires_grad=True)
    y = torch.randn(2, 5, 16, device=DEVICE, requires_grad=True)
    w = (1 + 0.1 * torch.randn(16, device=DEVICE)).requires_grad_()
    res, out = ops.add_rms_norm(x, y, w, backend="triton")
    grads = torch.autograd.grad((out * out).sum() + res.sum(), [x, y, w])
    s = x + y
    ref = ops.rms_norm(s, w, backend="triton")
    rgrads = torch.autograd.grad((ref * ref).sum() + s.sum(), [x, y, w])
    for g, rg in zip(grads, rgrads, strict=True):
        assert torch.equal(g, rg)
    # nothing to launch, or more groups than the kernel unrolls: the same pair through the fallback
    with torch.no_grad():
        empty = ops.add_rms_norm(x[:0], y[:0], w, backend="triton")
        assert empty[0].shape == empty[1].shape == (0, 5, 16)
        wide = torch.randn(3, 34, device=DEVICE), torch.randn(3, 34, device=DEVICE)
        got = ops.add_rms_norm(*wide, torch.ones(34, device=DEVICE), group_size=2, backend="triton")
        want = add_rms_norm_torch(*wide, torch.ones(34, device=DEVICE), group_size=2)
    assert torch.equal(got[0], want[0])
    assert_close("out", want[1].double(), got[1].double(), RATIO[torch.float32])


def test_add_rms_norm_bad_arguments():
    x, w = torch.randn(2, 5, 8), torch.ones(8)
    with pytest.raises(ValueError, match=r"add_rms_norm: y must have x's shape \[2, 5, 8\], got \[2, 5, 7\]"):
        ops.add_rms_norm(x, torch.randn(2, 5, 7), w)
    with pytest.raises(ValueError, match=r"add_rms_norm: weight must have shape \[8\].*got \[7\]"):
        ops.add_rms_norm(x, x, torch.ones(7))
    with pytest.raises(ValueError, match="add_rms_norm: group_size must divide the last dim 8, got 3"):
        ops.add_rms_norm(x, x, w, group_size=3)
    with pytest.raises(ValueError, match="add_rms_norm: y must be a floating-point tensor, got dtype torch.int64"):
        ops.add_rms_norm(x, torch.ones(2, 5, 8, dtype=torch.long), w)
    with pytest.raises(ValueError, match="add_rms_norm: backend must be one of"):
        ops.add_rms_norm(x, x, w, backend="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("hidden,groups", [(768, 1), (1536, 1), (4096, 8), (5120, 1)])
def test_model_shapes_gpu(hidden, groups):
    run_case((4, 1000, hidden), torch.bfloat16, torch.bfloat16, gated=groups > 0, group_size=hidden // groups,
             z_slice=True)  # fmt: skip
    run_case((2, 333, hidden), torch.float32, torch.float32, gated=False, group_size=None)
    add_case((4, 1000, hidden), torch.float32, torch.bfloat16, torch.bfloat16, group_size=hidden // groups,
             input_dtype=torch.bfloat16)  # fmt: skip
