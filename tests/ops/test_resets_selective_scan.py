"""Packed rows (``resets``) in the Mamba-1 scan backends against the fp32 reference: outputs, final state and every
gradient, with restarts inside the kernels' time tiles and on their edges.

On CPU the Triton kernels run under the interpreter (small shapes); ``-m gpu`` runs longer rows on CUDA.
"""

from __future__ import annotations

import functools

import pytest
import torch
from _triton_interp import interpret_on_cpu, reload_compiled

interpret_on_cpu()

from ssmtune import ops
from ssmtune.ops import RESET_ALIGN
from ssmtune.ops.selective_scan import fused, sequential
from ssmtune.ops.selective_scan.naive import selective_scan_ref
from ssmtune.ops.selective_scan.parallel import selective_scan_blelloch
from ssmtune.ops.testing import assert_close

reload_compiled(fused)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RATIO = {torch.float32: 5e-5, torch.bfloat16: 1e-2}
OPTIONAL = ("D", "z", "delta_bias", "state_offset", "y_offset")


def make_inputs(b, d, seqlen, n, dtype, h0, softplus, device=DEVICE) -> dict[str, torch.Tensor]:
    """All optional inputs; ``h0``: "shared" [D, N], "rowwise" [B, D, N] or None (no initial state). Activations in
    ``dtype``, parameters in fp32; h' shared and y' per row (the other layouts are the plain scan tests' business)."""
    act = {"dtype": dtype, "device": device}
    ins = {
        "u": torch.randn(b, d, seqlen, **act),
        # without softplus, Δ is used as given and must stay positive for a stable recurrence
        "delta": (0.5 * torch.randn(b, d, seqlen) if softplus else torch.rand(b, d, seqlen)).to(**act),
        "A": -torch.rand(d, n, device=device) * 2 - 0.1,
        "B": torch.randn(b, n, seqlen, **act),
        "C": torch.randn(b, n, seqlen, **act),
        "D": torch.randn(d, device=device),
        "z": torch.randn(b, d, seqlen, **act),
        "delta_bias": 0.3 * (torch.randn(d, device=device) if softplus else torch.rand(d, device=device)),
        "state_offset": torch.randn(d, n, device=device),
        "y_offset": torch.randn(b, d, device=device),
    }
    if h0 is not None:
        ins["initial_state"] = torch.randn(*((b,) if h0 == "rowwise" else ()), d, n, device=device)
    return {k: v.requires_grad_() for k, v in ins.items()}


