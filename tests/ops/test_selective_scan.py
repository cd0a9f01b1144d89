"""Mamba-1 selective scan: the reference against fp64 oracles, the torch backend (sequential on CPU) and the Blelloch
scan against the reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssmtune.ops import selective_scan, selective_state_update
from ssmtune.ops.selective_scan import sequential
from ssmtune.ops.selective_scan.naive import selective_scan_ref
from ssmtune.ops.selective_scan.parallel import selective_scan_blelloch, selective_scan_torch
from ssmtune.ops.testing import assert_close

# RMS-relative error allowed against the fp32 reference; bf16 outputs and input grads are rounded to bf16 at the end
RATIO = {torch.float32: 5e-5, torch.bfloat16: 2e-3}
# (id, B, D, L, N): odd sizes on purpose
CASES = [
    ("L1-D5-N3", 2, 5, 1, 3),
    ("L17-D60-N16", 2, 60, 17, 16),
    ("L63-D5-N16", 1, 5, 63, 16),
    ("L130-D60-N3", 2, 60, 130, 3),
]
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state", "state_offset", "y_offset")


def make_inputs(
    b: int, d: int, seqlen: int, n: int, *, dtype=torch.float32, per_batch=False, full=True
) -> dict[str, torch.Tensor]:
    """Activations in ``dtype``; parameters (A, D, bias, states, offsets) in fp32 as in the model. All leaves need grad."""
    act = {"dtype": dtype}
    ins = {
        "u": torch.randn(b, d, seqlen, **act),
        "delta": (0.5 * torch.randn(b, d, seqlen)).to(dtype),
        "A": -torch.rand(d, n) * 2 - 0.1,
        "B": torch.randn(b, n, seqlen, **act),
        "C": torch.randn(b, n, seqlen, **act),
    }
    if full:
        lead = (b,) if per_batch else ()
        ins |= {
            "D": torch.randn(d),
            "z": torch.randn(b, d, seqlen, **act),
            "delta_bias": 0.3 * torch.randn(d),
            "initial_state": torch.randn(*lead, d, n),
            "state_offset": torch.randn(*lead, d, n),
            # the y-offset takes the other layout, so a case mixes shared and per-row tensors
            "y_offset": torch.randn(*(() if per_batch else (b,)), d),
        }
    return {k: v.requires_grad_() for k, v in ins.items()}


def run(fn, ins: dict, gy: torch.Tensor, gh: torch.Tensor, softplus: bool) -> dict[str, torch.Tensor]:
    """Forward with the final state, backward of <y, gy> + <h_L, gh>; returns outputs and every input gradient."""
    ins = {k: v.detach().clone().requires_grad_() for k, v in ins.items()}
    y, h_last = fn(**ins, delta_softplus=softplus, return_final_state=True)
    (y.float() * gy).sum().add((h_last * gh).sum()).backward()
    return {"y": y, "h_last": h_last} | {f"d{k}": v.grad for k, v in ins.items()}


# the torch backend on CPU is the sequential scan; the Blelloch scan (the torch backend on CUDA) is tested on CPU too
IMPLS = {"torch": selective_scan_torch, "blelloch": selective_scan_blelloch}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("per_batch", [False, True], ids=["shared", "per_batch"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_torch_matches_ref(case, per_batch, dtype, impl):
    _, b, d, seqlen, n = case
    ins = make_inputs(b, d, seqlen, n, dtype=dtype, per_batch=per_batch)
    gy, gh = torch.randn(b, d, seqlen), torch.randn(b, d, n)
    ref = run(selective_scan_ref, ins, gy, gh, softplus=True)
    out = run(IMPLS[impl], ins, gy, gh, softplus=True)
    assert out["y"].dtype == dtype and out["h_last"].dtype == torch.float32
    assert set(out) == {"y", "h_last"} | {f"d{k}" for k in NAMES}
    for key in ref:
        assert_close(key, ref[key], out[key], RATIO[dtype])


def test_torch_on_cpu_is_sequential(monkeypatch):
    calls = []
    monkeypatch.setattr(sequential._SequentialScanFn, "apply", lambda *a: calls.append(1) or (a[0], a[0]))
    selective_scan_torch(*(make_inputs(1, 2, 3, 2, full=False).values()))
    assert calls == [1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["shared", "per_batch", "all_rows"])
@pytest.mark.parametrize("seqlen", [1, 7, 8, 9, 19], ids=lambda s: f"L{s}")
def test_sequential_block_boundaries(monkeypatch, seqlen, layout, dtype):
    """Block (checkpoint) size pinned to K = 8: L = 1, K-1, K, K+1, 2K+3, with shared, mixed and all-per-row h0/h'/y'."""
    monkeypatch.setattr(sequential, "BLOCK", 8)
    b, d, n = 3, 10, 5
    ins = make_inputs(b, d, seqlen, n, dtype=dtype, per_batch=layout != "shared")
    if layout == "all_rows":
        ins["y_offset"] = torch.randn(b, d, requires_grad=True)
    gy, gh = torch.randn(b, d, seqlen), torch.randn(b, d, n)
    ref = run(selective_scan_ref, ins, gy, gh, softplus=True)
    out = run(selective_scan_torch, ins, gy, gh, softplus=True)
    for key in ref:
        assert out[key].dtype == ref[key].dtype, key
        assert_close(key, ref[key], out[key], RATIO[dtype])


def test_sequential_inference_keeps_no_checkpoints(monkeypatch):
    """Under no_grad the forward allocates no block checkpoints (the backward's) and gives the same y and h_L."""
    monkeypatch.setattr(sequential, "BLOCK", 4)
    ins = make_inputs(2, 6, 19, 4, per_batch=True)
    ref_y, ref_h = selective_scan_ref(**ins, delta_softplus=True, return_final_state=True)
    shapes = []
    new_empty = torch.Tensor.new_empty
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda t, *s, **k: shapes.append(s) or new_empty(t, *s, **k))
    with torch.no_grad():
        y, h = selective_scan_torch(**ins, delta_softplus=True, return_final_state=True)
    assert (5, 2, 6, 4) not in shapes, shapes  # [nblocks, B, D, N] checkpoints: not allocated
    assert_close("y", ref_y, y, RATIO[torch.float32])
    assert_close("h", ref_h, h, RATIO[torch.float32])
    shapes.clear()
    selective_scan_torch(**ins, delta_softplus=True, return_final_state=True)  # with grad: allocated
    assert (5, 2, 6, 4) in shapes


