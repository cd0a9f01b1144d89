"""The runner: ``ssmtune bench --list`` and ``ssmtune bench NAME [options] [--out FILE]``.

Runs one benchmark, writes its JSON report (results, device, library versions, date, command line) to ``--out``
atomically, and prints the benchmark's table, with its ratios against the peers, last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ssmtune.bench.registry import Benchmark, get, load_all


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write through a temporary file in the same folder and ``os.replace``: a reader never sees half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def parser_for(bench: Benchmark) -> argparse.ArgumentParser:
    # the benchmark module's docstring says what is measured and how
    doc = sys.modules[bench.run.__module__].__doc__ or ""
    ap = argparse.ArgumentParser(prog=f"ssmtune bench {bench.name}", description=bench.description, epilog=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--out", type=Path, default=None, help="JSON report (default: bench_<name>.json)")
    ap.add_argument("--device", default="auto", help="auto (CUDA if available), cuda, cuda:N or cpu")
    bench.add_args(ap)
    return ap


def effective(args: argparse.Namespace) -> dict[str, Any]:
    """The options as the benchmark ran them (it may resolve some, e.g. a smoke test's fewer steps)."""
    return {k: v for k, v in vars(args).items() if k not in ("out", "report_partial")}


def listing() -> str:
    benches = load_all()
    width = max(map(len, benches))
    lines = ["benchmarks (ssmtune bench NAME --help for the options):"]
    lines += [f"  {b.name:<{width}}  {b.description}" + ("  [CUDA]" if b.needs_cuda else "") for b in benches.values()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: ssmtune bench --list | ssmtune bench NAME [options] [--out FILE]\n")
        print(listing())
        return 0
    if argv[0] == "--list":
        print(listing())
        return 0
    try:
        bench = get(argv[0])
    except ValueError as e:
        print(f"ssmtune bench: {e}", file=sys.stderr)
        return 2
    args = parser_for(bench).parse_args(argv[1:])
    from ssmtune.bench.common import CheckFailed, environment, resolve_device

    try:
        device = resolve_device(args.device)
        # Triton's CPU interpreter runs the kernels too: a smoke test whose timings mean nothing
        if bench.needs_cuda and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"benchmark {bench.name!r} needs a CUDA device (or TRITON_INTERPRET=1), got {device}")
    except ValueError as e:
        print(f"ssmtune bench {bench.name}: {e}", file=sys.stderr)
        return 2
    args.device = str(device)
    out = args.out or Path(f"bench_{bench.name}.json")
    report: dict[str, Any] = {
        "benchmark": bench.name,
        "command": shlex.join(["ssmtune", "bench", *argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(device),
    }
    t0 = time.perf_counter()

    def report_partial(results: dict[str, Any]) -> None:
        # a benchmark may call this after each row: a run cut short (a time limit, Ctrl-C) keeps what it measured
        write_json(out, {**report, "args": effective(args), "status": "running", "seconds": time.perf_counter() - t0,
                         "results": results})  # fmt: skip

    args.report_partial = report_partial
    try:
        results = bench.run(args)
    except CheckFailed as e:
        report.update(args=effective(args), status="check failed", error=str(e), seconds=time.perf_counter() - t0)
        write_json(out, report)
        print(f"ssmtune bench {bench.name}: check failed, no timings reported: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"ssmtune bench {bench.name}: error: {e}", file=sys.stderr)
        return 2
    if results is None:  # a non-zero rank of a distributed run: rank 0 reports
        return 0
    table = results.pop("table", "")
    report.update(args=effective(args), status="ok", seconds=time.perf_counter() - t0, results=results)
    write_json(out, report)
    print(f"\n{bench.name}: {report['environment']['device_name']}, torch {report['environment']['torch']}; "
          f"report {out}\n")  # fmt: skip
    if table:
        print(table)
    return 0
