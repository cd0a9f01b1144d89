"""Gated delta rule: the reference against transformers' own recurrence, the chunked torch path against the reference
(outputs, final states, gradients of every input), the dispatcher's checks. ``-m gpu``: the torch and fla backends
on CUDA in fp32 and bf16 (``check_backend`` takes a device, so it runs on the CPU too)."""

from __future__ import annotations

import pytest
import torch

from ssmtune import ops
from ssmtune.ops.gated_delta.chunk import gated_delta_rule_torch
from ssmtune.ops.gated_delta.naive import gated_delta_rule_ref
from ssmtune.ops.testing import assert_close

# (id, B, L, Hk, H, K, V, per-channel gate, chunk_size): odd lengths, grouped value heads, chunks that do not divide L
CASES = [
    ("L1-gdn", 2, 1, 2, 4, 8, 6, False, 4),
    ("L17-gdn-grouped", 2, 17, 2, 4, 5, 7, False, 8),
    ("L33-gdn-c64", 1, 33, 3, 3, 8, 8, False, None),
    ("L19-kda", 2, 19, 2, 2, 6, 5, True, 8),
    ("L9-kda-grouped", 1, 9, 1, 3, 4, 3, True, 4),
]
GRADS = ("q", "k", "v", "g", "beta", "initial_state", "state_offset", "output_offset")


def make_inputs(b, seqlen, hk, h, dk, dv, per_channel, *, seed=0, batched_state=False, decay=0.7):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)
    lead = (b,) if batched_state else ()
    return {
        "q": r(b, seqlen, hk, dk),
        "k": r(b, seqlen, hk, dk),
        "v": r(b, seqlen, h, dv),
        "g": -torch.rand(*((b, seqlen, h, dk) if per_channel else (b, seqlen, h)), generator=gen) * decay,
        "beta": torch.rand(b, seqlen, h, generator=gen),
        "initial_state": r(*lead, h, dk, dv) * 0.5,
        "state_offset": r(*lead, h, dk, dv) * 0.5,
        "output_offset": r(*lead, h, dv) * 0.5,
    }


def _run(fn, inputs, **kw):
    args = [inputs[n] for n in ("q", "k", "v", "g", "beta")]
    rest = {n: inputs[n] for n in ("initial_state", "state_offset", "output_offset")}
    return fn(*args, **rest, output_final_state=True, use_qk_l2norm=True, **kw)


# transformers' own recurrences (sequential and chunked): Gated DeltaNet (Qwen3.5) and KDA (Kimi-Linear)
TRANSFORMERS = [
    ("qwen3_5", "torch_recurrent_gated_delta_rule", "torch_chunk_gated_delta_rule", False),
    ("kimi_linear", "recurrent_kimi_delta_attention", "chunk_kimi_delta_attention", True),
]


@pytest.mark.parametrize(
    ("model", "recurrent", "chunked", "per_channel"), TRANSFORMERS, ids=[t[0] for t in TRANSFORMERS]
)
def test_reference_matches_transformers(model, recurrent, chunked, per_channel):
    module = pytest.importorskip(f"transformers.models.{model}.modeling_{model}")
    heads = (3, 3) if per_channel else (2, 4)
    x = make_inputs(2, 23, *heads, 8, 6 + 2 * per_channel, per_channel, batched_state=True)
    o, s = gated_delta_rule_ref(
        x["q"], x["k"], x["v"], x["g"], x["beta"], use_qk_l2norm=True, initial_state=x["initial_state"],
        output_final_state=True,
    )  # fmt: skip
    for fn, kw in ((getattr(module, recurrent), {}), (getattr(module, chunked), {"chunk_size": 8})):
        o2, s2 = fn(
            x["q"], x["k"], x["v"], g=x["g"], beta=x["beta"], initial_state=x["initial_state"],
            output_final_state=True, use_qk_l2norm_in_kernel=True, **kw,
        )  # fmt: skip
        assert_close("o", o2, o, 1e-5)
        assert_close("state", s2, s, 1e-5)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_chunked_matches_reference(case):
    _, b, seqlen, hk, h, dk, dv, per_channel, chunk = case
    x = make_inputs(b, seqlen, hk, h, dk, dv, per_channel)
    for t in x.values():
        t.requires_grad_(True)
    o_ref, s_ref = _run(gated_delta_rule_ref, x)
    o, s = _run(gated_delta_rule_torch, x, chunk_size=chunk)
    assert_close("o", o_ref, o, 1e-5)
    assert_close("final state", s_ref, s, 1e-5)
    gen = torch.Generator().manual_seed(1)
    do, ds = torch.randn(o.shape, generator=gen), torch.randn(s.shape, generator=gen)
    ref_grads = torch.autograd.grad((o_ref * do).sum() + (s_ref * ds).sum(), [x[n] for n in GRADS])
    grads = torch.autograd.grad((o * do).sum() + (s * ds).sum(), [x[n] for n in GRADS])
    for name, want, got in zip(GRADS, ref_grads, grads):
        assert_close(f"d{name}", want, got, 1e-4)


