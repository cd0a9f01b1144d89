"""Triton causal conv1d against the torch path in fp64: outputs, final state and every gradient (outputs NaN-poisoned
by tests/conftest.py, which fills every torch.empty made inside ssmtune.ops).

On CPU the kernels run under the Triton interpreter (small shapes); ``-m gpu`` runs the mixers' shapes on CUDA.
"""

from __future__ import annotations

import pytest
import torch
from _triton_interp import interpret_on_cpu, reload_compiled

interpret_on_cpu()

from ssmtune import ops
from ssmtune.ops import conv_fused
from ssmtune.ops.conv import causal_conv1d_torch
from ssmtune.ops.testing import assert_close

reload_compiled(conv_fused)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RATIO = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def run_case(b, c, seqlen, width, dtype, *, init, bias, silu, time_major, channels_last, final_grad, device=DEVICE):
    torch.manual_seed(seqlen * 7 + c)
    if time_major:  # the mixers' layout: a [B, C, L] view of [B, L, 2C] memory
        x = torch.randn(b, seqlen, 2 * c, device=device).to(dtype)[..., :c].transpose(1, 2)
    else:
        x = torch.randn(b, c, seqlen, device=device).to(dtype)
    x.requires_grad_()
    w = torch.randn(c, width, device=device, requires_grad=True)
    bs = torch.randn(c, device=device, requires_grad=True) if bias else None
    h0 = None
    if init == "shared":
        h0 = torch.randn(c, width - 1, device=device, requires_grad=True)
    elif init == "per_batch":
        h0 = torch.randn(b, c, width - 1, device=device, requires_grad=True)
    act = "silu" if silu else None
    y, last = ops.causal_conv1d(x, w, bs, initial_state=h0, activation=act, return_final_state=True,
                                channels_last=channels_last, backend="triton")  # fmt: skip
    leaves = [t for t in (x, w, bs, h0) if t is not None]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    rx, rw = ref_leaves[0], ref_leaves[1]
    rb = ref_leaves[2] if bias else None
    rh0 = ref_leaves[-1] if h0 is not None else None
    ry, rlast = causal_conv1d_torch(rx, rw, rb, initial_state=rh0, activation=act, return_final_state=True)
    assert_close("y", ry, y.double(), RATIO[dtype])
    assert torch.equal(last.double(), rlast.detach()), "final state differs"
    if channels_last:
        assert y.transpose(1, 2).is_contiguous(), "channels_last output must be [B, L, C] memory"
    gy = torch.randn_like(ry)
    loss, rloss = (y.double() * gy).sum(), (ry * gy).sum()
    if final_grad:
        gl = torch.randn_like(rlast)
        loss, rloss = loss + (last.double() * gl).sum(), rloss + (rlast * gl).sum()
    grads = torch.autograd.grad(loss, leaves)
    ref_grads = torch.autograd.grad(rloss, ref_leaves)
    names = ["dx", "dw", "dbias", "dh0"][: len(leaves)] if bias else ["dx", "dw", "dh0"][: len(leaves)]
    for name, g, rg in zip(names, grads, ref_grads, strict=True):
        assert g.shape == rg.shape, name
        ratio = RATIO[dtype] if name == "dx" else max(RATIO[dtype], 1e-5)
        assert_close(name, rg, g.double(), ratio)


@pytest.mark.parametrize("seqlen", [1, 2, 3, 13, 70])
@pytest.mark.parametrize("init", ["none", "shared", "per_batch"])
def test_conv_triton_matches_torch_fp32(seqlen, init):
    run_case(2, 70, seqlen, 4, torch.float32, init=init, bias=True, silu=True, time_major=True, channels_last=True,
             final_grad=True)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("time_major,channels_last", [(True, True), (False, False), (True, False), (False, True)])
def test_conv_triton_layouts_and_dtypes(dtype, time_major, channels_last):
    run_case(2, 9, 37, 4, dtype, init="per_batch", bias=True, silu=True, time_major=time_major,
             channels_last=channels_last, final_grad=False)  # fmt: skip


@pytest.mark.parametrize("width", [2, 3])
def test_conv_triton_no_bias_no_activation(width):
    run_case(1, 5, 11, width, torch.float32, init="shared", bias=False, silu=False, time_major=False,
             channels_last=False, final_grad=True)  # fmt: skip


