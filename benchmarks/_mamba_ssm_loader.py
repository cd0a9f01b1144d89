"""Import mamba_ssm's Triton SSD without running ``mamba_ssm/__init__.py`` (ECOSYSTEM.md §4, option c).

``mamba_ssm/__init__.py`` imports the CUDA selective-scan extension unconditionally. A bare module named ``mamba_ssm``
whose ``__path__`` points at the installed package directory lets the pure-Triton submodules import on their own.
Only benchmarks use this; ssmtune itself never imports mamba_ssm.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Callable


def _install_shell_package() -> None:
    mod = sys.modules.get("mamba_ssm")
    if mod is not None:
        return
    spec = importlib.util.find_spec("mamba_ssm")  # locates the package without executing it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("mamba_ssm is not installed")
    shell = types.ModuleType("mamba_ssm")
    shell.__path__ = list(spec.submodule_search_locations)
    shell.__file__ = spec.origin
    shell.__spec__ = spec
    sys.modules["mamba_ssm"] = shell


def load_mamba_chunk_scan_combined() -> Callable:
    """Return ``mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined``; raises ImportError if unavailable."""
    _install_shell_package()
    return importlib.import_module("mamba_ssm.ops.triton.ssd_combined").mamba_chunk_scan_combined


def mamba_ssm_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("mamba_ssm")
    except Exception:  # noqa: BLE001 - metadata is optional for a --target install
        return None
