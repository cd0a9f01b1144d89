"""The mixers' fused training op (causal conv + SiLU + SSD scan, the conv recomputed in the backward) against the
unfused Triton ops it replaces: the same output and the same gradients, bit for bit, and less kept for the backward
(the conv and the chunk states are recomputed there).

On CPU the kernels run under the Triton interpreter (small, odd shapes).
"""

from __future__ import annotations

import pytest
import torch
from _triton_interp import interpret_on_cpu, reload_compiled

interpret_on_cpu()

from ssmtune import ops
from ssmtune.ops import conv_fused
from ssmtune.ops.ssd import fused

reload_compiled(fused, conv_fused)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(b, seqlen, h, p, g, n, k, dtype, *, padded, offsets, frozen=False):
    """An in_proj-like output [B, L, z | xBC | dt] whose xBC and dt slices feed the op, as in the mixers."""
    gen = torch.Generator().manual_seed(seqlen * 31 + h)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(DEVICE)

    d = h * p
    c = d + 2 * g * n
    zxbcdt = rnd(b, seqlen, d + c + h).to(dtype).requires_grad_(not frozen)
    params = {
        "weight": rnd(c, k, scale=0.5),
        "bias": rnd(c, scale=0.1),
        "A": -torch.empty(h).uniform_(0.5, 2.0, generator=gen).to(DEVICE),
        "D": rnd(h),
        "dt_bias": rnd(h, scale=0.5),
        "conv0": rnd(b, c, k - 1) if offsets else None,
        "h0": rnd(b, h, p, n, scale=0.3) if offsets else None,
        "h_off": rnd(h, p, n, scale=0.3) if offsets else None,
        "y_off": rnd(h, p, scale=0.3) if offsets else None,
    }
    # frozen: a state adapter's first mixer, where only h' takes a gradient
    params = {
        name: None if t is None else t.requires_grad_(not frozen or name == "h_off") for name, t in params.items()
    }
    mask = None
    if padded:  # row 1 left-padded by 5
        mask = torch.ones(b, seqlen, dtype=torch.long, device=DEVICE)
        mask[1, :5] = 0
    return zxbcdt, params, mask, (d, c)


