"""The kernels of one decode step, per layer, on the path CUDA takes (the Triton backend; here under the interpreter).

Inside a captured CUDA graph the host is gone and a decode step of a small model costs what its kernels cost: a few
microseconds each even when tiny. These tests count the step's ops that are kernels on CUDA (aten ops other than
views and allocations, and Triton launches) for one layer of a bf16 Mamba-1 and Mamba-2 with a State-offset (h)
adapter, so that a change that adds a kernel to the step fails here; and check the Triton step against the torch one.
"""

from __future__ import annotations

import collections
import contextlib
import os
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are decorated
pytest.importorskip("triton")
from triton.runtime.interpreter import InterpretedFunction

from ssmtune import StateOffsetConfig, get_peft_model
from ssmtune.models.cache import InferenceCache
from ssmtune.models.decode import GraphedDecoder

sys.path.insert(0, str(Path(__file__).parents[1] / "methods"))
from _peft_cases import VOCAB, perturb, tiny_model

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="counts Triton launches of the CPU interpreter")

# aten ops that launch nothing: allocations, and metadata ops that the view check (OpOverload.is_view) misses
NO_KERNEL = {"empty", "empty_like", "empty_strided", "_unsafe_view", "promote_types", "lift_fresh", "detach", "alias"}

# One layer's step (bf16, the residual stream in fp32):
#   rms_norm            the pre-norm (Triton), the fp32 residual stream cast to bf16 in its load; from the second
#                       layer on it also adds the previous layer's output to the stream (ops.add_rms_norm)
#   mm                  in_proj
#   causal_conv1d_update  conv window roll + depthwise conv + bias + SiLU (Triton)
#   [Mamba-1: mm x_proj; addmm dt_proj, its bias inside the GEMM, on the strided dt slice]
#   state update        A = -exp(A_log), dt softplus, dA, dBx, state, C·(h + h'), D skip, [Mamba-1: z gate] (Triton);
#                       B_t, C_t, z, x and dt are read in place from their projections (no copies), A_log and D in
#                       their own dtype
#   [Mamba-2: rms_norm  the gated group norm (Triton)]
#   mm                  out_proj
# (no add: the residual add is in the next layer's norm, the last layer's in the final norm)
EXPECTED = {
    "m1": {
        "rms_norm_fwd_kernel": 1, "mm": 3, "causal_conv1d_update_kernel": 1, "addmm": 1,
        "selective_state_update_fwd_kernel": 1,
    },
    "m2": {
        "rms_norm_fwd_kernel": 2, "mm": 2, "causal_conv1d_update_kernel": 1,
        "ssd_state_update_fwd_kernel": 1,
    },
}  # fmt: skip
# Outside the layers: the embedding, its cast to the fp32 residual stream (in the first block), the final norm (with
# the last layer's residual add), the cast of its output to bf16 and the LM head
OUTSIDE = {"embedding": 1, "_to_copy": 2, "rms_norm_fwd_kernel": 1, "mm": 1}


