"""The decode step's Triton kernels compile for Hopper (sm_90) on a machine without a GPU.

The CPU tests run the kernels under Triton's interpreter, which accepts some code the compiler refuses (a
dtype-valued constexpr, say). Here Triton's whole CUDA pipeline (TTIR, TTGIR, LLVM, PTX and ptxas to a cubin) runs on
each kernel of a decode step with the launch settings CUDA uses, so such an error fails on the CPU too. Newer Tritons
accept more than older ones (3.9 takes a ``tl.static_range`` bound computed with ``tl.cdiv``; 3.6 refuses it), so the
module also runs again in a child process with the GPU machines' Triton, 3.6 (torch 2.11's), which ``make test``
installs beside the other one.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import os
import subprocess
import sys

import pytest
import torch
from _triton_interp import interpret_on_cpu

# the modules themselves stay interpreted for the test files after this one (only the copies below compile)
triton = interpret_on_cpu()
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:  # pragma: no cover - an older Triton
    pytest.skip("this Triton has no ASTSource / GPUTarget", allow_module_level=True)

from ssmtune.ops import conv_fused, launch, norm_fused
from ssmtune.ops.gated_delta import offsets_triton
from ssmtune.ops.selective_scan import fused as s6_fused
from ssmtune.ops.ssd import fused as ssd_fused

HOPPER = GPUTarget("cuda", 90, 32)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GPU_TRITON = os.path.join(ROOT, ".venv", "triton-3.6")  # Makefile: pip install --target .venv/triton-3.6 triton==3.6.0
CHILD = "SSMTUNE_SM90_CHILD"  # set in the child run


def _compiled_copy(module):
    """A private copy of a kernel module whose ``@triton.jit`` functions are compilable: other test modules set
    TRITON_INTERPRET=1 before the kernels are decorated, which makes them (and the helpers they call) interpreted."""
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        # a sibling name in the module's package, so that its relative imports resolve
        name = f"{module.__package__}._sm90_{module.__name__.rsplit('.', 1)[-1]}"
        spec = importlib.util.spec_from_file_location(name, module.__file__)
        copy = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(copy)
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    return copy


conv_fused, norm_fused, s6_fused, ssd_fused, offsets_triton = map(
    _compiled_copy, (conv_fused, norm_fused, s6_fused, ssd_fused, offsets_triton)
)


def _jit(kernel):
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn  # past @triton.heuristics (its flags are passed as constexprs here)
    return kernel


def _interpreted(value) -> object | None:
    """What the interpreter put in place of a Triton language member: its compilable original, else None."""
    if isinstance(value, getattr(triton.runtime.interpreter, "InterpretedFunction", ())):
        return triton.runtime.jit.JITFunction(value.fn, **value.kwargs)  # a helper of Triton's own (tl.sum, ...)
    defaults = getattr(value, "__kwdefaults__", None) or {}
    if getattr(value, "__module__", None) == "triton.runtime.interpreter" and "member" in defaults:
        return defaults["member"]  # a builtin the interpreter patched and, at times, left patched
    return None


@contextlib.contextmanager
def _compiled_language():
    """Triton's language compilable for the duration. With TRITON_INTERPRET=1 set before Triton was imported, its own
    ``@jit`` helpers (tl.sum, tl.max, their combine functions) are interpreted; and after other test files ran kernels
    under the interpreter, some builtins (tl.program_id, tensor.to) stay patched. The compiler would run either under
    the interpreter's builder and fail (before, only a warm Triton cache from an earlier compile hid this)."""
    owners = [m for name, m in list(sys.modules.items()) if m is not None and name.startswith("triton.language")]
    owners += [triton.language.core.tensor]
    saved = []
    for owner in owners:
        for attr, value in list(vars(owner).items()):
            original = _interpreted(value)
            if original is not None:
                saved.append((owner, attr, value))
                setattr(owner, attr, original)
    try:
        yield
    finally:
        for owner, attr, value in saved:
            setattr(owner, attr, value)


def _compile(kernel, pointers: dict[str, str], constexprs: dict, warps: int) -> None:
    """Compile ``kernel`` for sm_90: ``pointers`` name -> element type; the other arguments not in ``constexprs``
    are integers (strides, sizes) or, for ``eps`` and ``scale``, floats."""
    fn = _jit(kernel)
    names = list(inspect.signature(fn.fn).parameters)
    sig = {n: "constexpr" if n in constexprs else ("*" + pointers[n] if n in pointers else "fp32" if n in ("eps", "scale") else "i64")
           for n in names}  # fmt: skip
    src = ASTSource(
        fn=fn, signature=sig, constexprs={(i,): constexprs[n] for i, n in enumerate(names) if n in constexprs}
    )
    try:
        with _compiled_language():
            compiled = triton.compile(src, target=HOPPER, options={"num_warps": warps})
    except RuntimeError as e:
        if "ptxas" in str(e) and ("not found" in str(e) or "No such file" in str(e)):
            pytest.skip(f"no ptxas in this Triton: {e}")
        raise
    assert compiled.asm["cubin"], f"{fn.fn.__name__}: no cubin"


def _flags(kernel, value=True) -> dict:
    return {n: value for n in inspect.signature(_jit(kernel).fn).parameters if n.startswith(("HAS_", "USE_"))}


# (kernel, its activation pointers, rows and N of a 130m layer's step, its shape constexprs with the tile's name)
STATE_UPDATES = {
    "mamba1": (lambda: s6_fused.selective_state_update_fwd_kernel, ("x", "dt", "B", "C", "z", "y"), 1536, 16,
               {"DIM": 1536, "N": 16, "DT_SOFTPLUS": True, "BLOCK_N": 16}, "BLOCK_D"),
    "mamba2": (lambda: ssd_fused.ssd_state_update_fwd_kernel, ("x", "dt", "Bm", "Cm", "z", "y"), 64, 128,
               {"H": 24, "G": 1, "P": 64, "N": 128, "BN": 128, "SOFTPLUS": True, "D_HAS_HDIM": False}, "BP"),
}  # fmt: skip


