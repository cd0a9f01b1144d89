"""Triton Mamba-2 chunked SSD against the fp32 sequential reference: outputs, final state and every gradient.

On CPU the kernels run under the Triton interpreter (small shapes, chunk 16); ``-m gpu`` runs mamba_ssm-sized shapes
on CUDA. Allocations inside ``ssmtune.ops`` are NaN-poisoned by tests/conftest.py, so an unwritten output fails.
"""

from __future__ import annotations

import pytest
import torch
from _triton_interp import interpret_on_cpu, reload_compiled

interpret_on_cpu()

from ssmtune.ops import ssd_scan, ssd_state_update
from ssmtune.ops.ssd import fused
from ssmtune.ops.ssd.naive import ssd_scan_ref, ssd_state_update_ref
from ssmtune.ops.testing import assert_close

reload_compiled(fused)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# RMS-relative error against the fp32 reference. CPU (interpreter): exact fp32 dots. GPU: fp32 dots run in TF32.
RATIO_CPU = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
RATIO_GPU = {torch.float32: 5e-3, torch.bfloat16: 3e-2, torch.float16: 1e-2}
NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state", "state_offset", "y_offset")
ALL = frozenset(NAMES[5:])


def make_inputs(
    b: int,
    seqlen: int,
    h: int,
    p: int,
    n: int,
    g: int,
    dtype: torch.dtype,
    flags: frozenset[str],
    per_row: bool,
    d_per_channel: bool = True,
    device: str = DEVICE,
) -> dict[str, torch.Tensor]:
    """Activations in ``dtype``; parameters (A, D, dt_bias, states, offsets) in fp32 as in the model."""
    act = {"dtype": dtype, "device": device}
    lead = (b,) if per_row else ()
    t = {
        "x": torch.randn(b, seqlen, h, p, **act),
        "dt": (torch.randn(b, seqlen, h, device=device) * 0.5 - 1.0).to(dtype),
        "A": -torch.empty(h, device=device).uniform_(0.5, 2.0),
        "B": torch.randn(b, seqlen, g, n, **act) / n**0.5,
        "C": torch.randn(b, seqlen, g, n, **act),
        "D": torch.randn(h, p, device=device) if d_per_channel else torch.randn(h, device=device),
        "z": torch.randn(b, seqlen, h, p, **act),
        "dt_bias": torch.randn(h, device=device) * 0.5,
        "initial_state": torch.randn(*lead, h, p, n, device=device),
        "state_offset": torch.randn(*lead, h, p, n, device=device) / n**0.5,
        "y_offset": torch.randn(*lead, h, p, device=device),
    }
    return {k: v.requires_grad_() for k, v in t.items() if k in NAMES[:5] or k in flags}


