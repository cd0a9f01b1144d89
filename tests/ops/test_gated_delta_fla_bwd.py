"""Our ports of fla's gated ``chunk_bwd_dqkwg`` (torch, and our Triton kernel) against fla's own kernel and each other,
and fla's whole Gated DeltaNet backward with each in place against the fp32 reference (gradients of q, k, v, g, beta
and the initial state).

Needs fla (``ssmtune[fla]``); skipped without it. On CPU fla's kernels run under the Triton interpreter, in fp32 only
(the interpreter's bf16 dots lose the kernels' results) and with one autotune config each (it cannot time them); ``-m gpu`` runs
bf16 and fp32 on CUDA with the port forced on.
"""

from __future__ import annotations

import builtins
import importlib
import inspect

import pytest
import torch
from _triton_interp import interpret_on_cpu, interpreted

interpret_on_cpu()  # before fla's kernels are decorated
pytest.importorskip("fla")

from ssmtune import ops
from ssmtune.ops.gated_delta import fla_bwd
from ssmtune.ops.gated_delta.naive import gated_delta_rule_ref
from ssmtune.ops.testing import assert_close


def _interpreted() -> bool:
    from fla.ops.common import chunk_o

    return interpreted(chunk_o.chunk_bwd_kernel_dqkwg)