class KernelCount(TorchDispatchMode):
    """Counts aten ops that are kernels on CUDA, and (through ``launch``) Triton launches, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()
        self.active = False
        self.in_kernel = 0  # the interpreter runs a kernel's body as torch/numpy ops: not counted

    def __enter__(self):
        self.active = True
        return super().__enter__()

    def __exit__(self, *exc):
        self.active = False
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.in_kernel and not func.is_view and func._opname not in NO_KERNEL:
            self.counts[func._opname] += 1
        return func(*args, **(kwargs or {}))


def _interpreted() -> bool:
    from ssmtune.ops import conv_fused, norm_fused
    from ssmtune.ops.selective_scan import fused as ss_fused
    from ssmtune.ops.ssd import fused as ssd_fused

    kernels = (conv_fused.causal_conv1d_update_kernel, norm_fused.rms_norm_fwd_kernel,
               ss_fused.selective_state_update_fwd_kernel, ssd_fused.ssd_state_update_fwd_kernel)  # fmt: skip
    return all("Interpreted" in type(k.fn).__name__ for k in kernels)


@pytest.fixture
def interpreted() -> None:
    if not _interpreted():
        pytest.skip("the kernels were imported before TRITON_INTERPRET was set (run this file alone)")


def _model(arch: str, n_layer: int, backend: str):
    # chunk_size 16: the Triton SSD scan (the prefill) takes powers of two >= 16
    extra = {"chunk_size": 16} if arch == "m2" else {}
    peft = get_peft_model(tiny_model(arch, n_layer=n_layer, **extra), StateOffsetConfig())
    perturb(peft)
    peft = peft.to(torch.bfloat16)
    peft.backend = backend
    return peft


def _step(
    peft, monkeypatch, count: bool, names: list | None = None, state_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, collections.Counter]:
    """Prefill 2 rows (or one per adapter name, routed), then one step of the decoder (run eagerly: the step a CUDA
    graph captures), its SSM states in ``state_dtype`` (None: fp32)."""
    lm = peft.base_model
    for name in ("empty", "empty_like"):  # tests/conftest.py's NaN poisoning adds a fill per allocation: not a kernel
        monkeypatch.setattr(torch, name, getattr(getattr(torch, name), "__wrapped__", getattr(torch, name)))
    batch = 2 if names is None else len(names)
    ids = torch.randint(0, VOCAB, (batch, 5), generator=torch.Generator().manual_seed(0))
    # not inference_mode: under it the dispatch mode sees composite ops undecomposed
    with torch.no_grad(), contextlib.ExitStack() as stack:
        routing = None if names is None else stack.enter_context(peft.route(names))
        cache = InferenceCache(len(lm.backbone.layers), state_dtype)
        peft(ids, cache=cache)
        decoder = GraphedDecoder(lm, batch, torch.device("cpu"), torch.bfloat16, False, cache.state_dtype)
        decoder.start(cache, routing)
        decoder.ids.copy_(ids[:, -1])
        mode = KernelCount()
        run = InterpretedFunction.run

        def launch(self, *args, **kwargs):
            if mode.active:
                mode.counts[self.fn.__name__] += 1
            mode.in_kernel += 1
            try:
                return run(self, *args, **kwargs)
            finally:
                mode.in_kernel -= 1

        monkeypatch.setattr(InterpretedFunction, "run", launch)
        if count:
            with mode:
                logits = decoder._forward()
        else:
            logits = decoder._forward()
    return logits.float(), mode.counts


@pytest.mark.parametrize("arch", ["m1", "m2"])
def test_decode_step_kernels_per_layer(arch, monkeypatch, interpreted) -> None:
    one = _step(_model(arch, 1, "triton"), monkeypatch, count=True)[1]
    two = _step(_model(arch, 2, "triton"), monkeypatch, count=True)[1]
    per_layer = {k: two[k] - one[k] for k in two if two[k] != one[k]}
    assert per_layer == EXPECTED[arch], f"kernels per layer: {per_layer} (total {sum(per_layer.values())})"
    # the whole step, so that the final norm's fused add is pinned too
    for n_layer, counts in ((1, one), (2, two)):
        want = collections.Counter(OUTSIDE)
        for _ in range(n_layer):
            want.update(EXPECTED[arch])
        assert counts == want, f"{n_layer}-layer step: {dict(counts)} (total {counts.total()})"


@pytest.mark.parametrize("arch", ["m1", "m2"])
def test_triton_decode_step_matches_torch(arch, monkeypatch, interpreted) -> None:
    ref = _step(_model(arch, 2, "torch"), monkeypatch, count=False)[0]
    got = _step(_model(arch, 2, "triton"), monkeypatch, count=False)[0]
    # bf16: the Triton kernels accumulate in fp32 where the torch conv update rounds each product to bf16
    torch.testing.assert_close(got, ref, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("arch", ["m1", "m2"])
def test_bf16_state_step_matches_torch_with_the_same_kernels(arch, monkeypatch, interpreted) -> None:
    """bf16 states: the Triton step loads and stores them in bf16 itself (no cast kernels), == the torch step."""
    bf16 = {"state_dtype": torch.bfloat16}
    ref = _step(_model(arch, 2, "torch"), monkeypatch, count=False, **bf16)[0]
    got, two = _step(_model(arch, 2, "triton"), monkeypatch, count=True, **bf16)
    one = _step(_model(arch, 1, "triton"), monkeypatch, count=True, **bf16)[1]
    assert {k: two[k] - one[k] for k in two if two[k] != one[k]} == EXPECTED[arch]
    assert not got.isnan().any()
    torch.testing.assert_close(got, ref, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("arch", ["m1", "m2"])
def test_routed_step_reads_offsets_through_the_index(arch, monkeypatch, interpreted) -> None:
    """Rows sharing adapters: the step's kernel reads h' / y' through offset_index (no extra kernel), == torch."""
    names = ["default", "y", None, "default", "y", "default"]

    def model(n_layer, backend):
        peft = _model(arch, n_layer, backend)
        peft.add_adapter("y", StateOffsetConfig(variant="y"))
        perturb(peft)
        return peft.to(torch.bfloat16)

    ref = _step(model(2, "torch"), monkeypatch, count=False, names=names)[0]
    got, two = _step(model(2, "triton"), monkeypatch, count=True, names=names)
    one = _step(model(1, "triton"), monkeypatch, count=True, names=names)[1]
    assert {k: two[k] - one[k] for k in two if two[k] != one[k]} == EXPECTED[arch]
    torch.testing.assert_close(got, ref, atol=0.05, rtol=0.05)


