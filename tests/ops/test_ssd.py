"""Mamba-2 SSD scan: the reference against an fp64 quadratic-form oracle, the chunked torch backend against the reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssmtune.ops import ssd_scan, ssd_state_update
from ssmtune.ops.ssd.chunk import ssd_scan_torch
from ssmtune.ops.ssd.naive import ssd_scan_ref
from ssmtune.ops.testing import assert_close

RATIO = {torch.float32: 5e-5, torch.bfloat16: 2e-3}
# (id, B, L, H, G, P, N, chunk_size): chunks that do and do not divide L, every group count for H = 4
CASES = [
    ("L1-G2-c4", 2, 1, 4, 2, 3, 16, 4),
    ("L17-G1-c8", 2, 17, 4, 1, 3, 5, 8),
    ("L64-G2-c16", 1, 64, 4, 2, 8, 16, 16),
    ("L63-G4-cdefault", 2, 63, 4, 4, 8, 5, None),
    ("L130-G4-c32", 2, 130, 4, 4, 3, 16, 32),
    ("L130-G1-c65", 1, 130, 4, 1, 8, 5, 65),
]
NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state", "state_offset", "y_offset")
SEQ = ("x", "dt", "B", "C", "z")


def make_inputs(
    b: int, seqlen: int, h: int, g: int, p: int, n: int, *, dtype=torch.float32, per_batch=False
) -> dict[str, torch.Tensor]:
    """Activations in ``dtype``, parameters in fp32; per_batch also switches D to its [H, P] layout."""
    lead = (b,) if per_batch else ()
    ins = {
        "x": torch.randn(b, seqlen, h, p, dtype=dtype),
        "dt": (0.5 * torch.randn(b, seqlen, h)).to(dtype),
        "A": -torch.rand(h) * 2 - 0.1,
        "B": torch.randn(b, seqlen, g, n, dtype=dtype),
        "C": torch.randn(b, seqlen, g, n, dtype=dtype),
        "D": torch.randn(h, p) if per_batch else torch.randn(h),
        "z": torch.randn(b, seqlen, h, p, dtype=dtype),
        "dt_bias": 0.3 * torch.randn(h),
        "initial_state": torch.randn(*lead, h, p, n),
        "state_offset": torch.randn(*lead, h, p, n),
        "y_offset": torch.randn(*(() if per_batch else (b,)), h, p),
    }
    return {k: v.requires_grad_() for k, v in ins.items()}


def run(fn, ins: dict, gy: torch.Tensor, gh: torch.Tensor, chunk_size: int | None) -> dict[str, torch.Tensor]:
    ins = {k: v.detach().clone().requires_grad_() for k, v in ins.items()}
    y, h_last = fn(**ins, chunk_size=chunk_size, dt_softplus=True, return_final_state=True)
    (y.float() * gy).sum().add((h_last * gh).sum()).backward()
    return {"y": y, "h_last": h_last} | {f"d{k}": v.grad for k, v in ins.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("per_batch", [False, True], ids=["shared", "per_batch"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_torch_matches_ref(case, per_batch, dtype):
    _, b, seqlen, h, g, p, n, chunk = case
    ins = make_inputs(b, seqlen, h, g, p, n, dtype=dtype, per_batch=per_batch)
    gy, gh = torch.randn(b, seqlen, h, p), torch.randn(b, h, p, n)
    ref = run(ssd_scan_ref, ins, gy, gh, chunk)
    out = run(ssd_scan_torch, ins, gy, gh, chunk)
    assert out["y"].dtype == dtype and out["h_last"].dtype == torch.float32
    assert set(out) == {"y", "h_last"} | {f"d{k}" for k in NAMES}
    for key in ref:
        assert_close(key, ref[key], out[key], RATIO[dtype])


def test_torch_bare_matches_ref():
    """No optional inputs and no softplus (positive dt given directly)."""
    b, seqlen, h, g, p, n = 2, 37, 4, 2, 3, 5
    x, B, C = torch.randn(b, seqlen, h, p), torch.randn(b, seqlen, g, n), torch.randn(b, seqlen, g, n)
    dt, A = torch.rand(b, seqlen, h), -torch.rand(h)
    args = [t.requires_grad_() for t in (x, dt, A, B, C)]
    y_ref = ssd_scan_ref(*args)
    gy = torch.randn_like(y_ref)
    g_ref = torch.autograd.grad((y_ref * gy).sum(), args)
    y = ssd_scan_torch(*args, chunk_size=16)
    g_out = torch.autograd.grad((y * gy).sum(), args)
    assert_close("y", y_ref, y, RATIO[torch.float32])
    for name, a, o in zip(("dx", "ddt", "dA", "dB", "dC"), g_ref, g_out):
        assert_close(name, a, o, RATIO[torch.float32])


def oracle_fp64(ins: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSD quadratic (attention-like) form in fp64, with an explicit head → group index map."""
    v = {k: t.detach().double() for k, t in ins.items()}
    b, seqlen, h, p = v["x"].shape
    group = torch.arange(h) // (h // v["B"].shape[2])  # head i reads group i // (H/G)
    Bh, Ch = v["B"][:, :, group], v["C"][:, :, group]  # [B, L, H, N]
    dt = F.softplus(v["dt"] + v["dt_bias"])
    lam = dt.cumsum(1)  # [B, L, H]
    expo = v["A"] * (lam[:, :, None] - lam[:, None, :])  # [B, t, s, H]
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool).tril()[..., None]
    decay = expo.masked_fill(~causal, float("-inf")).exp()
    scores = torch.einsum("bthn,bshn->btsh", Ch, Bh) * decay * dt[:, None]  # [B, t, s, H]
    h0 = v["initial_state"].expand(b, h, p, -1)
    h_off = v["state_offset"].expand(b, h, p, -1)
    y = torch.einsum("btsh,bshp->bthp", scores, v["x"])
    y = y + torch.einsum("bth,bhpn,bthn->bthp", torch.exp(v["A"] * lam), h0, Ch)
    y = y + torch.einsum("bhpn,bthn->bthp", h_off, Ch)
    D = v["D"] if v["D"].dim() == 2 else v["D"][:, None]
    y = (y + D * v["x"] + v["y_offset"].expand(b, h, p)[:, None]) * F.silu(v["z"])
    last = torch.exp(v["A"] * (lam[:, -1:] - lam))  # [B, s, H]
    h_last = (
        torch.einsum("bsh,bsh,bshp,bshn->bhpn", last, dt, v["x"], Bh)
        + torch.exp(v["A"] * lam[:, -1])[..., None, None] * h0
    )
    return y, h_last


