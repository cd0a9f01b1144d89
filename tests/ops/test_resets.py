"""Packed rows (``resets``): a row of several sequences, each in a slot starting at a multiple of RESET_ALIGN, equals
the sequences run alone from the initial state (outputs, final state of the last one, all gradients)."""

import pytest
import torch

from ssmtune import ops
from ssmtune.ops import RESET_ALIGN

# slots of row 0: [0, 64) [64, 192) [192, 200); row 1: one sequence; lengths within each slot counted from its start
SLOTS = [[(0, 50), (64, 128), (192, 7)], [(0, 200)]]
L = 200


def _resets(batch: int) -> torch.Tensor:
    r = torch.zeros(batch, -(-L // RESET_ALIGN), dtype=torch.bool)
    for b, slots in enumerate(SLOTS):
        for start, _ in slots:
            r[b, start // RESET_ALIGN] = True
    return r


def _masked_grad(t: torch.Tensor, time_dim: int) -> torch.Tensor:
    """Zero outside the sequences: the positions between a sequence's end and the next slot are padding."""
    m = torch.zeros_like(t)
    for b, slots in enumerate(SLOTS):
        for start, n in slots:
            m[b].narrow(time_dim - 1, start, n).fill_(1)
    return m


@pytest.mark.parametrize(("op", "backend"), [("selective_scan", "ref"), ("ssd_scan", "ref"), ("ssd_scan", "torch")])
@pytest.mark.parametrize("shared", [True, False])
def test_resets_equal_separate_runs(op, backend, shared):
    torch.manual_seed(0)
    batch = len(SLOTS)
    if op == "selective_scan":
        d, n, time_dim = 6, 4, 2
        u, delta, z = (torch.randn(batch, d, L) for _ in range(3))
        A = -torch.rand(d, n) - 0.5
        B, C = torch.randn(batch, n, L), torch.randn(batch, n, L)
        lead = () if shared else (batch,)
        h0, hoff = torch.randn(*lead, d, n), torch.randn(*lead, d, n)
        yoff = torch.randn(*lead, d)
        timed = [u, delta, B, C, z]
        fixed = {"A": A, "D": torch.randn(d)}

        def run(u, delta, B, C, z, h0, hoff, yoff, **kw):
            return ops.selective_scan(u, delta, fixed["A"], B, C, fixed["D"], z, None, True, initial_state=h0,
                                      state_offset=hoff, y_offset=yoff, backend=backend, **kw)  # fmt: skip
    else:
        h, p, g, n, time_dim = 4, 3, 2, 5, 1
        x, z = torch.randn(batch, L, h, p), torch.randn(batch, L, h, p)
        dt = torch.randn(batch, L, h)
        B, C = torch.randn(batch, L, g, n), torch.randn(batch, L, g, n)
        lead = () if shared else (batch,)
        h0, hoff, yoff = torch.randn(*lead, h, p, n), torch.randn(*lead, h, p, n), torch.randn(*lead, h, p)
        timed = [x, dt, B, C, z]
        fixed = {"A": -torch.rand(h) - 0.5, "D": torch.randn(h)}

        def run(x, dt, B, C, z, h0, hoff, yoff, **kw):
            return ops.ssd_scan(x, dt, fixed["A"], B, C, D=fixed["D"], z=z, dt_softplus=True, initial_state=h0,
                                state_offset=hoff, y_offset=yoff, backend=backend, **kw)  # fmt: skip

    params = [t.requires_grad_() for t in (*timed, h0, hoff, yoff)]
    y, final = run(*params, resets=_resets(batch), return_final_state=True)
    gy = torch.randn_like(y) * _masked_grad(y, time_dim)
    grads = torch.autograd.grad((y * gy).sum(), params)
    # the same sequences, one at a time
    want_y = torch.zeros_like(y)
    loss = 0
    for b, slots in enumerate(SLOTS):
        for start, n_ in slots:
            piece = [t[b : b + 1].narrow(time_dim, start, n_) for t in params[:5]]
            st = [t if shared else t[b : b + 1] for t in params[5:]]
            yb, fb = run(*piece, *st, return_final_state=True)
            want_y[b : b + 1].narrow(time_dim, start, n_).copy_(yb.detach())
            loss = loss + (yb * gy[b : b + 1].narrow(time_dim, start, n_)).sum()
            if b == 1:  # row 1's one sequence fills it: its final state is the row's
                last = fb
    want = torch.autograd.grad(loss, params, allow_unused=True)
    mask = _masked_grad(y, time_dim)
    torch.testing.assert_close(y * mask, want_y)
    torch.testing.assert_close(final[1], last[0])
    for name, g_, w in zip(["x", "dt", "B", "C", "z", "h0", "h'", "y'"], grads, want):
        torch.testing.assert_close(g_, torch.zeros_like(g_) if w is None else w, msg=name)


def test_resets_errors():
    x = torch.randn(1, 70, 2, 3)
    args = (x, torch.randn(1, 70, 2), -torch.rand(2), torch.randn(1, 70, 1, 4), torch.randn(1, 70, 1, 4))
    with pytest.raises(ValueError, match=r"resets must be a bool tensor of shape \[1, 2\]"):
        ops.ssd_scan(*args, resets=torch.zeros(1, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="two layouts"):
        ops.ssd_scan(*args, resets=torch.zeros(1, 2, dtype=torch.bool), cu_seqlens=torch.tensor([0, 70]))
