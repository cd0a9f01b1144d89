"""The decode benchmark on the CPU: a tiny model, graphed (the static decoder, run eagerly) and eager rows."""

from __future__ import annotations

import json

import pytest
import torch

from ssmtune.bench.run import main


def test_decode_bench_small_writes_rows(tmp_path) -> None:
    out = tmp_path / "decode.json"
    argv = ["decode", "--device", "cpu", "--small", "--models", "mamba2", "--stacks", "graph", "eager",
            "--batches", "2", "--prompt-len", "4", "--new-tokens", "3", "--adapters", "2", "--repeats", "1",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    rows = json.loads(out.read_text())["results"]["rows"]
    assert {(r["stack"], r["adapters"]) for r in rows} == {
        ("graph", "1 adapter"),
        ("graph", "2 adapters"),
        ("eager", "1 adapter"),
        ("eager", "2 adapters"),
    }
    assert all(r["status"] == "ok" and r["e2e_tok_s"] > 0 for r in rows)
    assert json.loads(out.read_text())["results"]["state_dtype"] == "fp32"
    assert {r["state_dtype"] for r in rows} == {"fp32"}


def test_decode_bench_bf16_states_are_recorded(tmp_path, monkeypatch) -> None:
    from ssmtune.bench import decode

    real, seen = decode.generator_fn, []
    monkeypatch.setattr(decode, "generator_fn", lambda *a: seen.append(a[-1]) or real(*a))
    out = tmp_path / "decode.json"
    argv = ["decode", "--device", "cpu", "--small", "--models", "mamba2", "--stacks", "graph", "eager",
            "--batches", "2", "--prompt-len", "4", "--new-tokens", "3", "--adapters", "2", "--repeats", "1",
            "--state-dtype", "bf16", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    results = json.loads(out.read_text())["results"]
    assert results["state_dtype"] == "bf16"
    assert all(r["status"] == "ok" and r["state_dtype"] == "bf16" for r in results["rows"])
    assert seen and set(seen) == {torch.bfloat16}  # ssmtune's rows generate with bf16 states


@pytest.mark.parametrize(("choice", "want"), [("fp32", torch.float32), ("model", torch.bfloat16)])
def test_decode_bench_adapter_dtype(choice, want) -> None:
    from ssmtune.bench.decode import build_ours

    peft = build_ours("mamba", "tiny", 2, torch.device("cpu"), torch.bfloat16, choice)
    offsets = [p for n, p in peft.named_parameters() if "__state_offset" in n]
    assert len(offsets) == 2 * peft.config.n_layer and {p.dtype for p in offsets} == {want}
    assert all(p.abs().max() > 0 for p in offsets)  # perturbed before the cast


def test_decode_bench_cut_short_keeps_the_rows_it_measured(tmp_path, monkeypatch) -> None:
    from ssmtune.bench import decode

    real, calls = decode.time_generate, []

    def stop_at_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(decode, "time_generate", stop_at_the_third)
    out = tmp_path / "decode.json"
    argv = ["decode", "--device", "cpu", "--small", "--models", "mamba2", "--stacks", "graph", "eager",
            "--batches", "2", "--prompt-len", "4", "--new-tokens", "3", "--adapters", "2", "--repeats", "1",
            "--out", str(out)]  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    report = json.loads(out.read_text())
    assert report["status"] == "running" and "report_partial" not in report["args"]
    assert [r["status"] for r in report["results"]["rows"]] == ["ok", "ok"]


def test_decode_bench_eval_rows_time_eval_graphed_and_eager(tmp_path, monkeypatch) -> None:
    from ssmtune.bench import decode
    from ssmtune.eval import evaluate as ev

    real, graphs = ev.complete_batch, []
    monkeypatch.setattr(ev, "complete_batch", lambda *a, **k: graphs.append(k["cuda_graph"]) or real(*a, **k))
    out = tmp_path / "decode.json"
    argv = ["decode", "--device", "cpu", "--small", "--models", "mamba", "--stacks", "graph", "--batches", "1",
            "--prompt-len", "6", "--new-tokens", "6", "--repeats", "1", "--eval-examples", "2", "--eval-beams", "2",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    (row,) = json.loads(out.read_text())["results"]["eval"]
    assert row["status"] == "ok" and row["s_eager"] > 0 and row["s_graph"] > 0 and row["speedup"] > 0
    # one generate batch per evaluate (warm-up, timed) of each mode: eager, the library default (graphed on CUDA) one
    # by one, batched
    assert graphs == [False] * 2 + [None] * 4
    assert row["s_default"] > 0 and row["same_batched"] == 2 and row["batch_size"] == 8
    assert "eval examples" in decode.eval_table([row])
