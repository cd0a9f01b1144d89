"""The profile benchmark: a CPU run groups ops into categories and measures the idle gaps; idle_gaps' arithmetic."""

from __future__ import annotations

import json

import pytest

from ssmtune.bench.profile_step import idle_gaps
from ssmtune.bench.run import main


def test_profile_runs_on_cpu(tmp_path, capsys) -> None:
    out = tmp_path / "profile.json"
    argv = ["profile", "--small", "--device", "cpu", "--warmup", "1", "--steps", "1", "--out", str(out), "--variants"]
    assert main([*argv, "ssmtune:mamba:state_offset_h:2x16", "bad:entry:x:1x1"]) == 2
    assert "bad --variants entry 'bad:entry:x:1x1'" in capsys.readouterr().err
    assert main([*argv, "ssmtune:mamba:state_offset_h:2x16"]) == 0
    (r,) = json.loads(out.read_text())["results"]["rows"]
    assert r["variant"] == "ssmtune:mamba:state_offset_h:2x16"
    assert r["busy_ms"] > 0 and r["categories"] and r["top"]
    assert r["timeline"]["kernels"] > 0 and r["timeline"]["span_ms"] > 0


@pytest.mark.slow
def test_profile_hybrid_variant_on_cpu(tmp_path, capsys) -> None:
    """A hybrid_step model profiles through that benchmark's builders; its peer takes LoRA only."""
    pytest.importorskip("peft")
    out = tmp_path / "p.json"
    argv = ["profile", "--small", "--device", "cpu", "--warmup", "1", "--steps", "1", "--out", str(out), "--variants"]
    assert main([*argv, "hf+peft:qwen3_5_0.8b:state_offset_h:1x16"]) == 2
    assert "a hybrid model takes" in capsys.readouterr().err
    assert main([*argv, "ssmtune:qwen3_5_0.8b:state_offset_h:1x16", "hf+peft:qwen3_5_0.8b:lora:1x16"]) == 0
    rows = json.loads(out.read_text())["results"]["rows"]
    assert [r["variant"] for r in rows] == [
        "ssmtune:qwen3_5_0.8b:state_offset_h:1x16",
        "hf+peft:qwen3_5_0.8b:lora:1x16",
    ]
    assert all(r["categories"] and r["wall_ms"] > 0 for r in rows), rows
    assert "gated_delta_rule backend torch" in rows[0]["detail"] and "in_proj_qkv" in rows[1]["detail"]


def test_idle_gaps_buckets_and_largest() -> None:
    """Overlapping intervals merge; each gap lands in its bucket once per step; the largest gap names its neighbours."""
    # two steps; times in µs. Gaps: 3 (a→b), 50 (c→d), 2000 (d→e); b and c overlap (no gap between them)
    iv = [(0, 10, "a"), (13, 40, "b"), (30, 45, "c"), (95, 100, "d"), (2100, 2110, "e")]
    r = idle_gaps(list(reversed(iv)), steps=2)
    assert r["kernels"] == 2.5
    assert r["span_ms"] == 2110 / 1e3 / 2
    assert r["busy_ms"] == (10 + 32 + 5 + 10) / 1e3 / 2
    assert abs(r["idle_ms"] - (3 + 50 + 2000) / 1e3 / 2) < 1e-12
    b = r["buckets"]
    assert b["0-5 us"] == {"gaps": 0.5, "ms": 3 / 1e3 / 2}
    assert b["20-100 us"] == {"gaps": 0.5, "ms": 50 / 1e3 / 2}
    assert b[">1000 us"] == {"gaps": 0.5, "ms": 2000 / 1e3 / 2}
    assert b["5-20 us"]["gaps"] == b["100-1000 us"]["gaps"] == 0
    assert r["largest"][0] == {"us": 2000, "before": "d", "after": "e"}
    assert r["largest"][1] == {"us": 50, "before": "c", "after": "d"}
    assert idle_gaps([], steps=1)["kernels"] == 0