@pytest.mark.parametrize("seqlen", [1, 9, 19], ids=lambda s: f"L{s}")
def test_sequential_final_state_gradient_alone(monkeypatch, seqlen):
    """Only the returned final state is differentiated: y gets no gradient, h_L's flows back through every step."""
    monkeypatch.setattr(sequential, "BLOCK", 8)
    b, d, n = 2, 6, 4
    ins = make_inputs(b, d, seqlen, n, per_batch=True)
    gh = torch.randn(b, d, n)
    grads = []
    for fn in (selective_scan_ref, selective_scan_torch):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in ins.items()}
        _, h_last = fn(**leaves, delta_softplus=True, return_final_state=True)
        (h_last * gh).sum().backward()
        grads.append({k: v.grad if v.grad is not None else torch.zeros_like(v) for k, v in leaves.items()})
    for key in grads[0]:
        assert_close(f"d{key}", grads[0][key], grads[1][key], RATIO[torch.float32])
    assert grads[1]["initial_state"].abs().max() > 0 and grads[1]["u"].abs().max() > 0


def test_torch_matches_ref_bare_noncontiguous():
    """No optional inputs, no softplus, and B/C as transposed views (the mixer's layout)."""
    b, d, seqlen, n = 2, 7, 33, 4
    ins = make_inputs(b, d, seqlen, n, full=False)
    ins["delta"] = ins["delta"].detach().abs().requires_grad_()
    ins["B"] = torch.randn(b, seqlen, n).transpose(1, 2).requires_grad_()
    ins["C"] = torch.randn(b, seqlen, n).transpose(1, 2).requires_grad_()
    gy, gh = torch.randn(b, d, seqlen), torch.randn(b, d, n)
    ref = run(selective_scan_ref, ins, gy, gh, softplus=False)
    out = run(selective_scan_torch, ins, gy, gh, softplus=False)
    for key in ref:
        assert_close(key, ref[key], out[key], RATIO[torch.float32])


