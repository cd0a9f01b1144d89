"""The time-major sequential forward (``fused_seq.py``, inference) against the fp32 reference, and its dispatch.

Inputs come in the mixer's layouts (Δ, z, B, C as views of time-major tensors) and in contiguous [B, D, L]; the
conftest NaN-poisons every allocation made in ``ssmtune.ops``, so an output element the kernel does not write fails. On CPU the kernel runs under the
Triton interpreter; ``-m gpu`` runs published shapes with the default launch configuration.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are decorated
pytest.importorskip("triton")

from ssmtune.ops import selective_scan
from ssmtune.ops.selective_scan import fused, fused_seq
from ssmtune.ops.selective_scan.naive import selective_scan_ref
from ssmtune.ops.testing import assert_close

if not torch.cuda.is_available() and "Interpreted" not in type(fused_seq.selective_scan_fwd_seq_kernel.fn).__name__:
    fused_seq = importlib.reload(fused_seq)
    fused = importlib.reload(fused)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RATIO = {torch.float32: 5e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
FLAGS = ("D", "z", "delta_bias", "initial_state", "state_offset", "y_offset")


def make_inputs(b, d, seqlen, n, dtype, flags=FLAGS, per_batch=False, time_major=True, rank=7, softplus=True):
    """The mixer's layouts when ``time_major``: u [B, D, L] as the conv leaves it; Δ a [B, L, D] tensor, z the second
    half of in_proj's [B, L, 2D], B / C slices of x_proj's [B, L, R + 2N], all viewed as [B, ·, L]."""
    act = {"dtype": dtype, "device": DEVICE}
    lead = (b,) if per_batch else ()
    if time_major:
        delta = (0.5 * torch.randn(b, seqlen, d, device=DEVICE) - 1).to(dtype).transpose(1, 2)
        z = torch.randn(b, seqlen, 2 * d, **act)[..., d:].transpose(1, 2)
        x_dbl = torch.randn(b, seqlen, rank + 2 * n, **act)
        B, C = x_dbl[..., rank : rank + n].transpose(1, 2), x_dbl[..., rank + n :].transpose(1, 2)
    else:
        delta = (0.5 * torch.randn(b, d, seqlen, device=DEVICE) - 1).to(dtype)
        z = torch.randn(b, d, seqlen, **act)
        B, C = torch.randn(b, n, seqlen, **act), torch.randn(b, n, seqlen, **act)
    if not softplus:
        delta = delta.abs()  # used as given: must stay positive for a stable recurrence
    ins = {
        "u": torch.randn(b, d, seqlen, **act),
        "delta": delta,
        "A": -torch.rand(d, n, device=DEVICE) * 2 - 0.1,
        "B": B,
        "C": C,
        "D": torch.randn(d, device=DEVICE),
        "z": z,
        "delta_bias": 0.3 * torch.randn(d, device=DEVICE),
        "initial_state": torch.randn(*lead, d, n, device=DEVICE),
        "state_offset": torch.randn(*lead, d, n, device=DEVICE),
        "y_offset": torch.randn(*(() if per_batch else (b,)), d, device=DEVICE),
    }
    return {k: v for k, v in ins.items() if k in ("u", "delta", "A", "B", "C") or k in flags}


def check(ins, dtype, softplus=True):
    ref_ins = {k: v.float() for k, v in ins.items()}
    y_ref, h_ref = selective_scan_ref(**ref_ins, delta_softplus=softplus, return_final_state=True)
    with torch.no_grad():
        y, h = fused_seq.selective_scan_fwd_seq(
            **(dict.fromkeys(FLAGS) | ins), delta_softplus=softplus, output_final_state=True
        )  # fmt: skip
    assert y.dtype == ins["u"].dtype and h.dtype == torch.float32
    assert y.shape == y_ref.shape and h.shape == h_ref.shape
    assert_close("y", y_ref, y, RATIO[dtype])
    assert_close("h_last", h_ref, h, RATIO[torch.float32])
    return y, h


# (id, B, D, L, N, dtype, flags, per-row offsets, time-major, launch configuration)
CASES = [
    ("all-tm-fp32-pf2-onepass", 2, 5, 37, 3, torch.float32, FLAGS, False, True, {"BLOCK_D": 4, "K": 4, "CHUNK": 0}),
    ("all-tm-fp32-pf1-chunk8", 2, 5, 37, 16, torch.float32, FLAGS, True, True, {"BLOCK_D": 4, "K": 4, "CHUNK": 8, "PF": 1}),
    ("all-contig-fp32-chunk16", 1, 6, 33, 5, torch.float32, FLAGS, True, False, {"BLOCK_D": 4, "K": 8, "CHUNK": 16}),
    ("bare-tm-fp32-chunk4", 2, 3, 13, 2, torch.float32, (), False, True, {"BLOCK_D": 2, "K": 4, "CHUNK": 4}),
    ("all-tm-bf16-chunk8", 2, 5, 29, 16, torch.bfloat16, FLAGS, False, True, {"BLOCK_D": 4, "K": 4, "CHUNK": 8}),
    ("h0-z-tm-fp16", 2, 5, 21, 4, torch.float16, ("z", "initial_state"), True, True, {"BLOCK_D": 4, "K": 4}),
    ("L1-all-tm-fp32", 2, 5, 1, 3, torch.float32, FLAGS, False, True, {"BLOCK_D": 4, "K": 4, "CHUNK": 8}),
    ("offsets-only-default-cfg", 1, 5, 20, 4, torch.float32, ("state_offset", "y_offset"), True, True, {}),
]  # fmt: skip


@pytest.mark.parametrize(("b", "d", "seqlen", "n", "dtype", "flags", "per_batch", "time_major", "cfg"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])  # fmt: skip
def test_sequential_forward_matches_the_reference(
    monkeypatch, b, d, seqlen, n, dtype, flags, per_batch, time_major, cfg
):
    monkeypatch.setattr(fused_seq, "CONFIG_OVERRIDE", cfg)
    ins = make_inputs(b, d, seqlen, n, dtype, flags, per_batch, time_major)
    y, _ = check(ins, dtype)
    if time_major:  # y comes back laid out like Δ: the mixer's y.transpose(1, 2) is then free
        assert y.transpose(1, 2).is_contiguous()


def test_only_time_and_channel_offsets_decide_on_64_bits(monkeypatch):
    """B 8, L 2048, D 1536 in the mixer's layout: batch strides of millions, time and channel offsets far below 2^31."""
    seen = []
    monkeypatch.setattr(fused_seq, "selective_scan_fwd_seq_kernel", _Recorder(seen))
    b, d, seqlen, n = 8, 1536, 2048, 16
    delta = torch.empty(b, seqlen, d, device="meta").transpose(1, 2)
    x_dbl = torch.empty(b, seqlen, 48 + 2 * n, device="meta")
    args = (torch.empty(b, d, seqlen, device="meta"), delta, torch.empty(d, n, device="meta"),
            x_dbl[..., 48 : 48 + n].transpose(1, 2), x_dbl[..., 48 + n :].transpose(1, 2))  # fmt: skip

    def idx64() -> set[bool]:
        seen.clear()
        fused_seq.selective_scan_fwd_seq(*args, None, None, None, True, None, None, None, False)
        return {kw["IDX64"] for kw in seen}

    assert idx64() == {False}
    monkeypatch.setattr(fused_seq, "IDX32_LIMIT", seqlen * d)  # the time offsets t * D of Δ now reach the limit
    assert idx64() == {True}


