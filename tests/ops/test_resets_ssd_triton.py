"""Packed rows (``resets``) on the chunked SSD backends (Triton, torch) against the fp32 sequential reference: outputs,
final state and every gradient; the fused conv + scan against the unfused conv + reference scan.

On CPU the kernels run under the Triton interpreter (small, odd shapes); ``-m gpu`` runs larger ones on CUDA.
Allocations inside ``ssmtune.ops`` are NaN-poisoned by tests/conftest.py, so an unwritten output fails.
"""

from __future__ import annotations

import pytest
import torch

# these set TRITON_INTERPRET on the CPU before the kernels are imported (and reload them, in place, if needed)
from test_conv_ssd_triton import make_inputs as make_conv_inputs
from test_ssd_triton import ALL, DEVICE, GPU_CASES, RATIO_CPU, RATIO_GPU, make_inputs
from test_ssd_triton import check as check_ssd

from ssmtune import ops
from ssmtune.ops import RESET_ALIGN, conv_fused
from ssmtune.ops.ssd import fused
from ssmtune.ops.ssd.chunk import ssd_scan_torch
from ssmtune.ops.ssd.naive import ssd_scan_ref
from ssmtune.ops.testing import assert_close


def make_resets(batch: int, seqlen: int) -> torch.Tensor:
    """Row 0 restarts at slots 1 and 3, row 1 at slot 2 (and a flag at slot 0, which changes nothing); further rows at
    every other slot."""
    r = torch.zeros(batch, -(-seqlen // RESET_ALIGN), dtype=torch.bool)
    r[0, 1::2] = True
    if batch > 1:
        r[1, 0] = True
        r[1, 2:3] = True
    r[2:, ::2] = True
    return r.to(DEVICE)


def check(fn, inputs, chunk_size, ratio, resets=None):
    """``fn`` against the reference with resets (``make_resets`` by default), softplus on."""
    resets = make_resets(*inputs["x"].shape[:2]) if resets is None else resets
    check_ssd(inputs, True, chunk_size, ratio, fn=fn, resets=resets)


def _ratio(dtype: torch.dtype) -> float:
    return RATIO_CPU[dtype] if DEVICE == "cpu" else RATIO_GPU[dtype]


# (id, H, G, chunk, dtype, optional inputs, per-row states/offsets): H 6 in G 2 or 3 groups, L 200 (a ragged last
# chunk, resets at 64, 128, 192)
CASES = [
    ("c32-G3-rowwise-fp32", 6, 3, 32, torch.float32, ALL, True),
    ("c64-G2-shared-fp32", 6, 2, 64, torch.float32, ALL, False),
    ("c16-G3-shared-fp32", 6, 3, 16, torch.float32, ALL, False),
    ("c64-G3-no-h0-fp32", 6, 3, 64, torch.float32, frozenset({"D", "z", "dt_bias", "state_offset"}), True),
    ("c32-G2-rowwise-bf16", 6, 2, 32, torch.bfloat16, ALL, True),
    ("c64-G3-shared-bf16", 6, 3, 64, torch.bfloat16, ALL, False),
]


@pytest.mark.parametrize(("h", "g", "chunk", "dtype", "flags", "per_row"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_ssd_scan_triton_resets(h, g, chunk, dtype, flags, per_row):
    inputs = make_inputs(2, 200, h, 6, 10, g, dtype, flags, per_row)
    check(fused.ssd_scan_triton, inputs, chunk, _ratio(dtype))


def test_ssd_scan_triton_resets_default_chunk():
    """chunk_size None with resets: 64, not the 256 of long sequences (which would raise)."""
    inputs = make_inputs(3, 520, 2, 4, 8, 1, torch.float32, ALL, True)
    check(fused.ssd_scan_triton, inputs, None, _ratio(torch.float32))


@pytest.mark.parametrize("chunk", [16, 64, None])
@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "rowwise"])
def test_ssd_scan_torch_resets(chunk, per_row):
    inputs = make_inputs(3, 200, 6, 6, 10, 3, torch.float32, ALL, per_row, device="cpu")
    check(ssd_scan_torch, inputs, chunk, 1e-5, make_resets(3, 200).cpu())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_resets_chunk_size_must_divide_align(backend):
    inputs = make_inputs(1, 70, 2, 4, 8, 1, torch.float32, frozenset(), False)
    with pytest.raises(ValueError, match="chunk_size must divide RESET_ALIGN .64., got 128"):
        ops.ssd_scan(*inputs.values(), chunk_size=128, resets=make_resets(1, 70), backend=backend)


def test_resets_dispatch_auto():
    """auto takes a chunked backend with resets (torch on the CPU, Triton on CUDA), as the reference computes."""
    inputs = {k: v.detach() for k, v in make_inputs(2, 130, 2, 4, 8, 1, torch.float32, ALL, True).items()}
    resets = make_resets(2, 130)
    y_ref = ops.ssd_scan(**inputs, dt_softplus=True, resets=resets, backend="ref")
    y = ops.ssd_scan(**inputs, dt_softplus=True, resets=resets)
    assert_close("y", y_ref, y, _ratio(torch.float32))
    assert "triton" in ops.RESETS_BACKENDS["ssd_scan"] and "torch" in ops.RESETS_BACKENDS["ssd_scan"]


def _conv_scan(zxbcdt, prm, mask, dims, h, p, g, resets, chunk, *, fused_op: bool, scan=None):
    d, c = dims
    b, seqlen, _ = zxbcdt.shape
    xbc, dt = zxbcdt[..., d : d + c].transpose(1, 2), zxbcdt[..., d + c :]
    kw = {"D": prm["D"], "dt_bias": prm["dt_bias"], "dt_softplus": True, "initial_state": prm["h0"],
          "state_offset": prm["h_off"], "y_offset": prm["y_off"], "resets": resets, "chunk_size": chunk}  # fmt: skip
    if fused_op:
        return fused.conv_ssd_scan_triton(xbc, prm["weight"], prm["bias"], dt, prm["A"], headdim=p, ngroups=g,
                                          conv_initial_state=prm["conv0"], mask=mask, **kw)  # fmt: skip
    out = conv_fused.causal_conv1d_triton(xbc, prm["weight"], prm["bias"], initial_state=prm["conv0"],
                                          activation="silu", channels_last=True).transpose(1, 2)  # fmt: skip
    out = (out * mask[:, :, None]).to(out.dtype)
    x, B, C = torch.split(out, [d, (c - d) // 2, (c - d) // 2], dim=-1)
    return scan(x.reshape(b, seqlen, h, p), dt, prm["A"], B.reshape(b, seqlen, g, -1), C.reshape(b, seqlen, g, -1),
                **kw)  # fmt: skip


def _conv_scan_grads(zxbcdt, prm, *args, **kw):
    leaves = [zxbcdt, *prm.values()]
    for t in leaves:
        t.grad = None
    y = _conv_scan(zxbcdt, prm, *args, **kw)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    (y.float() * w).sum().backward()
    return y.detach(), {name: t.grad.clone() for name, t in {"zxbcdt": zxbcdt, **prm}.items()}


@pytest.mark.parametrize("recompute", [True, False], ids=["recompute-states", "kept-states"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_conv_ssd_scan_resets(dtype, recompute, monkeypatch):
    """The fused conv + scan with resets: the unfused conv + Triton scan bit for bit, and the unfused conv + reference
    scan up to rounding (the in_proj output, the conv's weight, bias and initial state, A, D, dt_bias, h0, h', y')."""
    monkeypatch.setattr(fused.ConvSSDScanFunction, "recompute_states", recompute)
    h, p, g, n, k, chunk = 6, 6 if DEVICE == "cpu" else 16, 2, 10, 4, 32
    b, seqlen = 2, 200
    zxbcdt, prm, mask, dims = make_conv_inputs(b, seqlen, h, p, g, n, k, dtype, padded=True, offsets=True)
    resets = make_resets(b, seqlen)
    args = (mask, dims, h, p, g, resets, chunk)
    y0, g0 = _conv_scan_grads(zxbcdt, prm, *args, fused_op=False, scan=ssd_scan_ref)
    y1, g1 = _conv_scan_grads(zxbcdt, prm, *args, fused_op=True)
    y2, g2 = _conv_scan_grads(zxbcdt, prm, *args, fused_op=False, scan=fused.ssd_scan_triton)
    assert torch.equal(y1, y2)
    assert_close("y", y0, y1, _ratio(dtype))
    for name in g0:
        assert torch.equal(g1[name], g2[name]), name
        assert_close(f"d{name}", g0[name], g1[name], _ratio(dtype))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("seqlen", "g", "dtype"), GPU_CASES, ids=[f"L{s}-G{g}-{str(d)[6:]}" for s, g, d in GPU_CASES])
def test_ssd_scan_triton_resets_gpu(seqlen, g, dtype):
    inputs = make_inputs(4, seqlen, 24, 64, 128, g, dtype, ALL, per_row=g == 8)
    check(fused.ssd_scan_triton, inputs, 64, RATIO_GPU[dtype])
