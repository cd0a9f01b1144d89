"""The decode steps' ``offset_index``: per-row offsets read from a table through an int32 row -> entry index; and the
kernels' tiles (``ops.launch.decode_tile``): any tile gives the reference's step.

The Triton kernels (under the interpreter on CPU) and the references with an index must equal the references given
the gathered per-row offsets; shared offsets are unaffected; bad indices are one-line ValueErrors.
"""

from __future__ import annotations

import pytest
import torch
from _triton_interp import interpret_on_cpu, reload_compiled

interpret_on_cpu()

from ssmtune import ops
from ssmtune.ops import launch
from ssmtune.ops.selective_scan import fused as s6_fused
from ssmtune.ops.ssd import fused as ssd_fused
from ssmtune.ops.testing import assert_close

reload_compiled(ssd_fused, s6_fused)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RATIO = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
INDEX = [2, 0, 2, 1, 2]  # 5 rows over a table of 3 entries (plus an unused 4th), with repeats


def _index() -> torch.Tensor:
    return torch.tensor(INDEX, dtype=torch.int32, device=DEVICE)


def _mamba2(dtype):
    b, h, p, n, g = len(INDEX), 3, 5, 6, 1  # odd sizes: masked P and N tiles
    act = {"dtype": dtype, "device": DEVICE}
    args = (
        torch.randn(b, h, p, **act), torch.randn(b, h, **act), -torch.rand(h, device=DEVICE) - 0.5,
        torch.randn(b, g, n, **act), torch.randn(b, g, n, **act), torch.randn(h, device=DEVICE), torch.randn(b, h, p, **act),
        torch.randn(h, device=DEVICE), True,
    )  # fmt: skip
    return args, (h, p, n), (h, p)


def _mamba1(dtype):
    b, d, n = len(INDEX), 7, 5
    act = {"dtype": dtype, "device": DEVICE}
    args = (
        torch.randn(b, d, **act), torch.randn(b, d, **act), -torch.rand(d, n, device=DEVICE) - 0.5,
        torch.randn(b, n, **act), torch.randn(b, n, **act), torch.randn(d, device=DEVICE), torch.randn(b, d, **act),
        torch.randn(d, device=DEVICE), True,
    )  # fmt: skip
    return args, (d, n), (d,)


# (inputs, op, reference, Triton step)
ARCHES = {
    "m2": (_mamba2, "ssd_state_update", lambda: ssd_fused.ssd_state_update_triton),
    "m1": (_mamba1, "selective_state_update", lambda: s6_fused.selective_state_update_triton),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["m2", "m1"])
@pytest.mark.parametrize("fields", ["h", "y", "hy", "h_shared_y"])
def test_indexed_offsets_equal_gathered_rows(arch, dtype, fields) -> None:
    make, op, triton_step = ARCHES[arch]
    args, h_shape, y_shape = make(dtype)
    index = _index()
    entries = max(INDEX) + 2
    h_off = torch.randn(entries, *h_shape, device=DEVICE) if "h" in fields else None
    y_off = torch.randn(entries, *y_shape, device=DEVICE) if "y" in fields else None
    if fields == "h_shared_y":  # a shared offset next to a table: read as before
        y_off = torch.randn(*y_shape, device=DEVICE)
    rows = {
        "state_offset": None if h_off is None else h_off[index.long()],
        "y_offset": y_off if y_off is None or y_off.dim() == len(y_shape) else y_off[index.long()],
    }
    state = torch.randn(len(INDEX), *h_shape, device=DEVICE)
    states = [state.clone() for _ in range(3)]
    y_rows = getattr(ops, op)(states[0], *args, **rows, backend="ref")
    y_ref = getattr(ops, op)(states[1], *args, state_offset=h_off, y_offset=y_off, offset_index=index, backend="ref")
    y_kernel = triton_step()(states[2], *args, state_offset=h_off, y_offset=y_off, offset_index=index)
    torch.testing.assert_close(y_ref, y_rows, atol=0, rtol=0)
    assert_close("y", y_rows, y_kernel, RATIO[dtype])
    assert_close("state", states[0], states[2], 1e-5)


@pytest.mark.parametrize("arch", ["m2", "m1"])
def test_shared_offsets_ignore_the_index(arch) -> None:
    make, op, triton_step = ARCHES[arch]
    args, h_shape, y_shape = make(torch.float32)
    h_off, y_off = torch.randn(*h_shape, device=DEVICE), torch.randn(*y_shape, device=DEVICE)
    state = torch.randn(len(INDEX), *h_shape, device=DEVICE)
    states = [state.clone() for _ in range(2)]
    y_plain = getattr(ops, op)(states[0], *args, state_offset=h_off, y_offset=y_off, backend="ref")
    y_kernel = triton_step()(states[1], *args, state_offset=h_off, y_offset=y_off, offset_index=_index())
    assert_close("y", y_plain, y_kernel, RATIO[torch.float32])


