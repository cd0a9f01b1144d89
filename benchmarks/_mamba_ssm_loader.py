"""Import mamba_ssm's Triton SSD without running ``mamba_ssm/__init__.py`` (ECOSYSTEM.md §4, option c).

``mamba_ssm/__init__.py`` imports the CUDA selective-scan extension unconditionally. A bare module named ``mamba_ssm``
whose ``__path__`` points at the installed package directory lets the pure-Triton submodules import on their own.
Only benchmarks use this; ssmtune itself never imports mamba_ssm.

``set_mamba_autotune`` bounds the cost of mamba_ssm's ``@triton.autotune``: its SSD fwd + bwd run ~16 autotuned
kernels with 4-17 configs each (~140 in all), and the first call compiles every config serially and benchmarks each
with Triton's default do_bench (25 ms warm-up + 100 ms). It patches the ``Autotuner`` objects of the imported
``mamba_ssm.ops.triton.ssd_*`` modules in place (their ``configs`` list and ``_do_bench``); no env variable of
mamba_ssm does this outside its deterministic mode, which also changes the kernels.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Callable, Iterator

_SSD_MODULES = ("ssd_bmm", "ssd_chunk_state", "ssd_state_passing", "ssd_chunk_scan", "ssd_combined")


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


def mamba_ssm_available() -> bool:
    return importlib.util.find_spec("mamba_ssm") is not None


def _autotuners() -> Iterator:
    from triton.runtime.autotuner import Autotuner

    seen = set()
    for name in _SSD_MODULES:
        mod = sys.modules.get(f"mamba_ssm.ops.triton.{name}")
        for obj in vars(mod).values() if mod is not None else ():
            if isinstance(obj, Autotuner) and id(obj) not in seen:
                seen.add(id(obj))
                if not hasattr(obj, "_ssmtune_all_configs"):
                    obj._ssmtune_all_configs = list(obj.configs)
                yield obj


def set_mamba_autotune(mode: str) -> int:
    """Patch mamba_ssm's SSD autotuners (call after ``load_mamba_chunk_scan_combined``); returns how many.

    mode "full": as shipped. "quick": every config still tried, but each timed by do_bench(warmup=5, rep=20), which
    ranks configs of kernels >= 10 us about as well and should cut the benchmarking (~140 x 125 ms) about 5x; the compilations are what
    the benchmark's parallel prewarm takes off the critical path. "one": a single config per kernel, the one
    mamba_ssm's own deterministic mode picks (smallest block product x stages): no tuning at all, so likely slower
    than tuned mamba_ssm; a fallback when there is no time to compile. "pick:I": config I (modulo the list length)
    per kernel: the prewarm subprocesses use it to compile disjoint slices of the configs in parallel.
    """
    import triton.testing

    def quick(kernel_call, quantiles):
        return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)

    n = 0
    for tuner in _autotuners():
        full = tuner._ssmtune_all_configs
        if mode in ("full", "quick"):
            tuner.configs = list(full)
        elif mode == "one":
            tuner.configs = [min(full, key=_config_cost)]
        elif mode.startswith("pick:"):
            tuner.configs = [full[int(mode[5:]) % len(full)]]
        else:
            raise ValueError(f"unknown mamba_ssm autotune mode {mode!r}")
        # newer Triton: a do_bench property over _do_bench (None: the driver's default); older: a plain attribute
        attr = "_do_bench" if isinstance(getattr(type(tuner), "do_bench", None), property) else "do_bench"
        if not hasattr(tuner, "_ssmtune_do_bench"):
            tuner._ssmtune_do_bench = getattr(tuner, attr, None)
        setattr(tuner, attr, quick if mode == "quick" else tuner._ssmtune_do_bench)
        tuner.cache.clear()  # tuned choices of a previous mode must not survive
        n += 1
    return n


def max_mamba_configs() -> int:
    return max((len(t._ssmtune_all_configs) for t in _autotuners()), default=0)


def _config_cost(cfg) -> int:
    # mamba_ssm.utils.determinism._estimate_config_cost, restated so that "one" does not depend on that private name
    prod = 1
    for key, val in cfg.kwargs.items():
        if key.startswith("BLOCK_SIZE_"):
            prod *= val
    return prod * (getattr(cfg, "num_stages", 1) or 1)


def mamba_ssm_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("mamba_ssm")
    except Exception:  # noqa: BLE001 - metadata is optional for a --target install
        return None