def make_resets(b: int, seqlen: int, device=DEVICE) -> torch.Tensor:
    """Row 0: every slot restarts (position 0 too), row 1: none, further rows: random flags."""
    nr = -(-seqlen // RESET_ALIGN)
    r = torch.rand(b, nr) < 0.6
    r[0], r[1] = True, False
    return r.to(device)


def run(fn, ins, resets, gy, gh, softplus) -> dict[str, torch.Tensor]:
    """Forward with the final state, backward of <y, gy> (+ <h_L, gh>); returns outputs and every input gradient."""
    ins = {k: v.detach().clone().requires_grad_() for k, v in ins.items()}
    y, h_last = fn(**ins, delta_softplus=softplus, return_final_state=True, resets=resets)
    loss = (y.float() * gy).sum()
    if gh is not None:
        loss = loss + (h_last * gh).sum()
    loss.backward()
    return {"y": y, "h_last": h_last} | {f"d{k}": v.grad for k, v in ins.items()}


def check(fn, b, d, seqlen, n, dtype, h0="rowwise", softplus=True, final_grad=True) -> None:
    ins = make_inputs(b, d, seqlen, n, dtype, h0, softplus)
    resets = make_resets(b, seqlen)
    gy = torch.randn(b, d, seqlen, device=DEVICE)
    gh = torch.randn(b, d, n, device=DEVICE) if final_grad else None
    ref = run(selective_scan_ref, ins, resets, gy, gh, softplus)
    out = run(fn, ins, resets, gy, gh, softplus)
    assert set(ref) == set(out)
    for name in ref:
        assert out[name].dtype == ref[name].dtype, name
        assert_close(name, ref[name], out[name], RATIO[dtype])


def triton_with(config):
    return functools.partial(fused.selective_scan_triton, config=config)


# restarts at 64, 128, 192 (of L 200) against the tiles: forward 128 / backward 32 (inside a forward tile and on its
# edge, on backward tile edges), 64-step tiles (every restart on a tile edge), the training defaults (256 / 128:
# inside both tiles), 32 / 16 over L 130 (a ragged 2-step last tile after the restart at 128), L 65 (the restart is
# the last step), several channels per program
TILE_CASES = [
    ("L200-fwd128-bwd32", 2, 3, 200, 4, {"BLOCK_L": 128, "BLOCK_L_BWD": 32}),
    ("L200-tiles64", 3, 3, 200, 3, {"BLOCK_L": 64}),
    ("L200-default-tiles", 2, 3, 200, 4, None),
    ("L130-fwd32-bwd16", 2, 2, 130, 3, {"BLOCK_L": 32, "BLOCK_L_BWD": 16}),
    ("L65-fwd64-bwd32", 2, 3, 65, 3, {"BLOCK_L": 64, "BLOCK_L_BWD": 32}),
    ("L140-blockd", 3, 5, 140, 3, {"BLOCK_L": 64, "BLOCK_L_BWD": 32, "BLOCK_D_FWD": 2, "BLOCK_D_BWD": 4}),
]


@pytest.mark.parametrize(
    ("b", "d", "seqlen", "n", "config"), [c[1:] for c in TILE_CASES], ids=[c[0] for c in TILE_CASES]
)
def test_triton_resets_across_tiles(b, d, seqlen, n, config):
    check(triton_with(config), b, d, seqlen, n, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("h0", ["shared", "rowwise", None], ids=["h0-shared", "h0-rowwise", "no-h0"])
@pytest.mark.parametrize("softplus", [True, False], ids=["softplus", "no-softplus"])
def test_triton_resets_flags(dtype, h0, softplus):
    """The initial state's layouts (a shared one gets the sum over rows and restarts), none (restarts read zeros),
    Δ with and without softplus, fp32 and bf16; no final-state gradient in fp32 (λ enters at the last step only)."""
    final_grad = dtype == torch.bfloat16 or h0 != "shared"
    check(triton_with({"BLOCK_L": 128, "BLOCK_L_BWD": 32}), 3, 3, 200, 3, dtype, h0, softplus, final_grad)


def test_triton_resets_inference_forward():
    """Without gradients the forward runs its 512-step tiles (no checkpoints): L 600 has restarts inside both tiles."""
    ins = {k: v.detach() for k, v in make_inputs(3, 3, 600, 4, torch.float32, "rowwise", True).items()}
    resets = make_resets(3, 600)
    y_ref, h_ref = selective_scan_ref(**ins, delta_softplus=True, return_final_state=True, resets=resets)
    y, h = fused.selective_scan_triton(**ins, delta_softplus=True, return_final_state=True, resets=resets)
    assert_close("y", y_ref, y, RATIO[torch.float32])
    assert_close("h_last", h_ref, h, RATIO[torch.float32])


def test_triton_no_flags_set_is_the_plain_scan():
    """All flags False: outputs and gradients equal the scan without resets bit for bit."""
    ins = make_inputs(2, 3, 130, 3, torch.float32, "rowwise", True)
    gy, gh = torch.randn(2, 3, 130, device=DEVICE), torch.randn(2, 3, 3, device=DEVICE)
    fn = triton_with({"BLOCK_L": 64, "BLOCK_L_BWD": 32})
    plain = run(fn, ins, None, gy, gh, True)
    flagged = run(fn, ins, torch.zeros(2, 3, dtype=torch.bool, device=DEVICE), gy, gh, True)
    for name, t in plain.items():
        assert torch.equal(t, flagged[name]), name


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_dispatcher_takes_resets(backend):
    """``ops.selective_scan(..., resets=)`` runs the backend asked for; auto takes the first of its order."""
    assert backend in ops.RESETS_BACKENDS["selective_scan"]
    ins = {k: v.detach() for k, v in make_inputs(2, 3, 70, 3, torch.float32, "shared", True).items()}
    resets = make_resets(2, 70)
    want = selective_scan_ref(**ins, delta_softplus=True, resets=resets)
    for name in (backend, "auto"):
        y = ops.selective_scan(**ins, delta_softplus=True, resets=resets, backend=name)
        assert_close(f"y ({name})", want, y, RATIO[torch.float32])


def test_triton_rejects_bad_resets():
    ins = {k: v.detach() for k, v in make_inputs(1, 2, 70, 3, torch.float32, None, True).items()}
    with pytest.raises(ValueError, match=r"resets must be a bool tensor of shape \[1, 2\]"):
        fused.selective_scan_triton(**ins, resets=torch.zeros(1, 2, dtype=torch.int8, device=DEVICE))


@pytest.mark.parametrize("block", [16, 64, 5], ids=["block16", "block64", "block5"])
@pytest.mark.parametrize("h0", ["shared", "rowwise", None], ids=["h0-shared", "h0-rowwise", "no-h0"])
def test_sequential_resets(monkeypatch, block, h0):
    """The CPU torch backend: restarts on its block edges (16, 64) and inside blocks (5)."""
    monkeypatch.setattr(sequential, "BLOCK", block)
    check(sequential.selective_scan_sequential, 3, 3, 200, 3, torch.float32, h0)


@pytest.mark.parametrize("h0", ["shared", "rowwise", None], ids=["h0-shared", "h0-rowwise", "no-h0"])
@pytest.mark.parametrize("seqlen", [200, 64, 65])
def test_blelloch_resets(h0, seqlen):
    """The CUDA torch backend (Blelloch scan), run here on the CPU."""
    check(selective_scan_blelloch, 3, 3, seqlen, 3, torch.float32, h0)


GPU_CASES = [
    ("D1536-L2100-bf16-defaults", 2, 1536, 2100, 16, torch.bfloat16, None),
    ("D1536-L2100-fp32-defaults", 2, 1536, 2100, 16, torch.float32, None),
    ("D200-L2100-bf16-fwd512-bwd64-warps4", 3, 200, 2100, 16, torch.bfloat16, {"BLOCK_L": 512, "BLOCK_L_BWD": 64,
                                                                               "WARPS_FWD": 4, "WARPS_BWD": 2}),
    ("D37-L1000-N64-bf16-wide-tiles", 2, 37, 1000, 64, torch.bfloat16, {"BLOCK_L": 1024, "BLOCK_L_BWD": 1024,
                                                                        "WARPS_FWD": 8, "WARPS_BWD": 8}),
]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("b", "d", "seqlen", "n", "dtype", "config"), [c[1:] for c in GPU_CASES],
                         ids=[c[0] for c in GPU_CASES])  # fmt: skip
def test_triton_resets_gpu(b, d, seqlen, n, dtype, config):
    check(triton_with(config), b, d, seqlen, n, dtype)
