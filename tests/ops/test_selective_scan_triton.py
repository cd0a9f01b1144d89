"""Triton Mamba-1 selective scan against the fp32 reference: outputs, final state and every gradient.

On CPU the kernels run under the Triton interpreter (small shapes); ``-m gpu`` runs the published shapes on CUDA.
"""

from __future__ import annotations

import functools

import pytest
import torch
from _triton_interp import interpret_on_cpu, reload_compiled

interpret_on_cpu()

from ssmtune.ops import selective_scan, selective_state_update
from ssmtune.ops.selective_scan import fused
from ssmtune.ops.selective_scan.naive import selective_scan_ref, selective_state_update_ref
from ssmtune.ops.testing import assert_close

reload_compiled(fused)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# RMS-relative error against the fp32 reference; low-precision outputs and input grads are rounded at the end
RATIO = {torch.float32: 5e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state", "state_offset", "y_offset")
ALL = frozenset(NAMES[5:])

# (id, B, D, L, N, dtype, optional inputs, per-row offsets, softplus)
CASES = [
    ("L1-D5-N3-all-shared-fp32", 2, 5, 1, 3, torch.float32, ALL, False, True),
    ("L7-D5-N16-all-rowwise-fp32", 2, 5, 7, 16, torch.float32, ALL, True, True),
    ("L33-D5-N3-bare-fp32", 2, 5, 33, 3, torch.float32, frozenset(), False, False),
    ("L33-D5-N16-all-shared-bf16", 2, 5, 33, 16, torch.bfloat16, ALL, False, True),
    (
        "L33-D6-N3-h0-bias-nosoftplus-fp16",
        1,
        6,
        33,
        3,
        torch.float16,
        frozenset({"delta_bias", "initial_state"}),
        True,
        False,
    ),
    ("L20-D5-N3-offsets-z-fp32", 2, 5, 20, 3, torch.float32, frozenset({"z", "state_offset", "y_offset"}), True, True),
]


@pytest.fixture(autouse=True)
def nan_poison(monkeypatch):
    """Fill every torch.empty/empty_like allocation with NaN so that an unwritten output cannot pass."""
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poisoned(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poisoned(empty_like(*a, **k)))


def make_inputs(b, d, seqlen, n, dtype, flags, per_batch, softplus=True, device=DEVICE) -> dict[str, torch.Tensor]:
    """Activations in ``dtype``; parameters (A, D, bias, states, offsets) in fp32 as in the model."""
    act = {"dtype": dtype, "device": device}
    f32 = {"device": device}
    lead = (b,) if per_batch else ()
    ins = {
        "u": torch.randn(b, d, seqlen, **act),
        # without softplus, Δ is used as given and must stay positive for a stable recurrence
        "delta": (0.5 * torch.randn(b, d, seqlen, **f32) if softplus else torch.rand(b, d, seqlen, **f32)).to(dtype),
        "A": -torch.rand(d, n, **f32) * 2 - 0.1,
        "B": torch.randn(b, n, seqlen, **act),
        "C": torch.randn(b, n, seqlen, **act),
        "D": torch.randn(d, **f32),
        "z": torch.randn(b, d, seqlen, **act),
        "delta_bias": 0.3 * (torch.randn(d, **f32) if softplus else torch.rand(d, **f32)),
        "initial_state": torch.randn(*lead, d, n, **f32),
        "state_offset": torch.randn(*lead, d, n, **f32),
        # the y-offset takes the other layout, so a case mixes shared and per-row tensors
        "y_offset": torch.randn(*(() if per_batch else (b,)), d, **f32),
    }
    return {k: v.requires_grad_() for k, v in ins.items() if k in NAMES[:5] or k in flags}


def run(fn, ins: dict, gy: torch.Tensor, gh: torch.Tensor | None, softplus: bool) -> dict[str, torch.Tensor]:
    """Forward with the final state, backward of <y, gy> (+ <h_L, gh>); returns outputs and every input gradient."""
    ins = {k: v.detach().clone().requires_grad_() for k, v in ins.items()}
    y, h_last = fn(**ins, delta_softplus=softplus, return_final_state=True)
    loss = (y.float() * gy).sum()
    if gh is not None:
        loss = loss + (h_last * gh).sum()
    loss.backward()
    return {"y": y, "h_last": h_last} | {f"d{k}": v.grad for k, v in ins.items()}


def check_case(b, d, seqlen, n, dtype, flags, per_batch, softplus, final_grad=True, config=None) -> None:
    ins = make_inputs(b, d, seqlen, n, dtype, flags, per_batch, softplus)
    gy = torch.randn(b, d, seqlen, device=DEVICE)
    gh = torch.randn(b, d, n, device=DEVICE) if final_grad else None
    ref = run(selective_scan_ref, ins, gy, gh, softplus)
    out = run(functools.partial(fused.selective_scan_triton, config=config), ins, gy, gh, softplus)
    assert set(ref) == set(out)
    for name in ref:
        assert out[name].dtype == ref[name].dtype, name
        assert_close(name, ref[name], out[name], RATIO[dtype])


@pytest.mark.parametrize(("b", "d", "seqlen", "n", "dtype", "flags", "per_batch", "softplus"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])  # fmt: skip
def test_selective_scan_triton(b, d, seqlen, n, dtype, flags, per_batch, softplus):
    check_case(b, d, seqlen, n, dtype, flags, per_batch, softplus)


@pytest.mark.parametrize("gate", [True, False], ids=["gated", "no-gate"])
@pytest.mark.parametrize("per_batch", [True, False], ids=["rowwise", "shared"])
@pytest.mark.parametrize(("seqlen", "programs"), [(150, 1), (9, 1024)], ids=["L150-3-tiles-1-split", "L9-3-splits"])
def test_state_offset_grad_kernel(seqlen, programs, per_batch, gate):
    """State-offset (h)'s terms of the backward against their formulas: dh'_b = Σ_t ĝ_t C_tᵀ and dC_t += h'ᵀ ĝ_t
    (added to what dC holds). D = 37 in 16-channel blocks (a ragged last block), N = 20 (BLOCK_N 32), bf16
    activations. L = 150 in 64-step tiles (partial sums over three tiles, a ragged last one), each program walking
    all three channel blocks (the prefetch); L = 9 (one 16-step tile) with the channels split over three programs
    (their dC terms summed by atomics)."""
    config = {"BLOCK_L": 64, "BLOCK_D": 16, "PROGRAMS": programs}
    b, d, n = 2, 37, 20
    gen = torch.Generator().manual_seed(0)
    dy, z = (torch.randn(b, d, seqlen, generator=gen).to(DEVICE, torch.bfloat16) for _ in range(2))
    C = torch.randn(b, n, seqlen, generator=gen).to(DEVICE, torch.bfloat16)
    h_off = torch.randn(*((b,) if per_batch else ()), d, n, generator=gen).to(DEVICE)
    dC0 = torch.randn(b, n, seqlen, generator=gen).to(DEVICE)
    g = dy.double() * (torch.nn.functional.silu(z.double()) if gate else 1.0)
    dC = dC0.clone()
    dh = fused.state_offset_grad(dy, z if gate else None, C, h_off, dC, config=config)
    assert dh.shape == h_off.shape and dh.dtype == torch.float32
    ref_dh = torch.einsum("bdl,bnl->bdn", g, C.double())
    assert_close("dstate_offset", ref_dh if per_batch else ref_dh.sum(0), dh.double(), 1e-6)
    ref_dC = dC0.double() + torch.einsum("bdn,bdl->bnl", h_off.double().expand(b, d, n), g)
    # on CUDA C's term of a bf16 C is one tf32 pass (dC is rounded to bf16 after); the interpreter computes in fp32
    assert_close("dC", ref_dC, dC.double(), 1e-3 if dC.is_cuda else 1e-6)


@pytest.mark.parametrize(("block_d_fwd", "block_d_bwd", "warps"), [(1, 1, 1), (2, 4, 1), (4, 2, 2)],
                         ids=["blockd-1-1", "blockd-2-4", "blockd-4-2-warps2"])  # fmt: skip
def test_multiple_channel_blocks_and_tiles(block_d_fwd, block_d_bwd, warps):
    """Channel blocks of 1, 2 and 4 in each direction (D = 7 leaves a ragged last block; dB/dC summed over the
    blocks) and short tiles (4 tiles of BLOCK_L 4 over L = 13: many checkpoints), no final-state gradient."""
    cfg = {"BLOCK_L": 4, "BLOCK_D_FWD": block_d_fwd, "BLOCK_D_BWD": block_d_bwd, "WARPS_FWD": warps, "WARPS_BWD": warps}
    assert {k: fused._config(7, 5, 13, override=cfg)[k] for k in cfg} == cfg
    check_case(2, 7, 13, 5, torch.float32, ALL, True, True, final_grad=False, config=cfg)


@pytest.mark.parametrize(("block_l", "block_l_bwd", "seqlen"), [(8, 4, 13), (16, 4, 33), (16, 8, 16), (8, 2, 9)])
def test_backward_tiles_shorter_than_forward_tiles(block_l, block_l_bwd, seqlen):
    """The forward stores the states at the starts of the backward's shorter tiles inside its own tiles (2 or 4
    backward tiles per forward tile; a ragged last tile, one that ends exactly at L, and one with a single step)."""
    override = {"BLOCK_L": block_l, "BLOCK_L_BWD": block_l_bwd}
    cfg = fused._config(7, 5, seqlen, override=override)
    assert (cfg["BLOCK_L"], cfg["BLOCK_L_BWD"]) == (block_l, block_l_bwd)
    check_case(2, 7, seqlen, 5, torch.float32, ALL, True, True, config=override)


def test_backward_tile_is_capped_by_the_forward_tile():
    assert fused._config(7, 5, 100, override={"BLOCK_L": 4, "BLOCK_L_BWD": 16})["BLOCK_L_BWD"] == 4
    assert (fused._config(7, 5, 20)["BLOCK_L"], fused._config(7, 5, 20)["BLOCK_L_BWD"]) == (32, 32)
    assert (fused._config(7, 5, 5000)["BLOCK_L"], fused._config(7, 5, 5000)["BLOCK_L_BWD"]) == (256, 128)
    assert fused._config(7, 5, 5000, training=False)["BLOCK_L"] == 512  # no checkpoints: longer forward tiles


def test_inference_forward_with_long_tiles():
    """Without gradients the forward runs 512-step tiles (L 600: a full tile and a ragged one), all flags."""
    ins = make_inputs(2, 3, 600, 4, torch.float32, ALL, True, True)
    with torch.no_grad():
        y_ref, h_ref = selective_scan_ref(**ins, delta_softplus=True, return_final_state=True)
        y, h = fused.selective_scan_triton(**ins, delta_softplus=True, return_final_state=True)
    assert_close("y", y_ref, y, RATIO[torch.float32])
    assert_close("h_L", h_ref, h, RATIO[torch.float32])


@pytest.mark.parametrize("key", ["ALGO", "UNROLL_FWD", "TILE_BWD", "BLOCK_N", "CARRY_MEM"])
def test_unknown_config_key_is_rejected(key):
    """Keys of removed code paths (the tile kernels' ALGO / TILE_*, UNROLL_*) or of derived values fail loudly."""
    config = {"BLOCK_L": 4, key: 1}
    with pytest.raises(ValueError, match=rf"unknown key\(s\) \['{key}'\]; allowed keys: BLOCK_L, BLOCK_D_FWD"):
        fused._config(5, 3, 13, override=config)
    ins = make_inputs(1, 5, 13, 3, torch.float32, frozenset(), False)
    with pytest.raises(ValueError, match=key):
        fused.selective_scan_triton(**ins, config=config)


def test_dispatcher_and_no_grad():
    """backend="triton" through the dispatcher; without grad no checkpoints are kept and outputs are unchanged."""
    ins = make_inputs(2, 5, 9, 3, torch.float32, ALL, False)
    with torch.no_grad():
        y, h = selective_scan(**ins, delta_softplus=True, return_final_state=True, backend="triton")
        y_ref, h_ref = selective_scan_ref(**ins, delta_softplus=True, return_final_state=True)
    assert_close("y", y_ref, y, RATIO[torch.float32])
    assert_close("h_last", h_ref, h, RATIO[torch.float32])
    assert not y.requires_grad


def test_only_final_state_used():
    """A loss on h_L alone: the output gradient is None inside backward."""
    ins = make_inputs(1, 5, 11, 3, torch.float32, ALL, False)
    grads = {}
    for key, fn in (("ref", selective_scan_ref), ("triton", fused.selective_scan_triton)):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in ins.items()}
        _, h = fn(**leaves, delta_softplus=True, return_final_state=True)
        h.square().sum().backward()
        grads[key] = {k: v.grad for k, v in leaves.items()}
    for name in ("u", "delta", "A", "B", "initial_state"):
        assert_close(f"d{name}", grads["ref"][name], grads["triton"][name], RATIO[torch.float32])
    # C, h' and y' only reach the output, which carries no gradient here
    assert grads["triton"]["C"].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("per_batch", [False, True], ids=["shared", "rowwise"])
