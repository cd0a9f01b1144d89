"""CPU smoke tests of the hybrid-model benchmark (tiny shapes): the JSON it writes, with and without our stack."""

from __future__ import annotations

import json
import statistics

import pytest

from ssmtune.bench import hybrid_step

pytest.importorskip("transformers")

TOP_KEYS = {"name", "device", "date", "argv", "versions", "kernels", "shapes", "gate", "rows", "generation", "targets"}
ROW_KEYS = {"model", "stack", "method", "batch", "seqlen", "status", "ms_step", "tokens_per_s", "vs_bare", "vs_peer",
            "mem_vs_peer", "vs_peer_torch"}  # fmt: skip
VERSION_KEYS = {"torch", "triton", "transformers", "peft", "mamba_ssm", "causal_conv1d", "fla"}


def _check_json(path) -> dict:
    d = json.loads(path.read_text())
    assert TOP_KEYS <= d.keys()
    assert VERSION_KEYS <= d["versions"].keys()
    assert d["name"] == hybrid_step.NAME
    for r in d["rows"]:
        assert ROW_KEYS <= r.keys(), r
    return d


@pytest.mark.slow
def test_small_run_with_our_stack(tmp_path) -> None:
    pytest.importorskip("peft")
    out = tmp_path / "hybrid.json"
    assert hybrid_step.main(["--small", "--device", "cpu", "--steps", "1", "--out", str(out)]) == 0
    d = _check_json(out)
    assert d["gate"]["passed"] is True, d["gate"]
    ours = [r for r in d["rows"] if r["stack"] == "ssmtune"]
    assert {r["method"] for r in ours} == set(hybrid_step.METHODS)
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in ours), [r["status"] for r in ours]
    assert all(r["vs_bare"] is not None for r in ours)
    assert all(r["vs_peer"] is not None for r in ours if r["method"] == "state_offset_h")
    assert {g["stack"] for g in d["generation"]} == {"hf", "ssmtune", "ssmtune:graph"}
    assert all(g["status"] == "ok" for g in d["generation"]), d["generation"]
    # Falcon-H1 is not graph-safe in transformers: its graphed row decodes eagerly and says so; Granite's is graphed
    graph = {g["model"]: g.get("detail", "") for g in d["generation"] if g["stack"] == "ssmtune:graph"}
    assert "eager" in graph["falcon_h1_0.5b"] and "eager" not in graph["granite_4.0_h_1b"], graph


@pytest.mark.slow
def test_small_run_gated_deltanet(tmp_path) -> None:
    """Qwen3.5 (Gated DeltaNet): the gate covers it, both stacks train, generation runs, the backend is recorded."""
    pytest.importorskip("peft")
    out = tmp_path / "hybrid.json"
    argv = ["--small", "--models", "qwen3_5_0.8b", "--device", "cpu", "--steps", "1", "--out", str(out)]
    assert hybrid_step.main(argv) == 0
    d = _check_json(out)
    gate = d["gate"]["models"]["qwen3_5_0.8b"]
    assert d["gate"]["passed"] is True and gate["mixers"] == 3, d["gate"]
    assert max(gate["max_rel_err_mixer"], gate["max_rel_err_logits"]) <= hybrid_step.GATE_TOL["cpu"]
    assert {r["model"] for r in d["rows"]} == {"qwen3_5_0.8b"}
    assert d["shapes"]["qwen3_5_0.8b"]["model_type"] == "qwen3_5_text"
    ours = [r for r in d["rows"] if r["stack"] == "ssmtune"]
    peers = [r for r in d["rows"] if r["stack"] == "hf+peft"]
    assert {r["method"] for r in ours} == set(hybrid_step.METHODS)
    assert len(peers) == len(hybrid_step.SMALL_SIZES) and {r["method"] for r in peers} == {"lora"}
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in ours + peers), [r["status"] for r in d["rows"]]
    assert all(r["dead_params"] == 0 for r in ours + peers)
    # no fla and no CUDA here: our mixers and the peer both run the torch path
    assert all("gated_delta_rule backend torch" in r["detail"] for r in ours)
    assert all("torch_chunk_gated_delta_rule" in r["detail"] for r in peers)
    assert "fla_importable" in d["kernels"] and "qwen3_5_text_uses" in d["kernels"]
    lora = [r for r in ours + peers if r["method"] == "lora"]
    assert all("in_proj_qkv" in r["detail"] and "out_proj" in r["detail"] for r in lora), [r["detail"] for r in lora]
    assert all(r["vs_peer"] is not None for r in ours if r["method"] == "state_offset_h")
    goals = {t["target"] for t in d["targets"]}
    assert any(g.startswith("tokens/s >= 1.3x hf+peft,") for g in goals), goals
    assert {g["stack"] for g in d["generation"]} == {"hf", "ssmtune", "ssmtune:graph"}
    assert all(g["status"] == "ok" for g in d["generation"]), d["generation"]


