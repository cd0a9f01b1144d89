"""The benchmark registry and runner: every benchmark is listed and parses its defaults, ``--list`` and unknown names
answer on one line, and the CPU smoke benchmark writes a valid report."""

from __future__ import annotations

import json

import pytest

from ssmtune.bench import registry
from ssmtune.bench.run import main, parser_for, write_json
from ssmtune.cli.__main__ import main as cli_main

EXPECTED = {
    "train_step",
    "profile",
    "selective_scan",
    "ssd",
    "cross_entropy",
    "serve",
    "prefix_cache",
    "distributed",
    "hybrid_step",
    "decode",
    "packing",
}


def test_every_benchmark_is_registered_described_and_parses_its_defaults() -> None:
    benches = registry.load_all()
    assert set(benches) == EXPECTED
    for name, bench in benches.items():
        assert bench.name == name
        assert bench.description and "\n" not in bench.description
        args = parser_for(bench).parse_args([])
        assert args.out is None and args.device == "auto"


def test_list_names_every_benchmark(capsys) -> None:
    assert cli_main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    for name, bench in registry.load_all().items():
        assert f"  {name} " in out and bench.description in out


def test_unknown_benchmark_is_one_line_naming_the_known_ones(capsys) -> None:
    assert cli_main(["bench", "no_such_bench"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "unknown benchmark 'no_such_bench'" in err and "train_step" in err and "serve" in err


def test_cuda_benchmark_refused_on_the_cpu(capsys, monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["ssd", "--device", "cpu"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_cpu_smoke_run_writes_the_report(tmp_path, capsys) -> None:
    out = tmp_path / "sub" / "train_step.json"
    argv = ["train_step", "--device", "cpu", "--small", "--models", "mamba", "--methods", "none", "state_offset_h",
            "--sizes", "2x32", "--no-peers", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert {"benchmark", "command", "date", "environment", "args", "status", "seconds", "results"} <= set(report)
    assert report["benchmark"] == "train_step" and report["status"] == "ok"
    assert report["command"].startswith("ssmtune bench train_step --device cpu")
    assert {"device_name", "torch", "python"} <= set(report["environment"])
    rows = report["results"]["rows"]
    assert [(r["method"], r["status"]) for r in rows] == [("none", "ok"), ("state_offset_h", "ok")]
    assert all(r["ms_step"] > 0 for r in rows) and rows[1]["vs_bare"] > 0
    assert report["results"]["check_rel_err"]["mamba auto"] < 1e-3
    assert not list(out.parent.glob(".*.tmp"))  # the temporary file was renamed
    assert "| mamba | ssmtune | state_offset_h |" in capsys.readouterr().out


def test_failed_check_reports_no_timings(tmp_path, monkeypatch, capsys) -> None:
    from ssmtune.bench import train_step
    from ssmtune.bench.common import CheckFailed

    def failing(args, device):
        raise CheckFailed("mamba logits, backend auto: relative error 1.00e+00 against the reference exceeds 1e-03")

    monkeypatch.setattr(train_step, "check_backends", failing)
    out = tmp_path / "r.json"
    assert main(["train_step", "--device", "cpu", "--small", "--no-peers", "--out", str(out)]) == 1
    report = json.loads(out.read_text())
    assert report["status"] == "check failed" and "results" not in report
    assert "check failed, no timings reported" in capsys.readouterr().err


def test_write_json_keeps_the_old_report_when_writing_fails(tmp_path, monkeypatch) -> None:
    from ssmtune.bench import run

    out = tmp_path / "r.json"
    write_json(out, {"a": 1})

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(run.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_json(out, {"a": 2})
    assert json.loads(out.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left behind