class _Recorder:
    """Stands in for the kernel: ``kernel[grid](*args, **kw)`` records the keyword arguments."""

    def __init__(self, seen):
        self.seen = seen

    def __getitem__(self, grid):
        return lambda *a, **kw: self.seen.append(kw)


def test_64_bit_time_offsets(monkeypatch):
    """The branch for sequences whose time offsets overflow 32 bits, forced on a small case."""
    monkeypatch.setattr(fused_seq, "IDX32_LIMIT", 0)
    monkeypatch.setattr(fused_seq, "CONFIG_OVERRIDE", {"BLOCK_D": 4, "K": 4, "CHUNK": 8})
    check(make_inputs(2, 5, 19, 3, torch.float32), torch.float32)


def test_no_softplus_and_no_bias():
    ins = make_inputs(2, 5, 19, 3, torch.float32, ("D", "z"), softplus=False)
    check(ins, torch.float32, softplus=False)


def test_dispatch_inference_to_the_sequential_kernel_and_training_to_the_nloop(monkeypatch):
    monkeypatch.setattr(fused, "SEQUENTIAL_FORWARD", True)
    calls = []
    seq, nloop = fused_seq.selective_scan_fwd_seq, fused.selective_scan_fwd
    monkeypatch.setattr(fused_seq, "selective_scan_fwd_seq", lambda *a, **k: calls.append("seq") or seq(*a, **k))
    monkeypatch.setattr(fused, "selective_scan_fwd", lambda *a, **k: calls.append("nloop") or nloop(*a, **k))
    ins = make_inputs(1, 4, 9, 3, torch.float32)
    with torch.no_grad():
        fused.selective_scan_triton(**ins, delta_softplus=True)
    fused.selective_scan_triton(**ins, delta_softplus=True)  # no input requires grad: inference as well
    assert calls == ["seq", "seq"]
    calls.clear()
    leaves = {k: v.detach().clone().requires_grad_(k == "u") for k, v in ins.items()}
    fused.selective_scan_triton(**leaves, delta_softplus=True)
    assert calls == ["nloop"]
    calls.clear()
    big = make_inputs(1, 4, 9, 17, torch.float32)  # N > 16 does not fit one thread's registers
    contig = make_inputs(1, 4, 9, 3, torch.float32, time_major=False)  # the n-loop reads these without copies
    with torch.no_grad():
        fused.selective_scan_triton(**big, delta_softplus=True)
        fused.selective_scan_triton(**contig, delta_softplus=True)
    monkeypatch.setattr(fused, "SEQUENTIAL_FORWARD", False)
    with torch.no_grad():
        fused.selective_scan_triton(**ins, delta_softplus=True)
    assert calls == ["nloop", "nloop", "nloop"]


