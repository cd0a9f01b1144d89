"""A whole model through the fused kernels (conv, norms, scans) against the same model on the torch backend.

Forward logits and the gradients of the trainable State-offset (h) parameters, for Mamba-1 and Mamba-2. On CPU the
kernels run under the Triton interpreter on a tiny model; ``-m gpu`` runs a wider one on CUDA in bf16.
"""

from __future__ import annotations

import pytest
import torch
from _triton_interp import interpret_on_cpu, interpreted

interpret_on_cpu()

from ssmtune import StateOffsetConfig, get_peft_model
from ssmtune.models import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM
from ssmtune.ops.testing import assert_close, rel_err


def _interpreted() -> bool:
    from ssmtune.ops import conv_fused, norm_fused

    return interpreted(conv_fused.causal_conv1d_fwd_kernel) and interpreted(norm_fused.rms_norm_fwd_kernel)


def build(kind: str, d_model: int, device: str, headdim: int = 16):
    torch.manual_seed(0)
    if kind == "mamba":
        cfg = MambaConfig(d_model=d_model, n_layer=2, vocab_size=64, d_state=8)
        klass = MambaForCausalLM
    else:
        cfg = Mamba2Config(d_model=d_model, n_layer=2, vocab_size=64, headdim=headdim, d_state=16, ngroups=2)
        klass = Mamba2ForCausalLM
    with torch.device(device):
        model = get_peft_model(klass(cfg), StateOffsetConfig(variant="h"))
    for p in model.parameters():
        if p.requires_grad:  # a non-zero offset, so that its gradient path is exercised
            torch.nn.init.normal_(p, std=0.1)
    return model


def logits_and_grads(model, ids, backend: str, dtype: torch.dtype):
    model.backend = backend
    model.zero_grad(set_to_none=True)
    with torch.autocast(ids.device.type, dtype=dtype, enabled=dtype != torch.float32):
        out = model(ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach().float(), grads


def check(kind: str, d_model: int, seqlen: int, device: str, dtype: torch.dtype, ratio: float, headdim: int = 16):
    model = build(kind, d_model, device, headdim)
    ids = torch.randint(0, 64, (2, seqlen), device=device)
    ref_logits, ref_grads = logits_and_grads(model, ids, "torch", dtype)
    logits, grads = logits_and_grads(model, ids, "triton", dtype)
    assert_close("logits", ref_logits, logits, ratio)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        assert_close(name, ref_grads[name], grads[name], ratio * 5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU interpreter case")
@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_model_through_fused_kernels_matches_torch_backend_cpu(kind):
    if not _interpreted():
        pytest.skip("the kernels were imported before TRITON_INTERPRET was set (run this file alone)")
    check(kind, 16, 9, "cpu", torch.float32, 1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_model_through_fused_kernels_matches_torch_backend_gpu(kind, monkeypatch):
    # headdim 32 (16 has its own test below). Its fp32 dots would run in
    # TF32 (4e-4 relative on the logits, 6e-2 on layer 0's dh', 2026-12-02): IEEE fp32 here, so the check is tight
    monkeypatch.setenv("TRITON_F32_DEFAULT", "ieee")
    check(kind, 256, 300, "cuda", torch.float32, 1e-4, headdim=32)
    monkeypatch.delenv("TRITON_F32_DEFAULT")
    # bf16: both paths round differently, so each is compared with the fp32 model; the fused path may not be
    # much worse than the torch one (small gradients, such as layer 0's dh', differ by ~10% between the two)
    model = build(kind, 256, "cuda", headdim=32)
    ids = torch.randint(0, 64, (2, 300), device="cuda")
    ref = logits_and_grads(model, ids, "torch", torch.float32)
    low = {be: logits_and_grads(model, ids, be, torch.bfloat16) for be in ("torch", "triton")}
    pairs = [("logits", ref[0], low["torch"][0], low["triton"][0])]
    pairs += [(n, ref[1][n], low["torch"][1][n], low["triton"][1][n]) for n in ref[1]]
    for name, r, t, f in pairs:
        e_torch, e_fused = rel_err(r, t), rel_err(r, f)
        # Mamba-2's first-layer dh' came out 1.0e-1 off through the Triton SSD's bf16 backward against 9.4e-3 through
        # the torch one, with this file's conv and norm kernels on or off (H200, 2026-12-02):
        # an open precision issue of the SSD kernels, bounded here so that a worse one still fails
        slack = 0.15 if kind == "mamba2" and name != "logits" else 2e-3
        assert e_fused <= 2 * e_torch + slack, f"{name}: fused bf16 error {e_fused:.3e} vs torch bf16 {e_torch:.3e}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mamba2_head_dim_16_on_the_gpu(monkeypatch):
    """Head dim 16 (N 16, G 2, L 300): the dx / dC kernels gave wrong gradients there on 8 warps (H200)."""
    monkeypatch.setenv("TRITON_F32_DEFAULT", "ieee")
    check("mamba2", 256, 300, "cuda", torch.float32, 1e-4, headdim=16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_small_ssd_headdim_is_refused_on_cuda_and_auto_falls_back():
    from ssmtune import ops

    b, seqlen, h, p, n = 1, 64, 2, 8, 16
    x = torch.randn(b, seqlen, h, p, device="cuda", requires_grad=True)
    dt, A = torch.rand(b, seqlen, h, device="cuda"), -torch.rand(h, device="cuda")
    Bm, Cm = torch.randn(b, seqlen, 1, n, device="cuda"), torch.randn(b, seqlen, 1, n, device="cuda")
    with pytest.raises(ValueError, match="headdim 8 < 16"):
        ops.ssd_scan(x, dt, A, Bm, Cm, backend="triton")
    ops._warned.discard(("ssd_scan", "headdim"))  # said once per process
    with pytest.warns(UserWarning, match="runs the torch backend"):
        y = ops.ssd_scan(x, dt, A, Bm, Cm, backend="auto")
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