@pytest.mark.parametrize("arch", ["m2", "m1"])
def test_bad_offset_index(arch) -> None:
    make, op, _ = ARCHES[arch]
    args, h_shape, _ = make(torch.float32)
    state = torch.randn(len(INDEX), *h_shape, device=DEVICE)
    table = torch.randn(2, *h_shape, device=DEVICE)
    msg = rf"{op}: offset_index must be an int32 tensor of shape \[5\], got "
    for bad, got in ((_index().long(), "torch.int64"), (_index()[:3], r"\[3\]"), ([0, 1], "list")):
        with pytest.raises(ValueError, match=msg + f".*{got}"):
            getattr(ops, op)(state, *args, state_offset=table, offset_index=bad, backend="ref")
    # without an index, per-row offsets still need one row per batch row
    with pytest.raises(ValueError, match=f"{op}: state_offset must have shape"):
        getattr(ops, op)(state, *args, state_offset=table, backend="ref")


# --- tiles: on CUDA about 512 state elements per program (mamba_ssm's table), big ones under the interpreter ----------

CUDA = torch.device("cuda")
OFFSETS = ["shared", "rows", "index"]


def test_cuda_tiles_follow_the_512_element_table():
    # (rows of N elements per program, warps) for N = 16 / 32 / 64 / 128 / 256: mamba_ssm's hand-tuned table
    assert [launch.decode_tile(4096, n, CUDA) for n in (16, 32, 64, 128, 256)] == [
        (32, 4), (16, 4), (8, 4), (4, 4), (4, 8),
    ]  # fmt: skip
    assert launch.decode_tile(3, 16, CUDA) == (4, 4)  # never more rows than the next power of two of the rows
    assert launch.decode_tile(64, 128, torch.device("cpu"))[0] == 64  # interpreter: one big tile


@pytest.mark.parametrize("tile", [None, (2, 4), (4, 4), (64, 4)], ids=["default", "2rows", "4rows", "64rows"])
@pytest.mark.parametrize("kind", ["shared", "rows", "index"])
@pytest.mark.parametrize("arch", ["m2", "m1"])
def test_any_tile_gives_the_reference_step(arch, kind, tile) -> None:
    """Tiles that split the odd-sized rows unevenly, or exceed them, with shared, per-row and indexed offsets."""
    make, op, triton_step = ARCHES[arch]
    args, h_shape, y_shape = make(torch.float32)
    batch = len(INDEX)
    lead = {"shared": (), "rows": (batch,), "index": (max(INDEX) + 1,)}[kind]
    h_off, y_off = torch.randn(*lead, *h_shape, device=DEVICE), torch.randn(*lead, *y_shape, device=DEVICE)
    index = _index() if kind == "index" else None
    rows = {"state_offset": h_off, "y_offset": y_off} if index is None else {
        "state_offset": h_off[index.long()], "y_offset": y_off[index.long()]
    }  # fmt: skip
    state = torch.randn(batch, *h_shape, device=DEVICE)
    state_ref = state.clone()
    y = triton_step()(state, *args, state_offset=h_off, y_offset=y_off, offset_index=index, tile=tile)
    y_ref = getattr(ops, op)(state_ref, *args, **rows, backend="ref")
    assert_close("state", state_ref, state, 1e-5)
    assert_close("y", y_ref, y, 1e-5)


# --- 16-bit states: loaded and updated in fp32, stored back in their dtype (generate(state_dtype=...)) ----------------


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", ["m2", "m1"])
def test_16bit_state_is_the_fp32_step_rounded(arch, state_dtype) -> None:
    make, op, triton_step = ARCHES[arch]
    args, h_shape, y_shape = make(torch.bfloat16)
    index = _index()
    h_off = torch.randn(max(INDEX) + 1, *h_shape, device=DEVICE)
    y_off = torch.randn(*y_shape, device=DEVICE)  # offsets keep their own dtype (fp32) next to a 16-bit state
    state = torch.randn(len(INDEX), *h_shape, device=DEVICE).to(state_dtype)
    wide, ref, kernel = state.float(), state.clone(), state.clone()
    kw = {"state_offset": h_off, "y_offset": y_off, "offset_index": index}
    y_wide = getattr(ops, op)(wide, *args, **kw, backend="ref")  # the same step on an fp32 copy of the state
    y_ref = getattr(ops, op)(ref, *args, **kw, backend="ref")
    y_kernel = triton_step()(kernel, *args, **kw)
    assert ref.dtype == kernel.dtype == state_dtype
    # the reference stores the fp32 update rounded once, and reads y from the fp32 update (not the rounded state)
    torch.testing.assert_close(ref, wide.to(state_dtype), atol=0, rtol=0)
    torch.testing.assert_close(y_ref, y_wide, atol=0, rtol=0)
    # the kernel's fp32 sums may differ in the last fp32 bit, which can move a 16-bit rounding by one unit
    assert_close("state", ref.float(), kernel.float(), 1e-2)
    assert_close("y", y_ref, y_kernel, RATIO[torch.bfloat16])
    assert not kernel.isnan().any() and not y_kernel.isnan().any()
    ulp = torch.finfo(state_dtype).eps
    assert ((ref.float() - kernel.float()).abs() <= ulp * ref.float().abs() + 1e-6).all()


@pytest.mark.parametrize("arch", ["m2", "m1"])
def test_state_of_another_dtype_is_refused(arch) -> None:
    make, op, _ = ARCHES[arch]
    args, h_shape, _ = make(torch.float32)
    state = torch.randn(len(INDEX), *h_shape, device=DEVICE, dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"^{op}: state must be fp32, bf16 or fp16, got dtype torch.float64$"):
        getattr(ops, op)(state, *args, backend="ref")