def _fast_scans(peft):
    """The mixers on the torch backend, the norms on Triton: the fused add is the norms' business, and the
    interpreter's Mamba-1 scan takes seconds per prefill."""
    for _, mixer in peft.base_model.mixers():
        mixer.backend = "torch"
    return peft


@pytest.mark.parametrize("arch", ["m1", "m2"])
def test_fused_residual_add_gives_the_bits_of_the_unfused_chain(arch, monkeypatch, interpreted) -> None:
    """No gradient on the Triton backend: each block's residual add happens in the next norm's kernel (finally
    norm_f's). A forward, a packed forward, greedy generate (eager and through the decoder) and a decode step give the
    bits of the unfused chain."""
    peft = _fast_scans(_model(arch, 2, "triton"))
    backbone = peft.base_model.backbone
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 6), generator=gen)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)

    def run() -> list[torch.Tensor]:
        with torch.no_grad():
            out = [peft(ids).logits, peft(ids.reshape(1, 12), cu_seqlens=cu).logits]
            out += [peft.generate(ids, max_new_tokens=4, cuda_graph=graphed) for graphed in (False, True)]
        return [*out, _step(peft, monkeypatch, count=False)[0]]

    with torch.no_grad():
        assert backbone.fuses_add(peft.base_model.backbone.embeddings(ids))
    fused = run()
    monkeypatch.setattr(type(backbone), "fuses_add", lambda self, h: False)
    unfused = run()
    for name, got, want in zip(["forward", "packed", "generate", "generate graphed", "step"], fused, unfused):
        assert torch.equal(got, want), name


def test_fused_residual_add_only_without_gradient_or_hooks(interpreted, monkeypatch) -> None:
    """The chain hands the add on only where nothing needs the unadded block outputs: the Triton backend, no forward
    hooks on a block or a norm (they see the block's usual input and output). With a gradient to take, the op keeps
    the add a torch op (the kernel has no backward): the unfused chain's logits and gradients."""
    peft = _fast_scans(_model("m1", 2, "triton"))
    backbone = peft.base_model.backbone
    ids = torch.randint(0, VOCAB, (2, 4), generator=torch.Generator().manual_seed(2))
    h = backbone.embeddings(ids)
    with torch.no_grad():
        assert backbone.fuses_add(h)
        ref = peft(ids).logits
    trainable = [p for p in peft.parameters() if p.requires_grad]
    assert trainable and backbone.fuses_add(h)  # the adapter's offsets are trainable: the op takes the torch add

    def grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        peft.zero_grad()
        logits = peft(ids).logits
        logits.square().mean().backward()
        return logits.detach(), [p.grad.clone() for p in trainable]

    handed_on = grads()
    with monkeypatch.context() as m:
        m.setattr(type(backbone), "fuses_add", lambda self, h: False)
        unfused = grads()
    assert torch.equal(handed_on[0], unfused[0])
    assert all(g.abs().max() > 0 for g in handed_on[1])
    assert all(torch.equal(a, b) for a, b in zip(handed_on[1], unfused[1]))
    seen = []
    for module in (backbone.layers[1], backbone.layers[0].norm, backbone.norm_f):
        handle = module.register_forward_hook(lambda m, args, out: seen.append(out))
        with torch.no_grad():
            assert not backbone.fuses_add(h)
            assert torch.equal(peft(ids).logits, ref)
        handle.remove()
        assert seen and all(isinstance(t, torch.Tensor) for t in seen)
        seen.clear()
    peft.backend = "torch"
    with torch.no_grad():
        assert not backbone.fuses_add(h)