def unfused(zxbcdt, prm, mask, dims, h, p, g, chunk):
    d, c = dims
    b, seqlen, _ = zxbcdt.shape
    xbc = zxbcdt[..., d : d + c].transpose(1, 2)
    dt = zxbcdt[..., d + c :]
    out = conv_fused.causal_conv1d_triton(xbc, prm["weight"], prm["bias"], initial_state=prm["conv0"],
                                          activation="silu", channels_last=True).transpose(1, 2)  # fmt: skip
    if mask is not None:
        out = (out * mask[:, :, None]).to(out.dtype)
    x, B, C = torch.split(out, [d, (c - d) // 2, (c - d) // 2], dim=-1)
    return fused.ssd_scan_triton(
        x.reshape(b, seqlen, h, p), dt, prm["A"], B.reshape(b, seqlen, g, -1), C.reshape(b, seqlen, g, -1),
        chunk_size=chunk, D=prm["D"], dt_bias=prm["dt_bias"], dt_softplus=True, initial_state=prm["h0"],
        state_offset=prm["h_off"], y_offset=prm["y_off"],
    )  # fmt: skip


def fused_op(zxbcdt, prm, mask, dims, h, p, g, chunk):
    d, c = dims
    return fused.conv_ssd_scan_triton(
        zxbcdt[..., d : d + c].transpose(1, 2), prm["weight"], prm["bias"], zxbcdt[..., d + c :], prm["A"],
        headdim=p, ngroups=g, conv_initial_state=prm["conv0"], mask=mask, chunk_size=chunk, D=prm["D"],
        dt_bias=prm["dt_bias"], dt_softplus=True, initial_state=prm["h0"], state_offset=prm["h_off"],
        y_offset=prm["y_off"],
    )  # fmt: skip


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of ``fn()`` (leaf tensors left out)."""
    seen: dict[int, int] = {}

    def pack(t):
        if not (t.is_leaf and t.requires_grad):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def run(fn, zxbcdt, prm, mask, dims, h, p, g, chunk, seed):
    for t in (zxbcdt, *prm.values()):
        if t is not None:
            t.grad = None
    y, kept = saved_bytes(lambda: fn(zxbcdt, prm, mask, dims, h, p, g, chunk))
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    (y.float() * w).sum().backward()
    grads = {name: t.grad for name, t in {"zxbcdt": zxbcdt, **prm}.items() if t is not None and t.requires_grad}
    return y.detach(), grads, kept


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("padded", "offsets", "frozen"), [(False, False, False), (True, True, False),
                                                       (True, True, True)], ids=["plain", "mask-offsets", "h'-only"])  # fmt: skip
def test_conv_ssd_scan_matches_unfused(dtype, padded, offsets, frozen):
    """Odd sizes (P 6 on the CPU, N 10, G 2 groups of 3 heads, K 4, a ragged last chunk): the same output and
    gradients of zxbcdt, the conv's weight, bias and initial state, A, D, dt_bias, h0, h' and y', bit for bit."""
    h, p, g, n, k, chunk = 6, 6 if DEVICE == "cpu" else 16, 2, 10, 4, 16  # CUDA runs head dims from 16
    zxbcdt, prm, mask, dims = make_inputs(2, 37, h, p, g, n, k, dtype, padded=padded, offsets=offsets, frozen=frozen)
    y0, g0, kept0 = run(unfused, zxbcdt, prm, mask, dims, h, p, g, chunk, seed=1)
    y1, g1, kept1 = run(fused_op, zxbcdt, prm, mask, dims, h, p, g, chunk, seed=1)
    assert torch.equal(y0, y1)
    assert g0.keys() == g1.keys()
    for name in g0:
        assert g1[name] is not None and torch.equal(g0[name], g1[name]), name
    if frozen:  # the conv input is kept instead of its output and the states: a win at d_state 128, not at 10
        return
    # neither the conv's output (x, B_t, C_t: D + 2GN values per token) nor the fp32 chunk states are kept
    b, seqlen = zxbcdt.shape[:2]
    states = b * (-(-seqlen // chunk) + 1) * h * p * n * 4
    assert kept0 - kept1 >= b * seqlen * (h * p + 2 * g * n) * zxbcdt.element_size() + states


def test_conv_ssd_scan_kept_states(monkeypatch):
    """With the chunk states kept rather than recomputed: the same gradients."""
    h, p, g, n, k, chunk = 6, 6 if DEVICE == "cpu" else 16, 2, 10, 4, 16
    zxbcdt, prm, mask, dims = make_inputs(2, 37, h, p, g, n, k, torch.float32, padded=True, offsets=True)
    _, g0, _ = run(fused_op, zxbcdt, prm, mask, dims, h, p, g, chunk, seed=2)
    monkeypatch.setattr(fused.ConvSSDScanFunction, "recompute_states", False)
    _, g1, _ = run(fused_op, zxbcdt, prm, mask, dims, h, p, g, chunk, seed=2)
    assert all(torch.equal(g0[name], g1[name]) for name in g0)


def test_conv_ssd_fused_dispatch():
    """The mixers take the fused op exactly when conv and scan both resolve to Triton."""
    assert ops.conv_ssd_fused("torch", torch.device("cpu"), 64) is None
    assert ops.conv_ssd_fused("ref", torch.device("cpu"), 64) is None
    assert ops.conv_ssd_fused("triton", torch.device(DEVICE), 64) is not None


def _hybrid_grads(family, monkeypatch, dtype, *, fused_path: bool, **overrides):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
    from _hybrid import ids, tiny_hybrid

    from ssmtune import StateOffsetConfig, get_peft_model
    from ssmtune.models.hybrid import hybrid_mixers, set_backend

    found = ops.conv_ssd_fused
    calls = []
    monkeypatch.setattr(ops, "conv_ssd_fused", lambda *a: calls.append(1) or (found(*a) if fused_path else None))
    # chunk 16: the Triton scan's smallest
    model = get_peft_model(tiny_hybrid(family, mamba_chunk_size=16, **overrides).to(DEVICE),
                           StateOffsetConfig(variant="h"))  # fmt: skip
    set_backend(model.base_model, "triton")
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # a non-zero offset
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.train()
    x = ids(2, 37).to(DEVICE)
    embeds = model.base_model.get_input_embeddings()(x).detach().requires_grad_()  # the gradient reaches every conv
    with torch.autocast(DEVICE, dtype=dtype, enabled=dtype != torch.float32):
        loss = model(inputs_embeds=embeds, labels=x, use_cache=False).loss
    loss.backward()
    assert len(calls) == len(hybrid_mixers(model.base_model))  # every mixer asked for the fused op
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads | {"embeds": embeds.grad}


FAMILY_CASES = {
    "falcon": ("falcon_h1", {}),  # no gated norm: y · silu(z)
    "falcon-norm-first": ("falcon_h1", {"mamba_rms_norm": True, "mamba_norm_before_gate": True}),
    "granite": ("granitemoehybrid", {}),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(FAMILY_CASES))
def test_hybrid_fused_training_path_unchanged(case, dtype, monkeypatch):
    """A hybrid's training step through the fused op: the loss and every gradient of the unfused path, bit for bit
    (under bf16 autocast too)."""
    family, overrides = FAMILY_CASES[case]
    loss1, g1 = _hybrid_grads(family, monkeypatch, dtype, fused_path=True, **overrides)
    loss0, g0 = _hybrid_grads(family, monkeypatch, dtype, fused_path=False, **overrides)
    assert torch.equal(loss0, loss1)
    assert g0.keys() == g1.keys() and len(g0) > 1
    for name in g0:
        assert torch.equal(g0[name], g1[name]), name
