"""The benchmark registry: name -> Benchmark. Each benchmark module registers itself when imported."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# the modules that register benchmarks, imported on first use (they import torch, transformers, ...)
MODULES = ("train_step", "profile_step", "selective_scan", "ssd", "cross_entropy", "serve", "prefix_cache",
           "distributed", "hybrid_step", "decode", "packing")  # fmt: skip


@dataclass(frozen=True)
class Benchmark:
    name: str
    description: str
    """One line, shown by ``ssmtune bench --list``."""
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], dict[str, Any] | None]
    """Returns the results (``rows``, and ``table``: the Markdown printed last), or None on a process that must not
    write them (a non-zero rank of a distributed run)."""
    needs_cuda: bool = False


BENCHMARKS: dict[str, Benchmark] = {}


def register(bench: Benchmark) -> Benchmark:
    if bench.name in BENCHMARKS:
        raise ValueError(f"benchmark {bench.name!r} is registered twice")
    BENCHMARKS[bench.name] = bench
    return bench


def load_all() -> dict[str, Benchmark]:
    for mod in MODULES:
        importlib.import_module(f"ssmtune.bench.{mod}")
    return BENCHMARKS


def get(name: str) -> Benchmark:
    benches = load_all()
    if name not in benches:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(benches)}")
    return benches[name]