def test_state_offset_is_a_read_out():
    """S' adds q̂ᵀS' and never enters the recurrence: the final state ignores it, and with q̂ = scale · l2norm(q)."""
    x = make_inputs(1, 7, 2, 2, 4, 3, False)
    o0, s0 = ops.gated_delta_rule(
        x["q"], x["k"], x["v"], x["g"], x["beta"], output_final_state=True, scale=0.3, use_qk_l2norm=True, backend="ref"
    )
    o1, s1 = ops.gated_delta_rule(
        x["q"], x["k"], x["v"], x["g"], x["beta"], state_offset=x["state_offset"], output_final_state=True,
        scale=0.3, use_qk_l2norm=True, backend="torch",
    )  # fmt: skip
    q_hat = x["q"] / x["q"].square().sum(-1, keepdim=True).add(1e-6).sqrt() * 0.3
    assert_close("o - o0", torch.einsum("blhk,hkv->blhv", q_hat, x["state_offset"]), o1 - o0, 1e-5)
    assert_close("state", s0, s1, 1e-5)


def test_per_row_and_shared_states_agree():
    x = make_inputs(2, 5, 1, 2, 4, 3, False)
    shared = _run(gated_delta_rule_torch, x)
    rows = {n: x[n].expand(2, *x[n].shape) for n in ("initial_state", "state_offset", "output_offset")}
    per_row = _run(gated_delta_rule_torch, {**x, **rows})
    assert_close("o", shared[0], per_row[0], 1e-6)


def test_auto_runs_torch_on_cpu():
    x = make_inputs(1, 6, 1, 1, 4, 4, False)
    out = ops.gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"])
    assert_close("o", gated_delta_rule_ref(x["q"], x["k"], x["v"], x["g"], x["beta"]), out, 1e-5)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"backend": "cuda"}, "backend must be one of"),
        ({"q": torch.zeros(1, 6, 2, 4), "k": torch.zeros(1, 6, 2, 4), "v": torch.zeros(1, 6, 3, 4)}, "multiple of key"),
        ({"g": torch.zeros(1, 6, 2, 3)}, "g must have shape"),
        ({"initial_state": torch.zeros(2, 4, 5)}, "initial_state must have shape"),
        ({"output_offset": torch.zeros(4)}, "output_offset must have shape"),
        ({"chunk_size": 0}, "chunk_size must be positive"),
    ],
)
def test_bad_arguments(change, match):
    args = {"q": torch.zeros(1, 6, 1, 4), "k": torch.zeros(1, 6, 1, 4), "v": torch.zeros(1, 6, 2, 4),
            "g": torch.zeros(1, 6, 2), "beta": torch.zeros(1, 6, 2)}  # fmt: skip
    args.update(change)
    with pytest.raises(ValueError, match=match):
        ops.gated_delta_rule(**args)


def test_fla_backend_without_fla_names_the_extra():
    from ssmtune.ops.gated_delta.fla import fla_importable

    if fla_importable():
        pytest.skip("fla is installed")
    x = make_inputs(1, 3, 1, 1, 4, 4, False)
    with pytest.raises(ValueError, match=r"ssmtune\[fla\]"):
        ops.gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], backend="fla")