def test_profile_decode_runs_on_cpu(tmp_path, capsys) -> None:
    """--workload decode on the CPU: the graph and eager stacks give per-step figures, mamba_ssm is skipped with its
    reason, the decode categories exist, and training-only / decode-only options are refused across workloads."""
    from ssmtune.bench.profile_step import CATEGORIES, category

    out = tmp_path / "profile.json"
    argv = ["profile", "--workload", "decode", "--small", "--device", "cpu", "--warmup", "1", "--steps", "2",
            "--models", "mamba", "mamba2", "--batch", "2", "--stacks", "graph", "mamba_ssm", "eager",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["args"]["workload"] == "decode" and report["args"]["steps"] == 2
    rows = report["results"]["rows"]
    assert [(r["model"], r["stack"]) for r in rows] == [
        (m, s) for m in ("mamba", "mamba2") for s in ("graph", "mamba_ssm", "eager")
    ]
    for r in rows:
        if r["stack"] == "mamba_ssm":
            assert r["skipped"] == "needs CUDA" and "timeline" not in r
            continue
        assert "error" not in r and "skipped" not in r, r
        tl = r["timeline"]
        # the tiny models have 2 layers; a decode step runs the same ops, graphed (eagerly on the CPU) or not
        assert tl["kernels"] > 0 and tl["kernels_per_layer"] == tl["kernels"] / 2
        assert set(tl["buckets"]) == {"0-5 us", "5-20 us", "20-100 us", "100-1000 us", ">1000 us"}
        # times on a shared CPU are noise: only their presence is checked
        assert {"busy_ms", "wall_ms", "tok_s", "categories"} <= set(r) and r["top"]
        assert all(t["calls"] > 0 for t in r["top"])
        assert "argmax / sampling" in r["categories"]  # greedy decoding takes an argmax every step
        assert r["graph_launches"] == 0
    printed = capsys.readouterr().out
    assert "### mamba2, batch 2 (per decode step)" in printed and "mamba_ssm:mamba:b2: skipped: needs CUDA" in printed
    # the decode kernels' own categories come before the generic ones they would otherwise fall into
    names = [c for c, _ in CATEGORIES]
    assert names.index("state update") < names.index("mamba1 scan") and names.index("conv update") < names.index(
        "conv1d"
    )
    assert category("_selective_scan_update_kernel") == category("ssd_state_update_fwd_kernel") == "state update"
    assert category("causal_conv1d_update_kernel") == "conv update"
    assert category("void at::native::reduce_kernel<512, 1, ReduceOp<float, ArgMaxOps<float>>>") == "argmax / sampling"
    assert main([*argv[:-2], "--variants", "ssmtune:mamba:none:2x16"]) == 2
    assert main(["profile", "--small", "--device", "cpu", "--batch", "2"]) == 2
    assert "--batch only apply to --workload decode" in capsys.readouterr().err


def test_kernels_of_counts_graph_replayed_kernels(monkeypatch) -> None:
    """On CUDA every GPU-side record counts, with or without a CPU-side parent op (graph replays have none), and the
    cudaGraphLaunch calls are counted; CPU-side records are no kernels."""
    from types import SimpleNamespace

    import torch

    from ssmtune.bench import profile_step as ps

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def ev(name, device_type, start, parent=None):
        return SimpleNamespace(name=name, device_type=device_type, cpu_parent=parent,
                               time_range=SimpleNamespace(start=start, end=start + 2))  # fmt: skip

    launch = ev("cudaGraphLaunch_v10000", cpu, 0)
    events = [launch, ev("cudaLaunchKernel", cpu, 1), ev("aten::mm", cpu, 1),
              ev("selective_state_update_fwd_kernel", cuda, 5), ev("gemv", cuda, 8),  # replayed: no parent
              ev("vectorized_elementwise_kernel", cuda, 12, parent=ev("aten::add", cpu, 1))]  # fmt: skip

    class FakeProfile:
        def __init__(self, activities):
            assert activities == [torch.profiler.ProfilerActivity.CUDA]

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def events(self):
            return events

    monkeypatch.setattr(torch.profiler, "profile", FakeProfile)
    monkeypatch.setattr(ps, "sync", lambda device: None)
    intervals, launches = ps.kernels_of(lambda: None, torch.device("cuda"))
    assert [name for _, _, name in intervals] == ["selective_state_update_fwd_kernel", "gemv",
                                                  "vectorized_elementwise_kernel"]  # fmt: skip
    assert launches == 1


def test_decode_step_drops_the_prefill_and_subtracts_the_first_token(monkeypatch) -> None:
    """Per step: the n-token run minus the 1-token run, the shared prefill dropped, the boundary gap kept."""
    import argparse

    import torch

    from ssmtune.bench import profile_step as ps

    # times in µs. Prefill p1 p2 then the first token's argmax; each decode step: state_update, conv_update, argmax
    prefill = [(0, 10, "p1"), (12, 40, "p2"), (41, 42, "argmax_a")]
    steps = [(100 + 50 * i, 104 + 50 * i, "state_update") for i in range(3)]
    steps += [(110 + 50 * i, 112 + 50 * i, "conv1d_update") for i in range(3)]
    steps += [(120 + 50 * i, 121 + 50 * i, "argmax_b") for i in range(3)]
    long_run = [*prefill, *steps, (400, 401, "cat")]
    # the same prefill, slower this time: its noise must not reach the per-step figures
    short_run = [(0, 30, "p1"), (35, 80, "p2"), (81, 82, "argmax_a"), (90, 91, "cat")]
    traces = {4: (long_run, 3), 1: (short_run, 0)}
    calls = []

    def fake_kernels_of(fn, device):
        calls.append(fn())
        return traces[calls[-1]]

    monkeypatch.setattr(ps, "kernels_of", fake_kernels_of)
    monkeypatch.setattr(ps.dec, "time_generate", lambda fn, n, repeats, device: (0.010, 0.004))
    args = argparse.Namespace(steps=3, warmup=1, top=10, shape="tiny")
    r = ps.decode_step(args, lambda k: k, rows=2, device=torch.device("cpu"))
    assert calls == [4, 1]
    assert r["timeline"]["kernels"] == 3 and r["timeline"]["kernels_per_layer"] == 1.5
    assert r["categories"] == {"state update": 4e-3, "conv update": 2e-3, "argmax / sampling": 1e-3}
    assert {k["name"]: k["calls"] for k in r["top"]} == {"state_update": 1, "conv1d_update": 1, "argmax_b": 1}
    assert abs(r["wall_ms"] - 2.0) < 1e-9 and abs(r["tok_s"] - 1000.0) < 1e-6
    assert r["graph_launches"] == 1 and "warning" not in r  # 3 kernels a step for 2 layers
    # idle per step: long run from argmax_a: 58 (boundary) + 3 x (6 + 8) + 2 x 29 + 179 (to cat) = 337; short run: 8
    assert abs(r["timeline"]["idle_ms"] - (337 - 8) / 1e3 / 3) < 1e-12
    first = r["timeline"]["top_gaps"][0]
    assert (first["before"], first["after"]) == ("argmax_b", "cat")
    assert abs(first["ms"] - 179 / 1e3 / 3) < 1e-12
