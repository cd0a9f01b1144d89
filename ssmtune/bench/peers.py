"""Loading the peers that the benchmarks time beside ssmtune: mamba_ssm (the authors' stack) and transformers + peft.

Each loader returns ``(thing, note)``: the peer and its version, or None and the reason it is missing (recorded in the
JSON report). mamba_ssm's ``__init__`` imports its compiled CUDA extension unconditionally; its pure-Triton SSD imports
without it through a bare ``mamba_ssm`` package whose ``__path__`` points at the installed directory.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import types
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

_SSD_MODULES = ("ssd_bmm", "ssd_chunk_state", "ssd_state_passing", "ssd_chunk_scan", "ssd_combined")


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e)[:200]}"


def _version(pkg: str) -> str:
    try:
        return version(pkg)
    except Exception:  # noqa: BLE001 - metadata is optional (a --target install has none)
        return "unknown version"


def _install_shell_package() -> None:
    if "mamba_ssm" in sys.modules:
        return
    spec = importlib.util.find_spec("mamba_ssm")  # locates the package without executing it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("mamba_ssm is not installed")
    shell = types.ModuleType("mamba_ssm")
    shell.__path__ = list(spec.submodule_search_locations)
    shell.__file__ = spec.origin
    shell.__spec__ = spec
    sys.modules["mamba_ssm"] = shell


def mamba_ssm_missing() -> str | None:
    """None when ``import mamba_ssm`` (with its CUDA extension) works, else why not."""
    try:
        import mamba_ssm  # noqa: F401
    except Exception as e:  # noqa: BLE001 - ImportError or a broken extension (undefined symbol, CUDA mismatch)
        return _why(e)
    return None


def mamba_ssm_selective_scan() -> tuple[Callable | None, str]:
    """mamba_ssm's CUDA ``selective_scan_fn`` with ssmtune's keyword names."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as e:  # noqa: BLE001
        return None, _why(e)

    def fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_final_state=False):
        return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_final_state)

    return fn, f"mamba_ssm {_version('mamba_ssm')}"


def mamba_ssm_chunk_scan() -> tuple[Callable | None, str]:
    """mamba_ssm's Triton ``mamba_chunk_scan_combined`` (it needs no compiled extension)."""
    try:
        _install_shell_package()
        fn = importlib.import_module("mamba_ssm.ops.triton.ssd_combined").mamba_chunk_scan_combined
    except Exception as e:  # noqa: BLE001
        return None, _why(e)
    return fn, f"mamba_ssm {_version('mamba_ssm')}"


def set_mamba_autotune(mode: str) -> int:
    """Bound the cost of mamba_ssm's SSD ``@triton.autotune`` (~140 configs compiled and timed on the first call);
    returns how many autotuners were patched. ``full``: as shipped; ``quick``: every config, each timed by a short
    ``do_bench``; ``one``: a single config per kernel, the one mamba_ssm's deterministic mode picks."""
    import triton.testing
    from triton.runtime.autotuner import Autotuner

    def quick(kernel_call, quantiles):
        return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)

    seen, n = set(), 0
    for name in _SSD_MODULES:
        mod = sys.modules.get(f"mamba_ssm.ops.triton.{name}")
        for tuner in vars(mod).values() if mod is not None else ():
            if not isinstance(tuner, Autotuner) or id(tuner) in seen:
                continue
            seen.add(id(tuner))
            full = tuner.__dict__.setdefault("_all_configs", list(tuner.configs))
            if mode == "one":
                tuner.configs = [min(full, key=_config_cost)]
            elif mode in ("full", "quick"):
                tuner.configs = list(full)
            else:
                raise ValueError(f"unknown mamba_ssm autotune mode {mode!r}; known: full, quick, one")
            # newer Triton: a do_bench property over _do_bench; older: a plain attribute
            attr = "_do_bench" if isinstance(getattr(type(tuner), "do_bench", None), property) else "do_bench"
            shipped = tuner.__dict__.setdefault("_shipped_do_bench", getattr(tuner, attr, None))
            setattr(tuner, attr, quick if mode == "quick" else shipped)
            tuner.cache.clear()  # choices tuned under another mode must not survive
            n += 1
    return n


def _config_cost(cfg) -> int:
    # mamba_ssm's deterministic mode picks the smallest block product x stages
    prod = 1
    for key, val in cfg.kwargs.items():
        if key.startswith("BLOCK_SIZE_"):
            prod *= val
    return prod * (getattr(cfg, "num_stages", 1) or 1)


def hf_mamba2_chunk_scan() -> tuple[Callable | None, str]:
    """transformers' torch chunked SSD (the undecorated function), when the installed version has a standalone one."""
    try:
        mod = importlib.import_module("transformers.models.mamba2.modeling_mamba2")
    except Exception as e:  # noqa: BLE001
        return None, _why(e)
    fn = getattr(mod, "mamba2_chunk_scan", None)
    if fn is None:
        return None, f"transformers {_version('transformers')} has no standalone mamba2_chunk_scan"
    return inspect.unwrap(fn), f"transformers {_version('transformers')}"


def transformers_peft() -> tuple[Any, str]:
    """(transformers, peft) modules, or None and why not."""
    try:
        import peft
        import transformers
    except Exception as e:  # noqa: BLE001
        return None, _why(e)
    return (transformers, peft), f"transformers {transformers.__version__}, peft {peft.__version__}"