if not torch.cuda.is_available() and not _interpreted():
    pytest.skip("fla was imported before TRITON_INTERPRET was set (run this file alone)", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def interpreted_fla(monkeypatch):
    """Let fla's kernels run under the interpreter: one config per autotuner, and loop counters that are tensors."""
    if DEVICE == "cuda":
        return
    import triton.language as tl
    from triton.runtime import autotuner

    prune = autotuner.Autotuner.prune_configs
    monkeypatch.setattr(autotuner.Autotuner, "prune_configs", lambda self, kwargs: prune(self, kwargs)[:1])

    def tensor_range(*bounds):
        # fla calls ``i_t.to(...)`` on a ``range`` counter, which the interpreter leaves a Python int
        for i in builtins.range(*(int(b) for b in bounds)):
            yield tl.full((), i, tl.int32)

    monkeypatch.setattr(importlib.import_module("fla.ops.common.chunk_delta_h"), "range", tensor_range, raising=False)


def kernel_inputs(b, t, hk, h, dk, dv, chunk, *, state_v_first=False, cu_seqlens=None, dtype=torch.float32):
    gen = torch.Generator().manual_seed(t * 31 + dk)
    if cu_seqlens is None:
        nt = b * -(-t // chunk)
    else:
        lens = torch.tensor(cu_seqlens).diff()
        nt, b = int((-(-lens // chunk)).sum()), 1
        cu_seqlens = torch.tensor(cu_seqlens, device=DEVICE)
    r = lambda *s: torch.randn(*s, generator=gen).to(DEVICE, dtype)
    state = (b, nt // b, h, dv, dk) if state_v_first else (b, nt // b, h, dk, dv)
    # a cumulated log-decay (fla cumulates it within each chunk, in log2 units; any values do for the comparison)
    g = (-torch.rand(b, t, h, generator=gen) * 0.5).cumsum(1).to(DEVICE)
    return {
        "q": r(b, t, hk, dk), "k": r(b, t, hk, dk), "v": r(b, t, h, dv), "do": r(b, t, h, dv), "h": r(*state),
        "dh": r(*state), "w": r(b, t, h, dk), "dv": r(b, t, h, dv), "g": g, "scale": 0.37,
        "state_v_first": state_v_first, "cu_seqlens": cu_seqlens, "chunk_size": chunk,
    }  # fmt: skip


# (id, B, T, Hk, H, K, V, chunk, state_v_first, cu_seqlens): odd lengths, grouped value heads, varlen
KERNEL_CASES = [
    ("T19-grouped", 2, 19, 1, 2, 8, 8, 16, False, None),
    ("T33-vfirst", 1, 33, 2, 2, 5, 7, 16, True, None),
    ("T7-one-chunk", 1, 7, 1, 1, 4, 6, 16, False, None),
    ("varlen", 1, 40, 1, 2, 8, 4, 16, False, [0, 7, 30, 40]),
]


def fla_refuses() -> bool:
    from ssmtune.ops.gated_delta.fla import fla_backward_ok

    return DEVICE == "cuda" and not fla_backward_ok(torch.device(DEVICE))


# and the mixers' size in bf16 on CUDA
WIDE_CASES = [
    *KERNEL_CASES,
    pytest.param(("T1000-bf16", 2, 1000, 2, 4, 128, 128, 64, True, None), marks=pytest.mark.gpu),
]
WIDE_IDS = [c[0] for c in KERNEL_CASES] + ["T1000-bf16"]


def case_inputs(case) -> tuple[dict, bool]:
    _, b, t, hk, h, dk, dv, chunk, v_first, cu = case
    bf16 = case[0].endswith("bf16")
    if bf16 and DEVICE == "cpu":
        pytest.skip("needs CUDA (the interpreter's bf16 dots lose the kernels' results)")
    x = kernel_inputs(b, t, hk, h, dk, dv, chunk, state_v_first=v_first, cu_seqlens=cu,
                      dtype=torch.bfloat16 if bf16 else torch.float32)  # fmt: skip
    return x, bf16


def ported(monkeypatch, impl: str, x: dict):
    monkeypatch.setattr(fla_bwd, "IMPL", impl)
    return fla_bwd.port(**x)


def assert_grads_close(want, got, bf16: bool) -> None:
    # fp32 tl.dot runs in TF32 on CUDA
    ratio = 1e-2 if bf16 else 5e-3 if DEVICE == "cuda" else 1e-5
    for name, ref, out in zip(("dq", "dk", "dw", "dg"), want, got, strict=True):
        assert out.dtype == ref.dtype, name
        assert_close(name, ref.float(), out.float(), ratio)


@pytest.mark.parametrize("case", WIDE_CASES, ids=WIDE_IDS)
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_port_matches_fla_kernel(impl, case, interpreted_fla, monkeypatch):
    from fla.ops.common.chunk_o import chunk_bwd_dqkwg

    if fla_refuses():
        pytest.skip("fla refuses its own kernel on this GPU (the torch port is the reference there)")
    x, bf16 = case_inputs(case)
    want = inspect.unwrap(chunk_bwd_dqkwg)(**x)  # fla's Triton kernel itself, past its backend registry
    assert_grads_close(want, ported(monkeypatch, impl, x), bf16)


@pytest.mark.parametrize("case", WIDE_CASES, ids=WIDE_IDS)
def test_triton_port_matches_torch_port(case, interpreted_fla, monkeypatch):
    x, bf16 = case_inputs(case)
    assert_grads_close(ported(monkeypatch, "torch", x), ported(monkeypatch, "triton", x), bf16)


@pytest.mark.parametrize("case", [KERNEL_CASES[0], KERNEL_CASES[-1]], ids=[KERNEL_CASES[0][0], KERNEL_CASES[-1][0]])
def test_torch_port_in_slices_matches_one_pass(case, monkeypatch):
    x, _ = case_inputs(case)
    whole = ported(monkeypatch, "torch", x)
    monkeypatch.setattr(fla_bwd, "SLICE_ELEMENTS", 1)  # one chunk per slice
    for name, ref, out in zip(("dq", "dk", "dw", "dg"), whole, fla_bwd.port(**x), strict=True):
        assert_close(name, ref, out, 1e-6)


def test_port_refuses_ungated_calls():
    x = kernel_inputs(1, 5, 1, 1, 4, 4, 16)
    with pytest.raises(ValueError, match="needs a per-token gate"):
        fla_bwd.port(**{**x, "g": None})


def test_registry_takes_only_what_fla_refuses(monkeypatch):
    x = kernel_inputs(1, 5, 1, 1, 4, 4, 16)
    assert fla_bwd._takes(**x)[0] is fla_refuses()
    assert not fla_bwd._takes(**{**x, "g": None})[0]
    with fla_bwd.forced():
        assert fla_bwd._takes(**x) == (True, None)
        assert not fla_bwd._takes(**{**x, "g_gamma": torch.zeros(1)})[0]
    monkeypatch.setattr(fla_bwd, "_installed", None)
    monkeypatch.setenv("FLA_DISABLE_BACKEND_DISPATCH", "1")
    assert not fla_bwd.install()


def run_gdn(monkeypatch, impl, dtype, b, t, hk, h, dk, dv, seed=0):
    """fla's Gated DeltaNet forward and backward with port ``impl`` forced on, against the fp32 reference."""
    calls = []
    port = fla_bwd.port
    monkeypatch.setattr(fla_bwd, "IMPL", impl)
    monkeypatch.setattr(fla_bwd, "port", lambda *a, **kw: calls.append(1) or port(*a, **kw))
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)
    x = {
        "q": r(b, t, hk, dk), "k": r(b, t, hk, dk), "v": r(b, t, h, dv),
        "g": -torch.rand(b, t, h, generator=gen) * 0.7, "beta": torch.rand(b, t, h, generator=gen),
        "initial_state": r(b, h, dk, dv) * 0.5,
    }  # fmt: skip
    x = {n: v.to(DEVICE, dtype if n in ("q", "k", "v", "beta") else torch.float32) for n, v in x.items()}
    names = list(x)
    ref_in = [x[n].detach().float().requires_grad_() for n in names]
    fla_in = [x[n].detach().requires_grad_() for n in names]
    o_ref, s_ref = gated_delta_rule_ref(*ref_in[:5], initial_state=ref_in[5], use_qk_l2norm=True,
                                        output_final_state=True)  # fmt: skip
    assert fla_bwd.install()
    with fla_bwd.forced():
        o, s = ops.gated_delta_rule(*fla_in[:5], initial_state=fla_in[5], use_qk_l2norm=True, output_final_state=True,
                                    backend="fla")  # fmt: skip
        do, ds = torch.randn_like(o_ref), torch.randn_like(s_ref)
        grads = torch.autograd.grad((o.float() * do).sum() + (s * ds).sum(), fla_in)
    assert calls, "fla's backward did not call the port"
    ref_grads = torch.autograd.grad((o_ref * do).sum() + (s_ref * ds).sum(), ref_in)
    # fla's fp32 dots run in TF32 on CUDA; the interpreter's are fp32
    ratio = 3e-2 if dtype == torch.bfloat16 else 5e-3 if DEVICE == "cuda" else 1e-4
    assert_close("o", o_ref, o.float(), ratio)
    assert_close("final state", s_ref, s, ratio)
    for name, want, got in zip(names, ref_grads, grads, strict=True):
        assert_close(f"d{name}", want, got.float(), ratio)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_fla_backward_with_port_matches_reference(impl, interpreted_fla, monkeypatch):
    if DEVICE == "cuda":
        pytest.skip("the CPU interpreter case (-m gpu runs it on CUDA)")
    run_gdn(monkeypatch, impl, torch.float32, 2, 19, 1, 2, 8, 8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 200, 2, 4, 64, 64), (1, 1000, 4, 4, 128, 128)], ids=["T200-grouped", "T1000"])
def test_fla_backward_with_port_matches_reference_gpu(impl, dtype, shape, monkeypatch):
    run_gdn(monkeypatch, impl, dtype, *shape)
