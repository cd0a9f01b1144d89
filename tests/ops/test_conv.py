"""Causal depthwise conv1d with an initial conv state, its continuation and its decode step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssmtune.ops import causal_conv1d, causal_conv1d_update
from ssmtune.ops.testing import assert_close


def manual_conv(x, weight, bias, init, activation):
    """y_t = bias + Σ_j w[K-1-j] · x_{t-j}, reading x_{t-j} from the initial state when t - j < 0 (fp64 loops)."""
    x, weight = x.double(), weight.double()
    b, c, seqlen = x.shape
    width = weight.shape[1]
    init = torch.zeros(b, c, width - 1) if init is None else init.double().expand(b, c, width - 1)
    y = torch.zeros(b, c, seqlen, dtype=torch.float64)
    for t in range(seqlen):
        for j in range(width):
            src = x[..., t - j] if t - j >= 0 else init[..., width - 1 + t - j]
            y[..., t] += weight[:, width - 1 - j] * src
    if bias is not None:
        y = y + bias.double()[:, None]
    return F.silu(y) if activation == "silu" else y


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("init_shape", ["none", "shared", "per_batch"])
@pytest.mark.parametrize("seqlen", [1, 2, 13])
def test_conv_with_initial_state_matches_manual(seqlen, init_shape, activation):
    b, c, width = 2, 5, 4
    x, weight, bias = torch.randn(b, c, seqlen), torch.randn(c, width), torch.randn(c)
    init = {"none": None, "shared": torch.randn(c, width - 1), "per_batch": torch.randn(b, c, width - 1)}[init_shape]
    y, last = causal_conv1d(x, weight, bias, initial_state=init, activation=activation, return_final_state=True)
    assert_close("y", manual_conv(x, weight, bias, init, activation), y, 1e-6)
    full = torch.cat([torch.zeros(b, c, width - 1) if init is None else init.expand(b, c, width - 1), x], dim=-1)
    assert torch.equal(last, full[..., -(width - 1) :])


@pytest.mark.parametrize("cut", [2, 7])
def test_split_sequence_continuation(cut):
    b, c, seqlen, width = 2, 6, 12, 4
    x, weight, bias = torch.randn(b, c, seqlen), torch.randn(c, width), torch.randn(c)
    init = torch.randn(b, c, width - 1)
    y, last = causal_conv1d(x, weight, bias, initial_state=init, activation="silu", return_final_state=True)
    y1, s1 = causal_conv1d(x[..., :cut], weight, bias, initial_state=init, activation="silu", return_final_state=True)
    y2, s2 = causal_conv1d(x[..., cut:], weight, bias, initial_state=s1, activation="silu", return_final_state=True)
    assert_close("y", y, torch.cat([y1, y2], dim=-1), 1e-6)
    assert torch.equal(last, s2)


def test_update_loop_equals_full_conv():
    b, c, seqlen, width = 3, 4, 9, 4
    x, weight, bias = torch.randn(b, c, seqlen), torch.randn(c, width), torch.randn(c)
    init = torch.randn(b, c, width - 1)
    y, last = causal_conv1d(x, weight, bias, initial_state=init, activation="silu", return_final_state=True)
    state = init.clone()
    ys = [causal_conv1d_update(x[..., t], state, weight, bias, activation="silu") for t in range(seqlen)]
    assert_close("y", y, torch.stack(ys, dim=-1), 1e-6)
    assert torch.equal(state, last)


def test_gradcheck_fp64_including_initial_state():
    b, c, seqlen, width = 2, 3, 5, 3
    args = [
        torch.randn(b, c, seqlen, dtype=torch.float64, requires_grad=True),
        torch.randn(c, width, dtype=torch.float64, requires_grad=True),
        torch.randn(c, dtype=torch.float64, requires_grad=True),
        torch.randn(c, width - 1, dtype=torch.float64, requires_grad=True),
    ]

    def f(x, w, bias, init):
        return causal_conv1d(x, w, bias, initial_state=init, activation="silu", return_final_state=True)

    assert torch.autograd.gradcheck(f, tuple(args))


def test_bad_arguments_raise():
    x, weight = torch.randn(2, 5, 7), torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"x must be \[B, C, L\], got shape \(5, 7\)"):
        causal_conv1d(x[0], weight)
    with pytest.raises(ValueError, match=r"weight must be \[C=5, K\], got shape \(4, 4\)"):
        causal_conv1d(x, torch.randn(4, 4))
    with pytest.raises(ValueError, match=r"initial_state .* got shape \(5, 2\)"):
        causal_conv1d(x, weight, initial_state=torch.randn(5, 2))
    with pytest.raises(ValueError, match="activation must be None or 'silu', got 'relu'"):
        causal_conv1d(x, weight, activation="relu")