def run(fn, inputs: dict[str, torch.Tensor], softplus: bool, chunk_size: int, dy, dh_last, **extra):
    """Forward + backward with a random output gradient and final-state gradient; returns (y, h_L, grads).
    ``extra``: more arguments of both scans (resets)."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    pos = [leaves[k] for k in NAMES[:5]]
    kw = {k: v for k, v in leaves.items() if k not in NAMES[:5]}
    y, h_last = fn(*pos, chunk_size=chunk_size, dt_softplus=softplus, return_final_state=True, **kw, **extra)
    ((y.float() * dy).sum() + (h_last * dh_last).sum()).backward()
    return y, h_last, {k: v.grad for k, v in leaves.items()}


def check(inputs, softplus: bool, chunk_size: int, ratio: float, fn=None, **extra) -> None:
    """``fn`` (default the Triton scan) against the reference, both called with ``extra``."""
    b, seqlen, h, p = inputs["x"].shape
    n = inputs["B"].shape[-1]
    dy = torch.randn(b, seqlen, h, p, device=inputs["x"].device)
    dh_last = torch.randn(b, h, p, n, device=inputs["x"].device)
    y_ref, h_ref, g_ref = run(ssd_scan_ref, inputs, softplus, chunk_size, dy, dh_last, **extra)
    y, h_last, g = run(fn or fused.ssd_scan_triton, inputs, softplus, chunk_size, dy, dh_last, **extra)
    assert y.dtype == inputs["x"].dtype and h_last.dtype == torch.float32
    assert_close("y", y_ref, y, ratio)
    assert_close("h_last", h_ref, h_last, ratio)
    for name in inputs:
        assert g[name].dtype == inputs[name].dtype, name
        assert_close(f"d{name}", g_ref[name], g[name], ratio)


# (id, B, L, H, P, N, G, dtype, optional inputs, per-row states/offsets, D per channel, softplus)
CASES = [
    ("L37-G2-all-rowwise-fp32", 2, 37, 4, 8, 16, 2, torch.float32, ALL, True, True, True),
    ("L37-G1-all-shared-Dhead-fp32", 2, 37, 4, 8, 16, 1, torch.float32, ALL, False, False, True),
    ("L1-G2-all-shared-fp32", 2, 1, 4, 8, 16, 2, torch.float32, ALL, False, True, True),
    ("L37-G2-bare-nosoftplus-fp32", 2, 37, 4, 8, 16, 2, torch.float32, frozenset(), False, True, False),
    (
        "L32-G4-offsets-only-fp32",
        1,
        32,
        4,
        8,
        16,
        4,
        torch.float32,
        frozenset({"state_offset", "y_offset"}),
        True,
        True,
        True,
    ),
    ("L37-G2-all-rowwise-bf16", 2, 37, 4, 8, 16, 2, torch.bfloat16, ALL, True, True, True),
    (
        "L37-G1-h0-z-shared-fp16",
        1,
        37,
        4,
        8,
        16,
        1,
        torch.float16,
        frozenset({"z", "initial_state", "dt_bias"}),
        False,
        True,
        True,
    ),
]


@pytest.mark.parametrize(
    ("b", "seqlen", "h", "p", "n", "g", "dtype", "flags", "per_row", "d_per_channel", "softplus"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_ssd_scan_triton(b, seqlen, h, p, n, g, dtype, flags, per_row, d_per_channel, softplus):
    inputs = make_inputs(b, seqlen, h, p, n, g, dtype, flags, per_row, d_per_channel)
    check(inputs, softplus, chunk_size=16, ratio=RATIO_CPU[dtype] if DEVICE == "cpu" else RATIO_GPU[dtype])


@pytest.mark.parametrize("seqlen", [45, 150])
@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "rowwise"])
def test_ssd_scan_triton_state_offset_odd_sizes(seqlen, per_row):
    """dh' (accumulated in the serial reverse chunk loop) and the h' dots at odd P, N, H/G and a ragged last chunk,
    against the reference."""
    flags = frozenset({"D", "z", "dt_bias", "state_offset", "y_offset"})
    inputs = make_inputs(2, seqlen, 6, 12, 20, 3, torch.float32, flags, per_row)
    check(inputs, softplus=True, chunk_size=16, ratio=RATIO_CPU[torch.float32] if DEVICE == "cpu" else 5e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_ssd_scan_triton_several_blocks_per_chunk(monkeypatch, dtype):
    """16-step blocks in 64-step chunks (the GPU runs 64-step blocks in 256-step chunks): the blocks below the
    diagonal and the causal block skip of the chunk-scan kernels, which one block per chunk (every other CPU case)
    never reaches. A ragged last chunk ends inside its second block."""
    blocks = fused._blocks
    monkeypatch.setattr(fused, "_blocks", lambda chunk, p, n: {**blocks(chunk, p, n), "BK": 16})
    inputs = make_inputs(2, 64 + 21, 4, 8, 16, 2, dtype, ALL, per_row=True)
    check(inputs, softplus=True, chunk_size=64, ratio=RATIO_CPU[dtype] if DEVICE == "cpu" else RATIO_GPU[dtype])


def test_ssd_scan_triton_offsets_change_output():
    """Guards the test above against a kernel that ignores h' or y' (the reference would then differ anyway)."""
    inputs = make_inputs(1, 20, 4, 8, 16, 2, torch.float32, frozenset({"state_offset", "y_offset"}), False)
    base = {k: v for k, v in inputs.items() if k in NAMES[:5]}
    y0 = fused.ssd_scan_triton(**base, chunk_size=16)
    y_h = fused.ssd_scan_triton(**base, chunk_size=16, state_offset=inputs["state_offset"])
    y_y = fused.ssd_scan_triton(**base, chunk_size=16, y_offset=inputs["y_offset"])
    assert (y_h - y0).abs().max() > 1e-2 and (y_y - y0).abs().max() > 1e-2


def test_ssd_scan_triton_final_state_only_and_dispatcher():
    """Backward with only the final state used (no output gradient), called through the dispatcher."""
    inputs = make_inputs(2, 21, 4, 8, 16, 2, torch.float32, frozenset({"initial_state", "dt_bias"}), True)
    grads = []
    for backend in ("ref", "triton"):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
        _, h_last = ssd_scan(**leaves, chunk_size=16, dt_softplus=True, return_final_state=True, backend=backend)
        h_last.square().sum().backward()
        grads.append({k: v.grad for k, v in leaves.items()})
    for name in inputs:
        # C and the gate do not reach h_L: autograd gives the reference None there, the kernel zeros
        ref = grads[0][name] if grads[0][name] is not None else torch.zeros_like(inputs[name])
        assert_close(f"d{name}", ref, grads[1][name], RATIO_CPU[torch.float32] * 10)


def test_ssd_scan_triton_bad_chunk_size():
    inputs = make_inputs(1, 8, 4, 8, 16, 2, torch.float32, frozenset(), False)
    with pytest.raises(ValueError, match="48"):
        fused.ssd_scan_triton(**inputs, chunk_size=48)


@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "rowwise"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_ssd_state_update_triton(per_row, dtype):
    b, h, p, n, g = 3, 4, 8, 16, 2
    act = {"dtype": dtype, "device": DEVICE}
    x, z = torch.randn(b, h, p, **act), torch.randn(b, h, p, **act)
    dt = torch.randn(b, h, **act)
    A, D, dt_bias = -torch.rand(h, device=DEVICE) - 0.5, torch.randn(h, p, device=DEVICE), torch.randn(h, device=DEVICE)
    B, C = torch.randn(b, g, n, **act), torch.randn(b, g, n, **act)
    lead = (b,) if per_row else ()
    h_off, y_off = torch.randn(*lead, h, p, n, device=DEVICE), torch.randn(*lead, h, p, device=DEVICE)
    state = torch.randn(b, h, p, n, device=DEVICE)
    state_ref = state.clone()
    args = (x, dt, A, B, C, D, z, dt_bias, True)
    y_ref = ssd_state_update_ref(state_ref, *args, state_offset=h_off, y_offset=y_off)
    y = ssd_state_update(state, *args, state_offset=h_off, y_offset=y_off, backend="triton")
    ratio = RATIO_CPU[dtype] if DEVICE == "cpu" else RATIO_GPU[dtype]
    assert_close("state", state_ref, state, 1e-5)
    assert_close("y", y_ref, y, ratio)


def test_ssd_state_update_from_A_log():
    """``A_is_log``: the step computes A = -exp(A_log) itself (the mixers' decode step); x, dt, B, C and z are strided
    slices of wider tensors, as the mixers pass them."""
    b, h, p, n, g = 2, 4, 8, 16, 2
    wide = torch.randn(b, 2 * h * p + 2 * g * n + h, device=DEVICE).to(torch.bfloat16)
    x, z = wide[:, : h * p].view(b, h, p), wide[:, h * p : 2 * h * p].view(b, h, p)
    B = wide[:, 2 * h * p : 2 * h * p + g * n].view(b, g, n)
    C = wide[:, 2 * h * p + g * n : 2 * h * p + 2 * g * n].view(b, g, n)
    dt = wide[:, -h:]
    A_log, D, dt_bias = torch.randn(h, device=DEVICE).to(torch.bfloat16), torch.randn(h, device=DEVICE), torch.randn(h)
    h_off = torch.randn(h, p, n, device=DEVICE)
    state = torch.randn(b, h, p, n, device=DEVICE)
    state_ref = state.clone()
    y = ssd_state_update(state, x, dt, A_log, B, C, D, z, dt_bias.to(DEVICE), True, state_offset=h_off, A_is_log=True,
                         backend="triton")  # fmt: skip
    y_ref = ssd_state_update_ref(state_ref, x, dt, -torch.exp(A_log.float()), B, C, D, z, dt_bias.to(DEVICE), True,
                                 state_offset=h_off)  # fmt: skip
    assert_close("state", state_ref, state, 1e-5)
    assert_close("y", y_ref, y, RATIO_CPU[torch.bfloat16] if DEVICE == "cpu" else RATIO_GPU[torch.bfloat16])


def test_ssd_prefill_then_step_equals_scan():
    """Decode parity: the scan's final state plus one Triton step equals the scan over one more token."""
    flags = frozenset({"D", "z", "dt_bias", "initial_state", "state_offset", "y_offset"})
    inputs = {k: v.detach() for k, v in make_inputs(2, 18, 4, 8, 16, 2, torch.float32, flags, True).items()}
    kw = {k: v for k, v in inputs.items() if k not in NAMES[:5] and k != "z"}
    seq = {k: inputs[k] for k in ("x", "dt", "B", "C", "z")}
    y_full = fused.ssd_scan_triton(
        seq["x"], seq["dt"], inputs["A"], seq["B"], seq["C"], z=seq["z"], chunk_size=16, dt_softplus=True, **kw
    )
    head = {k: v[:, :-1] for k, v in seq.items()}
    _, state = fused.ssd_scan_triton(
        head["x"], head["dt"], inputs["A"], head["B"], head["C"], z=head["z"], chunk_size=16, dt_softplus=True,
        return_final_state=True, **kw,
    )  # fmt: skip
    last = {k: v[:, -1] for k, v in seq.items()}
    y_step = fused.ssd_state_update_triton(
        state, last["x"], last["dt"], inputs["A"], last["B"], last["C"], inputs["D"], last["z"], inputs["dt_bias"],
        True, state_offset=inputs["state_offset"], y_offset=inputs["y_offset"],
    )  # fmt: skip
    assert_close("y_step", y_full[:, -1], y_step, 1e-4)


# (L, G, dtype): 2048 + 16 with one group; an odd length with 8 groups and per-row states/offsets
GPU_CASES = [(seqlen, g, dtype) for seqlen, g in ((2048 + 16, 1), (1031, 8)) for dtype in RATIO_GPU]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("seqlen", "g", "dtype"), GPU_CASES, ids=[f"L{s}-G{g}-{str(d)[6:]}" for s, g, d in GPU_CASES])
def test_ssd_scan_triton_gpu(seqlen, g, dtype):
    inputs = make_inputs(2, seqlen, 24, 64, 128, g, dtype, ALL, per_row=g == 8)
    check(inputs, softplus=True, chunk_size=256, ratio=RATIO_GPU[dtype])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", list(RATIO_GPU), ids=[str(d)[6:] for d in RATIO_GPU])
def test_ssd_scan_triton_gpu_short_chunks(dtype):
    """64-step chunks (the default up to L 512) at head dim 64, N 128: in fp32 the dC kernel needed more shared memory
    than the GPU has with 3 pipeline stages; the GPU cases above run 256-step chunks."""
    inputs = make_inputs(2, 300, 8, 64, 128, 1, dtype, ALL, per_row=False)
    check(inputs, softplus=True, chunk_size=64, ratio=RATIO_GPU[dtype])