@pytest.mark.parametrize("per_batch", [False, True], ids=["shared", "per_batch"])
@pytest.mark.parametrize("case", CASES[:4], ids=[c[0] for c in CASES[:4]])
def test_ref_and_torch_match_fp64_quadratic_form(case, per_batch):
    _, b, seqlen, h, g, p, n, chunk = case
    ins = make_inputs(b, seqlen, h, g, p, n, per_batch=per_batch)
    y64, h64 = oracle_fp64(ins)
    for fn in (ssd_scan_ref, ssd_scan_torch):
        y, h_last = fn(**ins, chunk_size=chunk, dt_softplus=True, return_final_state=True)
        assert_close(f"{fn.__name__} y", y64, y, 1e-5)
        assert_close(f"{fn.__name__} h_last", h64, h_last, 1e-5)
    d64 = {k: t.detach().double() for k, t in ins.items()}
    y, h_last = ssd_scan_torch(**d64, chunk_size=chunk, dt_softplus=True, return_final_state=True)
    assert y.dtype == torch.float64
    assert_close("torch fp64 y", y64, y, 1e-12)
    assert_close("torch fp64 h_last", h64, h_last, 1e-12)


def test_chunk_size_does_not_change_the_result():
    ins = {k: v.detach() for k, v in make_inputs(2, 45, 4, 2, 3, 5, per_batch=True).items()}
    y, h_last = ssd_scan_torch(**ins, chunk_size=45, dt_softplus=True, return_final_state=True)
    for chunk in (1, 7, 16, 100):
        y_c, h_c = ssd_scan_torch(**ins, chunk_size=chunk, dt_softplus=True, return_final_state=True)
        assert_close(f"y chunk {chunk}", y, y_c, 1e-5)
        assert_close(f"h_last chunk {chunk}", h_last, h_c, 1e-5)


def test_gradcheck_fp64():
    ins = {k: v.detach().double().requires_grad_() for k, v in make_inputs(2, 5, 4, 2, 2, 3, per_batch=True).items()}
    names = list(ins)

    def f(*args):
        return ssd_scan_torch(**dict(zip(names, args)), chunk_size=2, dt_softplus=True, return_final_state=True)

    assert torch.autograd.gradcheck(f, tuple(ins.values()), fast_mode=True)


@pytest.mark.parametrize("per_batch", [False, True], ids=["shared", "per_batch"])
def test_step_loop_equals_scan(per_batch):
    b, seqlen, h, g, p, n = 2, 9, 4, 2, 3, 5
    ins = {k: v.detach() for k, v in make_inputs(b, seqlen, h, g, p, n, per_batch=per_batch).items()}
    y, h_last = ssd_scan(**ins, chunk_size=4, dt_softplus=True, return_final_state=True, backend="torch")
    state = ins["initial_state"].expand(b, h, p, n).clone()
    ys = []
    for t in range(seqlen):
        ys.append(
            ssd_state_update(
                state, ins["x"][:, t], ins["dt"][:, t], ins["A"], ins["B"][:, t], ins["C"][:, t], ins["D"],
                ins["z"][:, t], ins["dt_bias"], True,
                state_offset=ins["state_offset"], y_offset=ins["y_offset"], backend="torch",
            )
        )  # fmt: skip
    assert_close("y", y, torch.stack(ys, dim=1), 1e-5)
    assert_close("state", h_last, state, 1e-5)


@pytest.mark.parametrize("fn", [ssd_scan_ref, ssd_scan_torch], ids=["ref", "torch"])
def test_continuation_from_final_state(fn):
    b, seqlen, h, g, p, n, cut = 2, 29, 4, 1, 3, 5, 11
    ins = {k: v.detach() for k, v in make_inputs(b, seqlen, h, g, p, n, per_batch=True).items()}
    y, h_last = fn(**ins, chunk_size=8, dt_softplus=True, return_final_state=True)
    first = ins | {k: ins[k][:, :cut] for k in SEQ}
    y1, h1 = fn(**first, chunk_size=8, dt_softplus=True, return_final_state=True)
    second = ins | {k: ins[k][:, cut:] for k in SEQ} | {"initial_state": h1}
    y2, h2 = fn(**second, chunk_size=8, dt_softplus=True, return_final_state=True)
    assert_close("y", y, torch.cat([y1, y2], dim=1), 1e-5)
    assert_close("h_last", h_last, h2, 1e-5)
