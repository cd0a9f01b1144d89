"""Benchmarks of ssmtune against its peers: ``ssmtune bench --list``, ``ssmtune bench NAME [options] --out FILE``.

This package sits on top of the library (it imports anything in ``ssmtune``); nothing in ``ssmtune`` imports it but
the command line.
"""

from ssmtune.bench.registry import BENCHMARKS, Benchmark, get, load_all, register

__all__ = ["BENCHMARKS", "Benchmark", "get", "load_all", "register"]
