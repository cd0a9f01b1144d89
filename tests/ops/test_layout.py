"""The tiled transpose that moves the mixer's time-major views into the Mamba-1 scan's [B, D, L] rows and back.

On CPU the kernel runs under the Triton interpreter.
"""

from __future__ import annotations

import pytest
import torch
from _triton_interp import interpret_on_cpu, reload_compiled

interpret_on_cpu()

from ssmtune.ops import layout

reload_compiled(layout)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def nan_poison(monkeypatch):
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))
    monkeypatch.setattr(layout, "SMALL_NUMEL", 0)  # the kernel at test sizes


def test_small_eager_tensors_keep_torchs_copy(monkeypatch):
    """Below SMALL_NUMEL (outside graph capture) the launch would cost more than it saves: torch's copy runs."""
    monkeypatch.setattr(layout, "SMALL_NUMEL", 2 * 19 * 33 + 1)
    monkeypatch.setattr(layout, "transpose_last2", lambda x: pytest.fail("the kernel ran below SMALL_NUMEL"))
    view = torch.randn(2, 19, 33, device=DEVICE).transpose(1, 2)
    assert torch.equal(layout.channel_major(view), view.contiguous())
    assert torch.equal(layout.contiguous_rows(view), view.contiguous())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize(("batch", "rows", "cols"), [(2, 67, 131), (1, 1, 5), (3, 64, 64), (2, 130, 1)])
def test_transpose_last2_matches_torch(dtype, batch, rows, cols):
    """Odd sizes (ragged tiles on both axes), a single row or column; exact, since it is a copy."""
    x = torch.randn(batch, rows, cols, device=DEVICE).to(dtype)
    y = layout.transpose_last2(x)
    assert y.is_contiguous() and y.shape == (batch, cols, rows)
    assert torch.equal(y, x.transpose(1, 2).contiguous())


def test_transpose_last2_reads_any_strides():
    """The z half of in_proj's output (a slice of a wider row) and a channel-major source."""
    xz = torch.randn(2, 37, 2 * 45, device=DEVICE)
    z = xz[..., 45:]
    assert torch.equal(layout.transpose_last2(z), z.transpose(1, 2).contiguous())
    t = torch.randn(2, 45, 37, device=DEVICE).transpose(1, 2)  # [2, 37, 45] with the time axis contiguous
    assert torch.equal(layout.transpose_last2(t), t.transpose(1, 2).contiguous())


def test_transpose_last2_rejects_other_ranks():
    with pytest.raises(ValueError, match=r"3-d tensor, got shape \(4, 5\)"):
        layout.transpose_last2(torch.zeros(4, 5))


def test_channel_major_and_its_gradient_layout():
    """A time-major [B, D, L] view becomes contiguous rows; the gradient comes back as a contiguous [B, L, D] tensor,
    so the projection that produced the view reads it without another copy."""
    src = torch.randn(2, 19, 33, device=DEVICE, requires_grad=True)  # [B, L, D]
    view = src.transpose(1, 2)  # [B, D, L], time-major
    assert layout.is_time_major_view(view)
    out = layout.channel_major(view)
    assert out.is_contiguous() and torch.equal(out, view.contiguous())
    g = torch.randn(2, 33, 19, device=DEVICE)
    seen = {}
    src.register_hook(lambda grad: seen.update(contiguous=grad.is_contiguous()))
    out.backward(g)
    assert torch.equal(src.grad, g.transpose(1, 2))
    assert seen["contiguous"]


def test_channel_major_leaves_other_tensors():
    x = torch.randn(2, 5, 7, device=DEVICE)
    assert layout.channel_major(x) is x
    assert layout.channel_major(None) is None
    odd = torch.randn(2, 7, 5, 3, device=DEVICE)[..., 0].transpose(1, 2)  # no unit stride: plain contiguous()
    assert not layout.is_time_major_view(odd)
    assert torch.equal(layout.channel_major(odd), odd.contiguous())
    assert torch.equal(layout.contiguous_rows(odd), odd.contiguous())