@pytest.mark.parametrize("state", ["fp32", "bf16"])
@pytest.mark.parametrize("arch", list(STATE_UPDATES))
def test_state_update_compiles(arch, state):
    kernel, activations, rows, n, shape, tile_name = STATE_UPDATES[arch]
    kernel = kernel()
    tile, warps = launch.decode_tile(rows, n, torch.device("cuda"))
    pointers = dict.fromkeys(activations, "bf16")
    pointers.update(state=state, A="fp32", D="fp32", dt_bias="fp32", h_off="fp32", y_off="fp32", off_idx="i32")
    _compile(kernel, pointers, {**_flags(kernel), **shape, tile_name: tile, "A_IS_LOG": True}, warps)


def test_conv_update_compiles():
    pointers = {n: "bf16" for n in ("x", "state", "w", "bias", "y")}
    block_c, warps = launch.conv_update_block(1536, torch.device("cuda"))
    const = {"K": 4, "BLOCK_K": 4, "SILU": True, "BLOCK_C": block_c, "HAS_BIAS": True}
    _compile(conv_fused.causal_conv1d_update_kernel, pointers, const, warps)


@pytest.mark.parametrize(("res", "in_kind"), [(True, 1), (False, 1), (False, 0)], ids=["fused-add", "cast", "plain"])
def test_norm_compiles(res, in_kind):
    # the block's pre-norm on the fp32 residual stream (cast to bf16 in the load), with and without the fused add
    pointers = {"x": "fp32", "y": "bf16", "w": "fp32", "out": "bf16", "res": "fp32", "rstd": "fp32"}
    const = {"z": None, "GS": 768, "NG": 1, "BLOCK_R": 4, "BLOCK_N": 1024, "HAS_Z": False, "HAS_RES": res,
             "IN_KIND": in_kind}  # fmt: skip
    if not res:
        const.update(y=None, res=None)
    _compile(norm_fused.rms_norm_fwd_kernel, pointers, const, 4)


@pytest.mark.parametrize("resets", [True, False], ids=["resets", "plain"])
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_ssd_chunk_state_compiles(direction, resets):
    # the SSD state-passing loops with packed-row resets (a scalar flag per chunk selecting h0) and without, at the
    # 64-step chunks resets take
    shape = {"H": 24, "G": 1, "P": 64, "N": 128, "TP": 2048, "NC": 32, "CHUNK": 64, "BK": 64, "BP": 64, "BN": 64}
    if direction == "fwd":
        kernel = ssd_fused.ssd_chunk_state_fwd_kernel
        pointers = {"x": "bf16", "Bm": "bf16", "dt_p": "fp32", "a_cs": "fp32", "h0": "fp32", "states": "fp32"}
    else:
        kernel = ssd_fused.ssd_chunk_state_bwd_kernel
        pointers = {n: "fp32" for n in ("a_cs", "states", "dht", "dstates", "dh0", "dh_off", "dlast")}
        pointers.update(dy="bf16", Cm="bf16")
    pointers["resets"] = "i8"
    const = {**_flags(kernel), **shape, "HAS_RESETS": resets}
    if not resets:
        const["resets"] = None
    _compile(kernel, pointers, const, 4)


@pytest.mark.parametrize("kernel", ["fwd", "dq", "ds"])
def test_gated_delta_readout_compiles(kernel):
    # Gated DeltaNet's read-out offsets at a Qwen3.5 layer's heads (16 x 128 / 128), bf16 activations, q l2-normalised
    bk, bv = offsets_triton._blocks(128, 128)
    const = {"REP": 1, "K": 128, "V": 128, "BL": offsets_triton.BL, "BK": bk, "BV": bv, "L2NORM": True}
    if kernel == "fwd":
        fn = offsets_triton._readout_fwd_kernel
        pointers = {"o": "bf16", "q": "bf16", "s": "fp32", "y": "fp32", "out": "bf16"}
        const.update(H=16, HAS_S=True, HAS_Y=True)
    elif kernel == "dq":
        fn = offsets_triton._readout_dq_kernel
        pointers = {"do": "bf16", "q": "bf16", "s": "fp32", "dq": "bf16"}
        const.update(HK=16)
    else:
        fn = offsets_triton._readout_ds_kernel
        pointers = {"do": "bf16", "q": "bf16", "ws": "fp32"}
        const.update(H=16, SUB=offsets_triton.SUB)
    _compile(fn, pointers, const, 4)


@pytest.mark.skipif(os.environ.get(CHILD) == "1", reason="this is the child run")
def test_compiles_with_the_gpu_machines_triton():
    if not os.path.isdir(GPU_TRITON):
        pytest.skip(f"{GPU_TRITON} is missing (`make test` installs Triton 3.6 there)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update({CHILD: "1", "PYTHONPATH": os.pathsep.join(p for p in (GPU_TRITON, env.get("PYTHONPATH")) if p)})
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", os.path.abspath(__file__)]
    child = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800, check=False)
    assert child.returncode == 0, f"with Triton 3.6:\n{child.stdout[-6000:]}{child.stderr[-2000:]}"


@pytest.mark.skipif(os.environ.get(CHILD) != "1", reason="only in the child run")
def test_child_runs_the_gpu_machines_triton():
    assert triton.__version__.startswith("3.6."), triton.__version__