@pytest.mark.parametrize(
    ("capability", "triton", "ok"),
    [((9, 0), (3, 6, 0), False), ((9, 0), (3, 7, 1), True), ((9, 0), (3, 3, 1), True), ((8, 0), (3, 6, 0), True)],
)
def test_fla_backward_refused_on_hopper_with_triton_3_4_to_3_7_0(monkeypatch, capability, triton, ok):
    from ssmtune.ops.gated_delta import fla

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(fla, "_triton_version", lambda: triton)
    assert fla.fla_backward_ok(torch.device("cuda", 0)) is ok
    assert not fla.fla_backward_ok(torch.device("cpu"))


@pytest.mark.parametrize(("hopper", "dims", "train"), [
    (True, (128, 128), True), (True, (64, 192), True), (True, (32, 16), False), (True, (128, 96), False),
    (False, (32, 16), True),
])  # fmt: skip
def test_auto_trains_on_fla_only_at_vetted_head_dims_where_ours_stands_in(monkeypatch, hopper, dims, train):
    """Where fla refuses its gated backward (Hopper, Triton 3.4-3.7.0) auto trains Gated DeltaNet on fla only at head
    dims that are multiples of 64 (fla's own backward crashed at K=32, V=16 there); forward-only and other GPUs keep
    fla at any head dims."""
    from ssmtune.ops.gated_delta import fla, fla_bwd

    monkeypatch.setattr(fla, "fla_importable", lambda: True)
    monkeypatch.setattr(fla, "fla_backward_ok", lambda device: not hopper)
    monkeypatch.setattr(fla_bwd, "install", lambda: True)
    cuda = torch.device("cuda", 0)
    assert fla.fla_usable(cuda, True, head_dims=dims) is train
    assert fla.fla_usable(cuda, False, head_dims=dims)
    assert fla.fla_usable(cuda, True) is True  # no dims given: the device rule alone
    assert not fla.fla_usable(cuda, True, per_channel=True, head_dims=(128, 128)) or not hopper


# --- CUDA (-m gpu): the torch and fla backends against the fp32 reference -------------------------------------------

# (id, B, L, Hk, H, K, V, per-channel gate, per-row states): lengths that fla's 64-step chunks do not divide, grouped
# value heads, head dims fla's kernels take (16, 32, 64)
GPU_CASES = [
    ("L67-gdn-grouped", 2, 67, 2, 4, 32, 16, False, False),
    ("L130-gdn-rows", 2, 130, 1, 1, 64, 64, False, True),
    ("L67-kda-grouped-rows", 2, 67, 1, 2, 16, 32, True, True),
    ("L130-kda", 1, 130, 2, 2, 32, 32, True, False),
]
# RMS-relative error against the fp32 reference on the same (rounded) inputs: (o and final state, gradients).
# fla runs its fp32 dots in TF32; in bf16 it rounds operands of its dots to bf16
GPU_RATIO = {
    ("torch", torch.float32): (1e-4, 1e-3),
    ("fla", torch.float32): (5e-3, 2e-2),
    ("torch", torch.bfloat16): (2e-2, 5e-2),
    ("fla", torch.bfloat16): (2e-2, 5e-2),
}
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _device_inputs(case, dtype, device):
    """Leaves on ``device``: q, k, v, beta in ``dtype``; g and the states in fp32, as the mixers pass them.

    Decay rates from 0.003 to 1 per step across heads (key channels for KDA), so that the initial state still shows
    after 130 steps and a per-channel gate differs from its mean; small offsets, so that the recurrence dominates o
    (dropping h0, the offsets or the per-channel gate moves o by > 20%)."""
    _, b, seqlen, hk, h, dk, dv, per_channel, rows = case
    rates = 10 ** torch.linspace(-2.5, 0, dk if per_channel else h)
    x = make_inputs(b, seqlen, hk, h, dk, dv, per_channel, batched_state=rows, decay=rates)
    x["state_offset"] *= 0.2
    x["output_offset"] *= 0.2
    low = ("q", "k", "v", "beta")
    return {n: t.to(device, dtype if n in low else torch.float32).requires_grad_() for n, t in x.items()}


def _grads(o, s, do, ds, leaves):
    return torch.autograd.grad((o.float() * do).sum() + (s * ds).sum(), [leaves[n] for n in GRADS])