def test_conv_triton_frozen_weight_gets_no_gradient_work():
    x = torch.randn(1, 5, 9, device=DEVICE, requires_grad=True)
    w, bias = torch.randn(5, 4, device=DEVICE), torch.randn(5, device=DEVICE)
    y = ops.causal_conv1d(x, w, bias, activation="silu", backend="triton")
    (dx,) = torch.autograd.grad(y.sum(), [x])
    ry = causal_conv1d_torch(x.detach().double().requires_grad_(), w.double(), bias.double(), activation="silu")
    assert_close("y", ry, y.double(), 2e-6)
    assert torch.isfinite(dx).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("c,seqlen", [(1536 * 2, 2048 + 5), (1536 + 256, 1000)])
def test_conv_triton_mixer_shapes_gpu(c, seqlen):
    run_case(2, c, seqlen, 4, torch.bfloat16, init="per_batch", bias=True, silu=True, time_major=True,
             channels_last=True, final_grad=True)  # fmt: skip
    run_case(2, c, seqlen, 4, torch.float32, init="none", bias=True, silu=True, time_major=False,
             channels_last=False, final_grad=False)  # fmt: skip


def test_conv_triton_empty_sequence_keeps_the_initial_state():
    init = torch.randn(2, 5, 3, device=DEVICE)
    x = torch.randn(2, 5, 0, device=DEVICE)
    y, last = ops.causal_conv1d(x, torch.randn(5, 4, device=DEVICE), initial_state=init, activation="silu",
                                return_final_state=True, backend="triton")  # fmt: skip
    assert y.shape == (2, 5, 0) and torch.equal(last, init)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("width", "bias", "silu"), [(4, True, True), (2, False, False), (3, True, False)])
def test_conv_update_triton_matches_torch(dtype, width, bias, silu):
    """Decode steps on the Triton kernel (x a strided column slice, as the mixers pass it) against the torch update in
    fp64: outputs, and the rolled state exactly (it holds inputs, no arithmetic)."""
    b, c, steps = 3, 70, 5
    xs = torch.randn(b, steps, 2 * c, device=DEVICE).to(dtype)[..., :c]  # [B, L, C] view of [B, L, 2C] memory
    w = torch.randn(c, width, device=DEVICE)
    bs = torch.randn(c, device=DEVICE) if bias else None
    state = torch.randn(b, c, width - 1, device=DEVICE).to(dtype)
    ref_state = state.double()
    act = "silu" if silu else None
    for t in range(steps):
        y = ops.causal_conv1d_update(xs[:, t], state, w, bs, activation=act, backend="triton")
        ry = ops.causal_conv1d_update(xs[:, t].double(), ref_state, w.double(), None if bs is None else bs.double(),
                                      activation=act, backend="torch")  # fmt: skip
        assert y.dtype == dtype and y.shape == (b, c)
        assert_close(f"y[{t}]", ry, y.double(), RATIO[dtype])
        assert torch.equal(state.double(), ref_state), f"state after step {t}"


@pytest.mark.parametrize("block", [(16, 2), (64, 2), (256, 4)], ids=["16", "64", "256"])
def test_conv_update_any_channel_block(block):
    """The channels per program (64 on CUDA, 256 under the interpreter) change no result: 150 channels split unevenly."""
    from ssmtune.ops.conv_fused import causal_conv1d_update_triton

    b, c, width = 2, 150, 4
    x, w, bs = torch.randn(b, c, device=DEVICE), torch.randn(c, width, device=DEVICE), torch.randn(c, device=DEVICE)
    state = torch.randn(b, c, width - 1, device=DEVICE)
    ref_state = state.double()
    y = causal_conv1d_update_triton(x, state, w, bs, activation="silu", block=block)
    ry = ops.causal_conv1d_update(x.double(), ref_state, w.double(), bs.double(), activation="silu", backend="torch")
    assert_close("y", ry, y.double(), RATIO[torch.float32])
    assert torch.equal(state.double(), ref_state)


def test_conv_update_rejects_bad_arguments():
    x, w = torch.randn(2, 5, device=DEVICE), torch.randn(5, 4, device=DEVICE)
    with pytest.raises(ValueError, match=r"conv_state must have shape \[2, 5, 3\], got \[2, 5, 4\]"):
        ops.causal_conv1d_update(x, torch.zeros(2, 5, 4, device=DEVICE), w, backend="triton")
    with pytest.raises(ValueError, match="unit last stride"):
        ops.causal_conv1d_update(x, torch.zeros(2, 3, 5, device=DEVICE).transpose(1, 2), w, backend="triton")
    with pytest.raises(ValueError, match="activation must be None or 'silu'"):
        ops.causal_conv1d_update(x, torch.zeros(2, 5, 3, device=DEVICE), w, activation="relu")
