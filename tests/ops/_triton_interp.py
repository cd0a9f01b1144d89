"""The Triton kernel tests' set-up: without CUDA the kernels run under Triton's CPU interpreter.

Triton reads ``TRITON_INTERPRET`` when ``@triton.jit`` decorates a kernel, i.e. when the kernel's module is imported. A
test module calls ``interpret_on_cpu()`` before it imports the kernels, then ``reload_compiled(module, ...)``: a test
module collected earlier may have imported them before the variable was set. With CUDA neither changes anything.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys
from types import ModuleType

import pytest
import torch


def interpret_on_cpu() -> ModuleType:
    """Set ``TRITON_INTERPRET=1`` when there is no CUDA device, and return triton (skipping the calling module without
    it). Call it before importing triton's kernels: set before triton itself is imported, its own helpers (tl.sum, ...)
    are interpreted too."""
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    return pytest.importorskip("triton")


def interpreted(kernel) -> bool:
    """Whether ``kernel``, under any ``@triton.heuristics`` or ``@triton.autotune``, was decorated for the interpreter."""
    while "Interpreted" not in type(kernel).__name__ and hasattr(kernel, "fn"):
        kernel = kernel.fn
    return "Interpreted" in type(kernel).__name__


def reload_compiled(*modules: ModuleType) -> None:
    """Without CUDA, re-run (in place, so names bound to the modules stay good) each kernel module whose kernels were
    decorated before ``TRITON_INTERPRET`` was set."""
    from triton.runtime import KernelInterface

    for module in modules:
        kernels = [v for v in vars(module).values() if isinstance(v, KernelInterface)]
        if not kernels:
            raise ValueError(f"{module.__name__} defines no Triton kernel")
        if not torch.cuda.is_available() and not all(map(interpreted, kernels)):
            importlib.reload(module)


# The Triton that the GPU machines run (torch 2.11 pins it). The interpreter, and newer compilers, accept code that it
# rejects (a tl.static_range bound computed with tl.cdiv), so kernels are also compiled with it, for Hopper, on the CPU.
HOPPER_TRITON = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), ".venv",
                             "triton-3.6")  # fmt: skip
_TORCH_TO_TRITON = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int32": "i32", "int64": "i64",
                    "bool": "i1", "uint8": "u8", "int8": "i8"}  # fmt: skip


@contextlib.contextmanager
def recorded_launches():
    """Record every interpreted kernel launch inside the block as ``{"module", "name", "args"}``: tensors as their
    Triton pointer type, other values as they are. Only under the interpreter (a CPU run)."""
    from triton.runtime.interpreter import InterpretedFunction

    records, run = [], InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        values = dict(zip(self.arg_names, args)) | {k: v for k, v in kwargs.items() if k in self.arg_names}
        spec = {k: {"ptr": _TORCH_TO_TRITON[str(v.dtype).removeprefix("torch.")]} if torch.is_tensor(v) else v
                for k, v in values.items()}  # fmt: skip
        record = {"module": self.fn.__module__, "name": self.fn.__name__, "args": spec}
        if record not in records:
            records.append(record)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run
    try:
        yield records
    finally:
        InterpretedFunction.run = run


_COMPILE = r"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

failures = []
for rec in json.load(sys.stdin):
    kernel = getattr(importlib.import_module(rec["module"]), rec["name"])
    while not isinstance(kernel, JITFunction):  # under @triton.autotune / @triton.heuristics
        kernel = kernel.fn
    signature, constexprs = {}, {}
    for p in kernel.params:
        v = rec["args"].get(p.name, p.default)
        if p.is_constexpr or v is None:
            signature[p.name], constexprs[p.name] = "constexpr", v
        elif isinstance(v, dict):
            signature[p.name] = "*" + v["ptr"]
        elif isinstance(v, bool):
            signature[p.name] = "i1"
        elif isinstance(v, int):
            signature[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
        else:
            signature[p.name] = "fp32"
    try:
        triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))
    except Exception as e:
        failures.append(f"{rec['module']}.{rec['name']}: " + f"{type(e).__name__}: {e}".strip().splitlines()[-1][:400])
print(json.dumps({"triton": triton.__version__, "failures": failures}))
"""


def compile_for_hopper(records: list[dict], triton_path: str | None = None) -> dict:
    """Compile each recorded launch for sm_90 in a child process without the interpreter (``triton_path`` first on
    its path: another Triton than the installed one); returns {"triton": version, "failures": [...]}."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (triton_path, root, env.get("PYTHONPATH")) if p)
    child = subprocess.run([sys.executable, "-c", _COMPILE], input=json.dumps(records), env=env, capture_output=True,
                           text=True, timeout=900, check=False)  # fmt: skip
    if child.returncode != 0:
        raise AssertionError(f"the compile check itself failed:\n{child.stderr[-3000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])