def test_state_update_matches_scan(dtype, per_batch):
    """Decode steps (state in place, offsets in the read-out only) reproduce the scan and the reference step."""
    b, d, seqlen, n = 2, 5, 4, 3
    ins = {k: v.detach() for k, v in make_inputs(b, d, seqlen, n, dtype, ALL, per_batch).items()}
    y_scan, h_scan = selective_scan_ref(**ins, delta_softplus=True, return_final_state=True)
    state = ins["initial_state"].expand(b, d, n).clone()
    state_ref = state.clone()
    for t in range(seqlen):
        step = {
            "x": ins["u"][:, :, t], "dt": ins["delta"][:, :, t], "A": ins["A"], "B": ins["B"][:, :, t],
            "C": ins["C"][:, :, t], "D": ins["D"], "z": ins["z"][:, :, t], "dt_bias": ins["delta_bias"],
            "dt_softplus": True, "state_offset": ins["state_offset"], "y_offset": ins["y_offset"],
        }  # fmt: skip
        y_t = selective_state_update(state, **step, backend="triton")
        y_ref = selective_state_update_ref(state_ref, **step)
        assert y_t.dtype == dtype
        assert_close(f"y[{t}]", y_ref, y_t, RATIO[dtype])
        assert_close(f"y_scan[{t}]", y_scan[:, :, t], y_t, RATIO[dtype])
    assert_close("state", state_ref, state, RATIO[torch.float32])
    assert_close("state_vs_scan", h_scan, state, RATIO[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_state_update_from_A_log(dtype):
    """``A_is_log``: the step computes A = -exp(A_log) itself (the mixers' decode step), from A_log in its own dtype."""
    b, d, n = 2, 5, 3
    ins = {k: v.detach() for k, v in make_inputs(b, d, 1, n, dtype, ALL, True).items()}
    A_log = torch.randn(d, n, device=DEVICE).to(dtype)
    step = {
        "x": ins["u"][:, :, 0], "dt": ins["delta"][:, :, 0], "B": ins["B"][:, :, 0], "C": ins["C"][:, :, 0],
        "D": ins["D"].to(dtype), "z": ins["z"][:, :, 0], "dt_bias": ins["delta_bias"], "dt_softplus": True,
        "state_offset": ins["state_offset"], "y_offset": ins["y_offset"],
    }  # fmt: skip
    state = ins["initial_state"].clone()
    state_ref, state_torch = state.clone(), state.clone()
    y = selective_state_update(state, A=A_log, A_is_log=True, **step, backend="triton")
    y_torch = selective_state_update(state_torch, A=A_log, A_is_log=True, **step, backend="torch")
    y_ref = selective_state_update_ref(state_ref, A=-torch.exp(A_log.float()), **step)
    assert torch.equal(y_torch, y_ref) and torch.equal(state_torch, state_ref)
    assert_close("y", y_ref, y, RATIO[dtype])
    assert_close("state", state_ref, state, RATIO[torch.float32])


def test_rejects_large_state():
    ins = make_inputs(1, 2, 3, 257, torch.float32, frozenset(), False)
    with pytest.raises(ValueError, match="257"):
        fused.selective_scan_triton(**ins)


def test_nloop_default_blocks_across_tiles_with_final_state_grad():
    """The default n-loop kernels at their default channel blocks (1 forward, 2 backward: odd D leaves half a block),
    several tiles of a short BLOCK_L with a ragged last one, and a final-state gradient that λ carries across all of
    them (the other multi-tile test has none); batch of 1, N not a power of two."""
    assert fused._config(3, 6, 13, override={"BLOCK_L": 4})["BLOCK_D_BWD"] == 2
    check_case(1, 3, 13, 6, torch.float32, ALL, True, True, final_grad=True, config={"BLOCK_L": 4})


def test_empty_sequence():
    """L = 0: y is empty, h_L = h_0, ∂L/∂h_0 = ∂L/∂h_L, and every other gradient is zero (not left unwritten)."""
    ins = make_inputs(2, 3, 0, 5, torch.float32, ALL, True)
    gh = torch.randn(2, 3, 5, device=DEVICE)
    out = run(fused.selective_scan_triton, ins, torch.randn(2, 3, 0, device=DEVICE), gh, True)
    assert out["y"].shape == (2, 3, 0)
    assert torch.equal(out["h_last"], ins["initial_state"].detach())
    assert torch.equal(out["dinitial_state"], gh)
    for name in ("dA", "dD", "ddelta_bias", "dstate_offset", "dy_offset"):
        assert out[name].shape == ins[name[1:]].shape and not out[name].any(), name


@pytest.mark.parametrize("with_grad", [True, False], ids=["others-need-grad", "no-grad"])
def test_gate_without_its_gradient(with_grad):
    """z given but not trained (the pre-gate output is then saved for the other gradients only), and z under
    no_grad (no checkpoints, no pre-gate output)."""
    ins = make_inputs(2, 5, 9, 3, torch.float32, ALL, True)
    ins["z"] = ins["z"].detach()
    gy = torch.randn(2, 5, 9, device=DEVICE)
    if not with_grad:
        with torch.no_grad():
            y = fused.selective_scan_triton(**ins, delta_softplus=True)
        assert_close("y", selective_scan_ref(**ins, delta_softplus=True), y, RATIO[torch.float32])
        return
    grads = {}
    for key, fn in (("ref", selective_scan_ref), ("triton", fused.selective_scan_triton)):
        leaves = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in ins.items()}
        (fn(**leaves, delta_softplus=True) * gy).sum().backward()
        grads[key] = {k: v.grad for k, v in leaves.items()}
    assert grads["triton"]["z"] is None
    for name, g in grads["ref"].items():
        if g is not None:
            assert_close(f"d{name}", g, grads["triton"][name], RATIO[torch.float32])


GPU_CASES = [
    ("D1536-L2064-all-shared-bf16", 2, 1536, 2064, 16, torch.bfloat16, ALL, False, True),
    ("D4096-L2064-all-rowwise-bf16", 2, 4096, 2064, 16, torch.bfloat16, ALL, True, True),
    ("D5120-L2064-all-shared-bf16", 2, 5120, 2064, 16, torch.bfloat16, ALL, False, True),
    ("D1536-L2064-all-rowwise-fp32", 2, 1536, 2064, 16, torch.float32, ALL, True, True),
    ("D4096-L1000-all-shared-fp16", 2, 4096, 1000, 16, torch.float16, ALL, False, True),
    ("D1536-L1-bare-bf16", 2, 1536, 1, 16, torch.bfloat16, frozenset(), False, False),
    ("D1536-L511-h0-offsets-bf16", 2, 1536, 511, 16, torch.bfloat16, frozenset(NAMES[8:]), True, True),
    ("D1000-L300-N64-all-fp32", 2, 1000, 300, 64, torch.float32, ALL, False, True),
    ("D200-L129-N256-all-bf16", 1, 200, 129, 256, torch.bfloat16, ALL, True, True),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("b", "d", "seqlen", "n", "dtype", "flags", "per_batch", "softplus"),
                         [c[1:] for c in GPU_CASES], ids=[c[0] for c in GPU_CASES])  # fmt: skip
def test_selective_scan_triton_gpu(b, d, seqlen, n, dtype, flags, per_batch, softplus):
    check_case(b, d, seqlen, n, dtype, flags, per_batch, softplus)


# long time tiles scanned by several warps (the interpreter ignores warps, so only the GPU checks their layouts)
GPU_WIDE_TILES = [
    # a row spread over several warps reads the carried state another warp wrote: the double buffer and the barrier
    {"BLOCK_L": 512, "BLOCK_L_BWD": 512, "WARPS_FWD": 4, "WARPS_BWD": 4},
    {"BLOCK_L": 512, "BLOCK_L_BWD": 64, "BLOCK_D_FWD": 2, "WARPS_FWD": 2, "WARPS_BWD": 2},
    {"BLOCK_L": 2048, "BLOCK_L_BWD": 2048, "WARPS_FWD": 8, "WARPS_BWD": 8},
    {"BLOCK_L": 1024, "BLOCK_D_FWD": 2, "WARPS_FWD": 8, "WARPS_BWD": 4},
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cfg", GPU_WIDE_TILES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_wide_time_tiles_on_several_warps_gpu(cfg):
    """L 2100 leaves a ragged last tile at every BLOCK_L; all flags, bf16, D odd."""
    check_case(2, 37, 2100, 16, torch.bfloat16, ALL, True, True, config=cfg)


def test_backward_uses_the_forward_configuration():
    """A forward's configuration (here 4-step tiles and one channel per backward program, not the defaults) is the
    one its backward launches with: its checkpoints and saved tensors depend on it."""
    ins = make_inputs(2, 5, 13, 3, torch.float32, ALL, False)
    gy = torch.randn(2, 5, 13, device=DEVICE)
    ref = run(selective_scan_ref, ins, gy, None, True)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in ins.items()}
    y = fused.selective_scan_triton(**leaves, delta_softplus=True, config={"BLOCK_L": 4, "BLOCK_D_BWD": 1})
    (y.float() * gy).sum().backward()
    for k, v in leaves.items():
        assert_close(f"d{k}", ref[f"d{k}"], v.grad, RATIO[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_time_major_views_take_the_tiled_transpose(monkeypatch, dtype):
    """The mixer's operands: u, Δ, B, C as transposes of [B, L, ·] tensors, z the second half of in_proj's output, and
    a time-major output gradient. Results and gradients equal the contiguous run's; the transposes went through the
    tiled kernel (inputs, their gradients and dy), and the [B, L, ·] sources get contiguous gradients."""
    b, d, seqlen, n = 2, 5, 37, 3
    ins = make_inputs(b, d, seqlen, n, dtype, ALL, True, True)
    gy = torch.randn(b, seqlen, d, device=DEVICE).transpose(1, 2)  # time-major dy
    # the kernel at this test's size (set for the reference run too: it also picks how dh' is computed)
    monkeypatch.setattr(fused.layout, "SMALL_NUMEL", 0)
    ref = run(fused.selective_scan_triton, ins, gy.contiguous(), None, True)

    calls = []
    transpose = fused.layout.transpose_last2
    monkeypatch.setattr(fused.layout, "transpose_last2", lambda x: calls.append(tuple(x.shape)) or transpose(x))
    leaves = {k: v.detach().clone().requires_grad_() for k, v in ins.items()}
    src = {k: leaves[k].detach().transpose(1, 2).contiguous().requires_grad_() for k in ("u", "delta", "B", "C")}
    xz = torch.cat([torch.zeros_like(src["u"]), leaves["z"].detach().transpose(1, 2)], dim=-1).requires_grad_()
    tm = {k: v.transpose(1, 2) for k, v in src.items()} | {"z": xz[..., d:].transpose(1, 2)}
    assert all(fused.layout.is_time_major_view(v) for v in tm.values())
    y = fused.selective_scan_triton(**(leaves | tm), delta_softplus=True)
    (y.float() * gy).sum().backward()
    assert len(calls) == 5 + 1 + 5  # five operands, dy, five gradients
    assert_close("y", ref["y"], y, 1e-6)
    for k, v in src.items():
        assert v.grad.is_contiguous()
        assert_close(f"d{k}", ref[f"d{k}"], v.grad.transpose(1, 2), 1e-6)
    assert_close("dz", ref["dz"], xz.grad[..., d:].transpose(1, 2), 1e-6)
    for k in ("A", "D", "delta_bias", "initial_state", "state_offset", "y_offset"):
        assert_close(f"d{k}", ref[f"d{k}"], leaves[k].grad, 1e-6)
