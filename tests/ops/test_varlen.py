"""Packed sequences (``cu_seqlens``) on selective_scan, ssd_scan and causal_conv1d, every backend: the packed call
equals separate reference runs of each sequence on outputs, final states and the gradients of every input (per-sequence
initial states, state offsets and output offsets included), with one bucket per length and with one bucket; the
buckets minimise their cost (``varlen._groups``). Outputs are NaN-poisoned by tests/conftest.py.

On CPU the Triton kernels run under the interpreter (total length <= 128); ``-m gpu`` runs 8 sequences of up to 2048.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
from _triton_interp import interpret_on_cpu, reload_compiled

interpret_on_cpu()

from ssmtune import ops
from ssmtune.ops import conv_fused, varlen
from ssmtune.ops.selective_scan import fused as scan_fused
from ssmtune.ops.ssd import fused as ssd_fused
from ssmtune.ops.testing import assert_close

reload_compiled(conv_fused, scan_fused, ssd_fused)
if not torch.cuda.is_available():
    ops._cache.clear()

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LENS = [1, 7, 33, 65]  # odd lengths and a ragged last chunk / tile; 106 tokens in all
# RMS-relative error against the fp32 reference; on the GPU fp32 dots of the Triton SSD run in TF32
RATIO = {torch.float32: 5e-3, torch.bfloat16: 3e-2} if DEVICE == "cuda" else {torch.float32: 1e-4, torch.bfloat16: 2e-2}
BACKENDS = ("ref", "torch", "triton")


def _leaves(specs: dict[str, tuple], device: str) -> dict[str, torch.Tensor]:
    out = {}
    for name, (shape, scale, shift) in specs.items():
        out[name] = (torch.randn(*shape, device=device) * scale + shift).requires_grad_()
    return out


def _clone(leaves: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}


def _compare(name, packed_out, ref_out, packed_leaves, ref_leaves, dtype):
    (y, last), (ry, rlast) = packed_out, ref_out
    assert_close(f"{name} y", ry.float(), y.float(), RATIO[dtype])
    assert_close(f"{name} final state", rlast, last, RATIO[dtype])
    gy, gl = torch.randn_like(ry.float()), torch.randn_like(rlast)
    ((y.float() * gy).sum() + (last * gl).sum()).backward()
    ((ry.float() * gy).sum() + (rlast * gl).sum()).backward()
    for k in packed_leaves:
        assert_close(f"{name} d{k}", ref_leaves[k].grad, packed_leaves[k].grad, RATIO[dtype])


def _cu(lens, device):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _scan(a, cu, backend):
    return ops.selective_scan(
        a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], a["z"], a["delta_bias"], True, initial_state=a["h0"],
        state_offset=a["h_off"], y_offset=a["y_off"], return_final_state=True, cu_seqlens=cu, backend=backend,
    )  # fmt: skip


def _ssd(a, cu, backend):
    return ops.ssd_scan(
        a["x"], a["dt"], a["A"], a["B"], a["C"], chunk_size=None if DEVICE == "cuda" else 16, D=a["D"], z=a["z"], dt_bias=a["dt_bias"],
        dt_softplus=True, initial_state=a["h0"], state_offset=a["h_off"], y_offset=a["y_off"],
        return_final_state=True, cu_seqlens=cu, backend=backend,
    )  # fmt: skip


def _conv(channels_last):
    def call(a, cu, backend):
        return ops.causal_conv1d(a["x"], a["w"], a["bias"], initial_state=a["h0"], activation="silu",
                                 return_final_state=True, channels_last=channels_last, cu_seqlens=cu,
                                 backend=backend)  # fmt: skip

    return call


def _specs(op, total, ns, per_seq, big=False):
    """name -> (shape, scale, shift, time dim or None, dims when shared or None). ``big``: GPU sizes (the Triton
    SSD needs head dim >= 16 on the GPU)."""
    r = (ns,) if per_seq else ()
    if op == "selective_scan":
        d, n = (64, 16) if big else (6, 5)
        return {
            "u": ((1, d, total), 1.0, 0.0, 2, None), "delta": ((1, d, total), 0.5, 0.0, 2, None),
            "A": ((d, n), 0.3, -1.0, None, None), "B": ((1, n, total), 1.0, 0.0, 2, None),
            "C": ((1, n, total), 1.0, 0.0, 2, None), "D": ((d,), 1.0, 0.0, None, None),
            "z": ((1, d, total), 1.0, 0.0, 2, None), "delta_bias": ((d,), 0.3, 0.0, None, None),
            "h0": ((ns, d, n), 1.0, 0.0, None, 2), "h_off": ((*r, d, n), 1.0, 0.0, None, 2),
            "y_off": ((*r, d), 1.0, 0.0, None, 1),
        }  # fmt: skip
    if op == "ssd_scan":
        h, p, g, n = (8, 64, 2, 64) if big else (4, 8, 2, 16)
        return {
            "x": ((1, total, h, p), 1.0, 0.0, 1, None), "dt": ((1, total, h), 0.5, 0.0, 1, None),
            "A": ((h,), 0.3, -1.0, None, None), "B": ((1, total, g, n), 1.0, 0.0, 1, None),
            "C": ((1, total, g, n), 1.0, 0.0, 1, None), "D": ((h,), 1.0, 0.0, None, None),
            "z": ((1, total, h, p), 1.0, 0.0, 1, None), "dt_bias": ((h,), 0.3, 0.0, None, None),
            "h0": ((ns, h, p, n), 1.0, 0.0, None, 3), "h_off": ((*r, h, p, n), 1.0, 0.0, None, 3),
            "y_off": ((*r, h, p), 1.0, 0.0, None, 2),
        }  # fmt: skip
    c, k = (256 if big else 8), 4
    return {
        "x": ((1, c, total), 1.0, 0.0, 2, None), "w": ((c, k), 0.5, 0.0, None, None),
        "bias": ((c,), 1.0, 0.0, None, None), "h0": ((*r, c, k - 1), 1.0, 0.0, None, 2),
    }  # fmt: skip


CALLS = {"selective_scan": (_scan, 2), "ssd_scan": (_ssd, 1), "conv": (_conv(False), 2), "conv_cl": (_conv(True), 2)}


def run_packed_vs_separate(op, backend, dtype, lens, per_seq=True, device=DEVICE):
    total, ns = sum(lens), len(lens)
    call, ydim = CALLS[op]
    specs = _specs("causal_conv1d" if op.startswith("conv") else op, total, ns, per_seq, big=device == "cuda")
    leaves = {k: (torch.randn(*s[0], device=device) * s[1] + s[2]).requires_grad_() for k, s in specs.items()}
    ref = _clone(leaves)
    # the packed call on the backend under test, in dtype
    packed_args = {k: v.to(dtype) if specs[k][3] is not None else v for k, v in leaves.items()}
    y, last = call(packed_args, _cu(lens, device), backend)
    # separate reference runs of each sequence
    bounds, ys, lasts = _cu(lens, "cpu").tolist(), [], []
    for i in range(ns):
        a = {}
        for k, v in ref.items():
            tdim, shared = specs[k][3], specs[k][4]
            if tdim is not None:
                a[k] = v.narrow(tdim, bounds[i], bounds[i + 1] - bounds[i]).to(dtype)
            elif shared is not None and v.dim() > shared:
                a[k] = v[i : i + 1]
            else:
                a[k] = v
        yi, li = call(a, None, "ref")
        ys.append(yi)
        lasts.append(li)
    ref_out = torch.cat(ys, dim=ydim), torch.cat(lasts, dim=0)
    assert not torch.isnan(y).any()
    if op == "conv_cl":
        assert y.transpose(1, 2).is_contiguous(), "channels_last output must stay [B, L, C] memory"
    _compare(f"{op}[{backend}, {dtype}]", (y, last.float()), (ref_out[0], ref_out[1].float()), leaves, ref, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["selective_scan", "ssd_scan", "conv", "conv_cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("overhead", [0, 10**9], ids=["bucket-per-length", "one-bucket"])
def test_packed_equals_separate(op, backend, dtype, overhead, monkeypatch):
    monkeypatch.setattr(varlen, "BUCKET_OVERHEAD_TOKENS", overhead)
    buckets = varlen._plan_now(_cu(LENS, "cpu").tolist(), 0, False, torch.device("cpu"))[0]
    assert len(buckets) == (len(LENS) if overhead == 0 else 1)
    run_packed_vs_separate(op, backend, dtype, LENS)


def _cost(groups, lens, overhead):
    return sum(overhead + len(g) * max(lens[i] for i in g) for g in groups)


def test_groups_by_hand():
    # sorted 100, 90, 10, 9 at overhead 50: {100, 90} {10, 9} costs 50 + 200 + 50 + 20 = 320; one group 450, four 409
    assert varlen._groups([100, 90, 10, 9], 50) == [[0, 1], [2, 3]]
    assert varlen._groups([9, 100, 10, 90], 50) == [[1, 3], [2, 0]]  # the same, from the sorted order
    # no overhead: no padding (singletons here; equal lengths share a bucket at no cost)
    assert varlen._groups([1, 8, 2, 4], 0) == [[1], [3], [2], [0]]
    assert varlen._groups([5, 3, 5], 0) == [[0, 2], [1]]
    for huge in (10**9, math.inf):
        assert varlen._groups([2048, 32, 1, 700], huge) == [[0, 3, 1, 2]]
    with pytest.raises(ValueError, match="BUCKET_OVERHEAD_TOKENS must be >= 0, got -1"):
        varlen._groups([3, 1], -1)


def test_groups_minimise_the_cost():
    """Against every contiguous grouping of the sorted lengths, on random small lists."""
    rng = random.Random(0)
    for _ in range(200):
        top = rng.choice([4, 300])  # 4: many equal lengths
        lens = [rng.randint(1, top) for _ in range(rng.randint(1, 8))]
        overhead = rng.choice([0, 1, 3, 40, 200, 1000])
        srt = sorted(range(len(lens)), key=lambda i: -lens[i])
        best = min(
            _cost([srt[a:b] for a, b in itertools.pairwise((0, *cuts, len(lens)))], lens, overhead)
            for k in range(len(lens))
            for cuts in itertools.combinations(range(1, len(lens)), k)
        )
        groups = varlen._groups(lens, overhead)
        assert sorted(i for g in groups for i in g) == list(range(len(lens)))
        assert _cost(groups, lens, overhead) == best, (lens, overhead, groups)


def test_default_overhead_on_the_benchmark_batches(monkeypatch):
    """What the default's comment promises: 1-2 buckets on ``bench packing``'s batches (8 sequences, log-uniform
    32..2048), and a 2,048-token sequence split from 5 or more 32-token ones."""
    from ssmtune.bench.packing import skewed_items

    lens = [len(it["input_ids"]) for it in skewed_items(256, 32, 2048, 50280)]
    counts = {len(varlen._groups(lens[i : i + 8], varlen.BUCKET_OVERHEAD_TOKENS)) for i in range(0, 256, 8)}
    assert counts <= {1, 2} and 2 in counts
    assert [len(varlen._groups([2048] + [32] * k, varlen.BUCKET_OVERHEAD_TOKENS)) for k in (4, 5, 40)] == [1, 2, 2]
    # the plan follows the attribute at call time (its cache is keyed by the value)
    bounds = _cu([2048] + [32] * 5, "cpu").tolist()
    assert len(varlen._plan_now(bounds, 0, False, torch.device("cpu"))[0]) == 2
    monkeypatch.setattr(varlen, "BUCKET_OVERHEAD_TOKENS", 10**6)
    assert len(varlen._plan_now(bounds, 0, False, torch.device("cpu"))[0]) == 1


@pytest.mark.parametrize("op", ["selective_scan", "ssd_scan", "conv"])
def test_shared_offsets_and_single_sequence(op):
    run_packed_vs_separate(op, "torch", torch.float32, LENS, per_seq=False)
    run_packed_vs_separate(op, "torch", torch.float32, [9])


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_without_initial_state(backend):
    lens, x, w = [2, 9, 1], torch.randn(1, 5, 12, device=DEVICE), torch.randn(5, 4, device=DEVICE)
    y, last = ops.causal_conv1d(x, w, return_final_state=True, cu_seqlens=_cu(lens, DEVICE), backend=backend)
    bounds = _cu(lens, "cpu").tolist()
    for i in range(3):
        yi, li = ops.causal_conv1d(x[..., bounds[i] : bounds[i + 1]], w, return_final_state=True, backend="ref")
        assert_close("y", yi, y[..., bounds[i] : bounds[i + 1]], 1e-6)
        assert torch.equal(li[0], last[i])


@pytest.mark.parametrize("backend", ["torch", "ref"])
def test_step_size_without_softplus(backend):
    """Without softplus the bias is folded into the step size, so that a padding step stays an identity."""
    lens, d, n = [3, 8, 1], 4, 3
    u, delta = torch.randn(1, d, 12), torch.rand(1, d, 12)
    A, B, C, bias, h0 = (
        -torch.rand(d, n),
        torch.randn(1, n, 12),
        torch.randn(1, n, 12),
        torch.rand(d),
        torch.randn(3, d, n),
    )
    y, last = ops.selective_scan(u, delta, A, B, C, delta_bias=bias, initial_state=h0, return_final_state=True,
                                 cu_seqlens=_cu(lens, "cpu"), backend=backend)  # fmt: skip
    bounds = _cu(lens, "cpu").tolist()
    for i in range(3):
        a, b = bounds[i], bounds[i + 1]
        yi, li = ops.selective_scan(u[..., a:b], delta[..., a:b], A, B[..., a:b], C[..., a:b], delta_bias=bias,
                                    initial_state=h0[i], return_final_state=True, backend="ref")  # fmt: skip
        assert_close("y", yi, y[..., a:b], 1e-5)
        assert_close("final", li[0], last[i], 1e-5)


def test_bad_cu_seqlens():
    x = torch.randn(1, 4, 10)
    w = torch.randn(4, 3)
    cases = {
        "int32 or int64": torch.tensor([0.0, 10.0]),
        "start at 0": torch.tensor([1, 10], dtype=torch.int32),
        "strictly increasing": torch.tensor([0, 4, 4, 10], dtype=torch.int32),
        "1-D tensor": torch.tensor([[0, 10]], dtype=torch.int32),
    }
    for msg, cu in cases.items():
        with pytest.raises(ValueError, match=msg):
            ops.causal_conv1d(x, w, cu_seqlens=cu, backend="torch")
    with pytest.raises(ValueError, match="batch of one row"):
        ops.causal_conv1d(x.expand(2, 4, 10), w, cu_seqlens=torch.tensor([0, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="initial_state"):
        ops.selective_scan(x, x, torch.randn(4, 2), torch.randn(1, 2, 10), torch.randn(1, 2, 10),
                           initial_state=torch.randn(3, 4, 2), cu_seqlens=torch.tensor([0, 4, 10]))  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["selective_scan", "ssd_scan", "conv_cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_gpu(op, dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    lens = [2048, 1, 1031, 64, 2047, 513, 7, 1500]  # 8 sequences up to 2048
    run_packed_vs_separate(op, "triton", dtype, lens, device="cuda")