def test_sequential_forward_is_opt_in(monkeypatch):
    monkeypatch.delenv("SSMTUNE_SEQUENTIAL_SCAN", raising=False)
    assert fused._env_flag("SSMTUNE_SEQUENTIAL_SCAN") is False
    monkeypatch.setenv("SSMTUNE_SEQUENTIAL_SCAN", "1")
    assert fused._env_flag("SSMTUNE_SEQUENTIAL_SCAN") is True
    monkeypatch.setenv("SSMTUNE_SEQUENTIAL_SCAN", "yes")
    with pytest.raises(ValueError, match="SSMTUNE_SEQUENTIAL_SCAN must be 0 or 1, got 'yes'"):
        fused._env_flag("SSMTUNE_SEQUENTIAL_SCAN")


def test_mamba_model_logits_are_the_same_with_either_forward(monkeypatch):
    """A Mamba-1 model with State-offset (h) under no_grad: the mixer's own views through both inference paths."""
    from ssmtune import StateOffsetConfig, get_peft_model
    from ssmtune.models import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(d_model=16, n_layer=2, vocab_size=64)).to(DEVICE)
    model.backend = "triton"
    model = get_peft_model(model, StateOffsetConfig(variant="h"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.3)  # a trained-looking h', not zeros
    ids = torch.randint(0, 64, (2, 21), device=DEVICE)
    calls = []
    seq = fused_seq.selective_scan_fwd_seq
    monkeypatch.setattr(fused_seq, "selective_scan_fwd_seq", lambda *a, **k: calls.append(1) or seq(*a, **k))
    logits = {}
    for on in (False, True):
        monkeypatch.setattr(fused, "SEQUENTIAL_FORWARD", on)
        with torch.no_grad():
            logits[on] = model(ids).logits
    assert len(calls) == 2  # one scan per layer, only with the flag on
    assert_close("logits", logits[False], logits[True], RATIO[torch.float32])


def test_public_op_in_the_mixer_layout_matches_the_reference(monkeypatch):
    ins = make_inputs(2, 6, 23, 16, torch.float32)
    ref = selective_scan_ref(**ins, delta_softplus=True)
    monkeypatch.setattr(fused, "SEQUENTIAL_FORWARD", True)
    with torch.no_grad():
        out = selective_scan(**ins, delta_softplus=True, backend="triton")
    assert_close("y", ref, out, RATIO[torch.float32])


def test_default_configuration_chunks_only_when_programs_are_few(monkeypatch):
    monkeypatch.setattr(fused_seq, "CONFIG_OVERRIDE", {})
    cpu = torch.device("cpu")  # counts as 132 SMs
    assert fused_seq._config(8, 1536, 2048, cpu)["CHUNK"] == 128  # 384 programs: 16 chunks give ~47 per SM
    assert fused_seq._config(1, 1536, 2048, cpu)["CHUNK"] == 64  # 48 programs: 32 chunks (no shorter ones)
    assert fused_seq._config(8, 4096, 2048, cpu)["CHUNK"] == 0  # 1024 programs: one pass
    assert fused_seq._config(1, 1536, 64, cpu)["CHUNK"] == 0  # not longer than one chunk


@pytest.mark.parametrize(
    ("cfg", "match"),
    [({"BLOCK_L": 4}, r"unknown key\(s\) \['BLOCK_L'\]"), ({"K": 8, "CHUNK": 12}, "CHUNK 12 must be a non-negative multiple of K 8"),
     ({"PF": 3}, "PF must be 1 or 2, got 3")],
)  # fmt: skip
def test_bad_configuration_is_rejected(monkeypatch, cfg, match):
    monkeypatch.setattr(fused_seq, "CONFIG_OVERRIDE", cfg)
    with pytest.raises(ValueError, match=match):
        fused_seq._config(2, 8, 64, torch.device("cpu"))


def test_state_size_over_the_register_limit_is_rejected():
    ins = make_inputs(1, 2, 5, 17, torch.float32, ())
    with pytest.raises(ValueError, match="state size N must be <= 16, got 17"):
        fused_seq.selective_scan_fwd_seq(**ins, D=None, z=None, delta_bias=None, delta_softplus=True,
                                         initial_state=None, state_offset=None, y_offset=None,
                                         output_final_state=False)  # fmt: skip


GPU_CASES = [
    ("B8-D1536-L2064-all-bf16", 8, 1536, 2064, 16, torch.bfloat16, FLAGS, False),
    ("B2-D4096-L1000-all-rowwise-fp16", 2, 4096, 1000, 16, torch.float16, FLAGS, True),
    ("B8-D4096-L2048-all-fp32", 8, 4096, 2048, 16, torch.float32, FLAGS, False),
    ("B1-D1536-L4099-h0-bf16", 1, 1536, 4099, 16, torch.bfloat16, ("D", "z", "delta_bias", "initial_state"), False),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("b", "d", "seqlen", "n", "dtype", "flags", "per_batch"), [c[1:] for c in GPU_CASES],
                         ids=[c[0] for c in GPU_CASES])  # fmt: skip
def test_sequential_forward_gpu(monkeypatch, b, d, seqlen, n, dtype, flags, per_batch):
    monkeypatch.setattr(fused_seq, "CONFIG_OVERRIDE", {})  # the default configuration, chunked or not
    check(make_inputs(b, d, seqlen, n, dtype, flags, per_batch), dtype)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke run is the CPU form of the GPU benchmark")
def test_inference_benchmark_smoke_run(tmp_path):
    """benchmarks/bench_scan_inference.py --smoke: every row measured, each output checked against the n-loop's."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "b.json"
    subprocess.run(
        [sys.executable, str(root / "benchmarks/bench_scan_inference.py"), "--smoke", "--parts", "kernels", "--out", str(out)],
        check=True, cwd=root, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, timeout=600,
    )  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert {r["flags"] for r in rows} == {"peer", "all", "h'", "h0"}
    assert all("error" not in r and r["rel_err_vs_nloop"] < 1e-2 for r in rows)