def _spy(monkeypatch, picked):
    """Record which implementation the dispatcher calls (it imports them from their modules at each call)."""
    from ssmtune.ops.gated_delta import chunk, fla

    def recording(fn, name):
        def wrapper(*args, **kwargs):
            picked.append(name)
            return fn(*args, **kwargs)

        return wrapper

    for module, attr, name in ((fla, "gated_delta_rule_fla", "fla"), (chunk, "gated_delta_rule_torch", "torch")):
        monkeypatch.setattr(module, attr, recording(getattr(module, attr), name))


def check_backend(case, backend, dtype, device, monkeypatch):
    """Outputs, final state and every gradient of ``backend`` against the reference. Where fla's backward does not
    work (``fla_usable``: KDA, or head dims fla's backward crashed on, where fla refuses its gated backward), fla's
    forward only, and ``backend="auto"`` must then train on a path whose backward
    works (and still take fla without a gradient)."""
    from ssmtune.ops.gated_delta.fla import fla_importable, fla_usable

    x = _device_inputs(case, dtype, device)
    ref = {n: t.detach().float().requires_grad_() for n, t in x.items()}
    o_ref, s_ref = _run(gated_delta_rule_ref, ref)
    gen = torch.Generator().manual_seed(1)
    do, ds = (torch.randn(t.shape, generator=gen).to(device) for t in (o_ref, s_ref))
    ref_grads = _grads(o_ref, s_ref, do, ds, ref)
    ratio, grad_ratio = GPU_RATIO[backend, dtype]
    per_channel = x["g"].dim() == 4
    # fla trains where its backward works, and Gated DeltaNet also where our chunk_bwd_dqkwg port stands in for it
    dims = (x["q"].shape[-1], x["v"].shape[-1])
    backward = backend != "fla" or fla_usable(torch.device(device), True, per_channel, head_dims=dims)
    with torch.set_grad_enabled(backward):
        o, s = _run(ops.gated_delta_rule, x, backend=backend)
    assert o.dtype == dtype and s.dtype == torch.float32
    assert_close("o", o_ref, o, ratio)  # also fails on NaN / inf
    assert_close("final state", s_ref, s, ratio)
    if not backward:
        picked = []
        _spy(monkeypatch, picked)
        o, s = _run(ops.gated_delta_rule, x, backend="auto")
        assert picked == ["torch"], picked
        ratio, grad_ratio = GPU_RATIO["torch", dtype]
        assert_close("o (auto)", o_ref, o, ratio)
        with torch.no_grad():
            _run(ops.gated_delta_rule, x, backend="auto")
        on_fla = torch.device(device).type == "cuda" and fla_importable()
        assert picked == ["torch", "fla" if on_fla else "torch"], picked
    for name, want, got in zip(GRADS, ref_grads, _grads(o, s, do, ds, x)):
        assert_close(f"d{name}", want, got, grad_ratio)


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("device", ["cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", GPU_CASES, ids=[c[0] for c in GPU_CASES])
@pytest.mark.parametrize("backend", ["torch", "fla", "fla-readout-torch"])
def test_backend_matches_reference_cuda(backend, case, dtype, device, monkeypatch):
    if backend.startswith("fla"):
        pytest.importorskip("fla")
    if backend == "fla-readout-torch":  # the offsets read out by torch ops rather than offsets_triton's kernels
        from ssmtune.ops.gated_delta import fla

        monkeypatch.setattr(fla, "READOUT", "torch")
        backend = "fla"
    check_backend(case, backend, dtype, device, monkeypatch)


@pytest.mark.parametrize(
    ("backward_ok", "grad", "per_channel", "usable"),
    [(True, True, True, True), (False, False, True, True), (False, True, False, True), (False, True, True, False)],
)
def test_auto_trains_gated_deltanet_on_fla_with_our_dqkwg(monkeypatch, backward_ok, grad, per_channel, usable):
    """Where fla refuses its gated chunk_bwd_dqkwg, Gated DeltaNet still trains on fla (our port installed); KDA not."""
    from ssmtune.ops.gated_delta import fla, fla_bwd

    monkeypatch.setattr(fla, "fla_importable", lambda: True)
    monkeypatch.setattr(fla, "fla_backward_ok", lambda device: backward_ok)
    monkeypatch.setattr(fla_bwd, "install", lambda: True)
    assert fla.fla_usable(torch.device("cuda", 0), grad, per_channel) is usable
    assert not fla.fla_usable(torch.device("cpu"), grad, per_channel)
