"""The Triton kernel tests' set-up: without CUDA the kernels run under Triton's CPU interpreter.

Triton reads ``TRITON_INTERPRET`` when ``@triton.jit`` decorates a kernel, i.e. when the kernel's module is imported. A
test module calls ``interpret_on_cpu()`` before it imports the kernels, then ``reload_compiled(module, ...)``: a test
module collected earlier may have imported them before the variable was set. With CUDA neither changes anything.
"""

from __future__ import annotations

import importlib
import os
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