def oracle_fp64(ins: dict, softplus: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed form in fp64: h_t = Σ_{s≤t} exp(A(Λ_t - Λ_s)) Δ_s B_s u_s + exp(A Λ_t) h_0, Λ = cumsum Δ."""
    v = {k: t.detach().double() for k, t in ins.items()}
    b, d, seqlen = v["u"].shape
    delta = v["delta"] + v["delta_bias"][None, :, None]
    delta = F.softplus(delta) if softplus else delta
    lam = delta.cumsum(-1)  # [B, D, L]
    expo = v["A"][None, :, None, None, :] * (lam[..., :, None] - lam[..., None, :])[..., None]  # [B, D, t, s, N]
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool).tril()
    decay = expo.masked_fill(~causal[..., None], float("-inf")).exp()
    inp = (delta * v["u"])[..., None] * v["B"].transpose(1, 2)[:, None]  # [B, D, s, N]
    h0 = v["initial_state"].expand(b, d, -1)
    h = (
        torch.einsum("bdtsn,bdsn->bdtn", decay, inp)
        + torch.exp(v["A"][None, :, None] * lam[..., None]) * h0[:, :, None]
    )
    h_off = v["state_offset"].expand(b, d, -1)
    y = torch.einsum("bdtn,bnt->bdt", h + h_off[:, :, None], v["C"]) + v["D"][:, None] * v["u"]
    y = (y + v["y_offset"].expand(b, d)[..., None]) * F.silu(v["z"])
    return y, h[:, :, -1]


@pytest.mark.parametrize("per_batch", [False, True], ids=["shared", "per_batch"])
@pytest.mark.parametrize("size", [(2, 5, 1, 3), (2, 6, 17, 16), (1, 5, 63, 4)], ids=["L1", "L17", "L63"])
def test_ref_and_torch_match_fp64_closed_form(size, per_batch):
    ins = make_inputs(*size, per_batch=per_batch)
    y64, h64 = oracle_fp64(ins, softplus=True)
    for fn in (selective_scan_ref, selective_scan_torch):
        y, h_last = fn(**ins, delta_softplus=True, return_final_state=True)
        assert_close(f"{fn.__name__} y", y64, y, 1e-5)
        assert_close(f"{fn.__name__} h_last", h64, h_last, 1e-5)
    d64 = {k: t.detach().double() for k, t in ins.items()}
    y, h_last = selective_scan_torch(**d64, delta_softplus=True, return_final_state=True)
    assert y.dtype == torch.float64
    assert_close("torch fp64 y", y64, y, 1e-12)
    assert_close("torch fp64 h_last", h64, h_last, 1e-12)


def test_initial_state_prepended_step_and_superposition_agree():
    """docs/methods.md §4.3/§5.2: the authors' prepended-step trick, the superposition formula and the h0 scan agree."""
    b, d, seqlen, n = 2, 6, 19, 4
    ins = {k: v.detach() for k, v in make_inputs(b, d, seqlen, n, per_batch=True).items()}
    u, A, B, C, D, z, h0 = (ins[k] for k in ("u", "A", "B", "C", "D", "z", "initial_state"))
    delta = F.softplus(ins["delta"] + ins["delta_bias"][None, :, None])
    direct = selective_scan_ref(u, delta, A, B, C, D, z, initial_state=h0)
    # prepended step: u_0 = h0[:, :, n], Δ_0 = 1, B_0 = 1, C ≡ 1 gives the n-th state of every channel
    states = []
    for i in range(n):
        u_i = torch.cat([h0[:, :, i : i + 1], u], dim=2)
        delta_i = torch.cat([torch.ones(b, d, 1), delta], dim=2)
        B_i = torch.cat([torch.ones(b, 1, 1), B[:, i : i + 1]], dim=2)
        states.append(selective_scan_ref(u_i, delta_i, A[:, i : i + 1], B_i, torch.ones(b, 1, seqlen + 1))[..., 1:])
    states = torch.stack(states, dim=-1)  # [B, D, L, N]
    trick = (torch.einsum("bnl,bdln->bdl", C, states) + D[:, None] * u) * F.silu(z)
    assert_close("prepended step", direct, trick, 1e-6)
    # superposition on a zero-start scan: y = y^(0) + Σ_n C_t exp(A Λ_t) h0, before the gate
    y0 = selective_scan_torch(u, delta, A, B, C, D)
    decay = torch.exp(A[None, :, None] * delta.cumsum(-1)[..., None])  # [B, D, L, N]
    sup = (y0 + torch.einsum("bnl,bdln,bdn->bdl", C, decay, h0)) * F.silu(z)
    assert_close("superposition", direct, sup, 1e-6)


@pytest.mark.parametrize("fn", [selective_scan_ref, selective_scan_torch], ids=["ref", "torch"])
def test_state_offset_equals_dense_skip(fn):
    """docs/methods.md §8.3: with C_t = W_C u_t, the h-offset equals replacing D_skip by the dense D_skip + h' W_C."""
    b, d, seqlen, n = 2, 8, 21, 3
    dt = torch.float64 if fn is selective_scan_torch else torch.float32
    u = torch.randn(b, d, seqlen, dtype=dt)
    delta = torch.rand(b, d, seqlen, dtype=dt)
    A = -torch.rand(d, n, dtype=dt) - 0.1
    B = torch.randn(b, n, seqlen, dtype=dt)
    W_C = torch.randn(n, d, dtype=dt)
    C = torch.einsum("nd,bdl->bnl", W_C, u)
    D, h_off, z = torch.randn(d, dtype=dt), torch.randn(d, n, dtype=dt), torch.randn(b, d, seqlen, dtype=dt)
    y = fn(u, delta, A, B, C, D, z, state_offset=h_off)
    dense = torch.diag(D) + h_off @ W_C  # [D, D]
    oracle = (fn(u, delta, A, B, C) + torch.einsum("de,bel->bdl", dense, u)) * F.silu(z)
    assert_close("dense skip", oracle, y, 1e-12 if dt == torch.float64 else 1e-5)
    # the oracle is not vacuous: the offset moves the output
    assert (y - fn(u, delta, A, B, C, D, z)).abs().max() > 1e-2


def test_gradcheck_fp64():
    b, d, seqlen, n = 2, 3, 5, 2
    ins = {k: v.detach().double().requires_grad_() for k, v in make_inputs(b, d, seqlen, n, per_batch=True).items()}
    names = list(ins)

    for impl in IMPLS.values():

        def f(*args, impl=impl):
            return impl(**dict(zip(names, args)), delta_softplus=True, return_final_state=True)

        assert torch.autograd.gradcheck(f, tuple(ins.values()))


@pytest.mark.parametrize("per_batch", [False, True], ids=["shared", "per_batch"])
def test_step_loop_equals_scan(per_batch):
    b, d, seqlen, n = 2, 6, 9, 5
    ins = {k: v.detach() for k, v in make_inputs(b, d, seqlen, n, per_batch=per_batch).items()}
    y, h_last = selective_scan(**ins, delta_softplus=True, return_final_state=True, backend="torch")
    state = ins["initial_state"].expand(b, d, n).clone()
    ys = []
    for t in range(seqlen):
        ys.append(
            selective_state_update(
                state, ins["u"][..., t], ins["delta"][..., t], ins["A"], ins["B"][..., t], ins["C"][..., t],
                ins["D"], ins["z"][..., t], ins["delta_bias"], True,
                state_offset=ins["state_offset"], y_offset=ins["y_offset"], backend="torch",
            )
        )  # fmt: skip
    assert_close("y", y, torch.stack(ys, dim=-1), 1e-5)
    assert_close("state", h_last, state, 1e-5)


@pytest.mark.parametrize("fn", [selective_scan_ref, selective_scan_torch], ids=["ref", "torch"])
def test_continuation_from_final_state(fn):
    b, d, seqlen, n, cut = 2, 5, 23, 4, 10
    ins = {k: v.detach() for k, v in make_inputs(b, d, seqlen, n, per_batch=True).items()}
    seq = ("u", "delta", "B", "C", "z")
    y, h_last = fn(**ins, delta_softplus=True, return_final_state=True)
    first = ins | {k: ins[k][..., :cut] for k in seq}
    y1, h1 = fn(**first, delta_softplus=True, return_final_state=True)
    second = ins | {k: ins[k][..., cut:] for k in seq} | {"initial_state": h1}
    y2, h2 = fn(**second, delta_softplus=True, return_final_state=True)
    assert_close("y", y, torch.cat([y1, y2], dim=-1), 1e-5)
    assert_close("h_last", h_last, h2, 1e-5)


@pytest.mark.parametrize(
    ("trainable", "scan"),
    [
        (("state_offset",), False),  # State-offset tuning, frozen base, first layer: no adjoint scan
        (("state_offset", "y_offset", "D", "z"), False),
        (("B", "y_offset"), True),
        (("initial_state",), True),
        (("u",), True),
    ],
    ids=lambda v: "+".join(v) if isinstance(v, tuple) else ("scan" if v else "no-scan"),
)
def test_sequential_partial_requires_grad(monkeypatch, trainable, scan):
    """Only some inputs need a gradient: theirs match the reference, the others get none, and the reverse scan runs
    only when an input upstream of the recurrence needs one."""
    monkeypatch.setattr(sequential, "BLOCK", 4)
    calls = []
    backward = sequential._scan_backward
    monkeypatch.setattr(sequential, "_scan_backward", lambda *a: calls.append(1) or backward(*a))
    b, d, seqlen, n = 2, 5, 11, 3
    ins = {k: v.detach() for k, v in make_inputs(b, d, seqlen, n).items()}
    gy = torch.randn(b, d, seqlen)
    grads = []
    for fn in (selective_scan_ref, selective_scan_torch):
        leaves = {k: v.clone().requires_grad_(k in trainable) for k, v in ins.items()}
        (fn(**leaves, delta_softplus=True).float() * gy).sum().backward()
        grads.append({k: v.grad for k, v in leaves.items()})
    assert calls == ([1] if scan else [])
    for key in NAMES:
        if key in trainable:
            assert_close(f"d{key}", grads[0][key], grads[1][key], RATIO[torch.float32])
        else:
            assert grads[1][key] is None, key