def test_peer_rows_alone(tmp_path) -> None:
    pytest.importorskip("peft")
    out = tmp_path / "hybrid.json"
    argv = ["--small", "--device", "cpu", "--steps", "1", "--sizes", "1x16", "--no-generate", "--stacks", "hf+peft",
            "--out", str(out)]  # fmt: skip
    assert hybrid_step.main(argv) == 0
    d = _check_json(out)
    assert d["gate"]["passed"] is None
    peers = [r for r in d["rows"] if r["stack"] == "hf+peft"]
    assert {r["model"] for r in peers} == set(hybrid_step.DEFAULT_MODELS)
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in peers), [r["status"] for r in peers]
    # peft refuses out_proj on Falcon-H1: the targets it accepted are recorded
    falcon = next(r for r in peers if r["model"] == "falcon_h1_0.5b")
    assert "in_proj" in falcon["detail"] and "out_proj" not in falcon["detail"]
    assert not [r for r in d["rows"] if r["stack"] == "ssmtune"]


def test_rounds_time_every_row_again(tmp_path) -> None:
    """--rounds 3: each row is built, warmed and timed three times, in turn; its figure is the median of all steps."""
    out = tmp_path / "hybrid.json"
    argv = ["--small", "--device", "cpu", "--models", "qwen3_5_0.8b", "--sizes", "1x16", "--no-generate",
            "--stacks", "ssmtune", "--methods", "bare", "state_offset_h", "--steps", "2", "--warmup", "1",
            "--rounds", "3", "--skip-gate", "--out", str(out)]  # fmt: skip
    assert hybrid_step.main(argv) == 0
    rows = _check_json(out)["rows"]
    assert [r["method"] for r in rows] == ["bare", "state_offset_h"]
    for r in rows:
        assert r["status"] == "ok" and len(r["round_ms"]) == 3 and len(r["ms_all"]) == 6, r
        assert r["detail"].count("gated_delta_rule backend") == 1, r["detail"]  # written once, not per round
        assert r["ms_step"] == statistics.median(r["ms_all"])
    assert "rounds: " in hybrid_step.table({"rows": rows})


def test_shapes_build_configs() -> None:
    """The full shapes make valid transformers configs with the published layer layout (no weights allocated)."""
    from transformers import AutoConfig

    for key, (model_type, cfg) in hybrid_step.SHAPES.items():
        c = AutoConfig.for_model(model_type, **cfg)
        assert c.num_hidden_layers == len(cfg.get("layer_types", [None] * c.num_hidden_layers)), key
    granite = hybrid_step.SHAPES["granite_4.0_h_1b"][1]
    assert [i for i, t in enumerate(granite["layer_types"]) if t == "attention"] == [5, 15, 25, 35]
    qwen = hybrid_step.SHAPES["qwen3_5_0.8b"][1]
    assert [i for i, t in enumerate(qwen["layer_types"]) if t == "full_attention"] == [3, 7, 11, 15, 19, 23]
    falcon = hybrid_step.SHAPES["falcon_h1_0.5b"][1]
    assert falcon["mamba_n_heads"] * falcon["mamba_d_head"] == falcon["mamba_d_ssm"]


def test_write_json_is_atomic(tmp_path) -> None:
    out = tmp_path / "sub" / "x.json"
    hybrid_step.write_json(str(out), {"a": 1})
    assert json.loads(out.read_text()) == {"a": 1}
    assert [p.name for p in out.parent.iterdir()] == ["x.json"]
