"""`ssmtune train / eval / generate` on a tiny hybrid saved by transformers, with ssmtune's byte tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _hybrid import tiny_hf

from ssmtune.cli.__main__ import main

# the byte tokenizer (ids 0..263) needs no files: the folder marks it, as `ssmtune pretrain` does
BYTE_MARKER = '{"tokenizer_class": "ByteTokenizer"}\n'


def save_tiny_hybrid(folder: Path, family: str) -> Path:
    tiny_hf(family, vocab_size=264).save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text(BYTE_MARKER)
    return folder


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("hybrid_cli")
    rte = root / "rte"
    rte.mkdir()
    words = ["cats sleep", "dogs run", "birds fly", "fish swim", "a b", "c d", "e f", "g h"]
    for split, n in (("train", 8), ("validation", 4)):
        rows = [{"sentence1": words[i % 8], "sentence2": words[(i * 3) % 8], "label": i % 2} for i in range(n)]
        (rte / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "rte": rte, "runs": root / "runs"}


@pytest.mark.parametrize(
    ("family", "method"),
    [("bamba", "state_offset_h"), ("falcon_h1", "initial_state"), ("qwen3_5_text", "state_offset_h")],
)
def test_train_eval_generate(env, family, method, capsys):
    base = save_tiny_hybrid(env["root"] / family, family)
    argv = ["train", "--model", str(base), "--data.task", "rte", "--data.data_dir", str(env["rte"]),
            "--method", method, "--train.epochs", "1", "--train.batch_size", "4", "--train.lr", "1e-2",
            "--train.progress", "false", "--train.best_metric", "score", "--eval.batch_size", "4",
            "--out_dir", str(env["runs"]), "--name", family]  # fmt: skip
    assert main(argv) == 0
    run = env["runs"] / family
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 2 and results["trainable_params"] > 0
    assert (run / "final" / "adapter_model.safetensors").is_file()
    capsys.readouterr()
    out_json = env["root"] / f"{family}-eval.json"
    argv = ["eval", "--model", str(base), "--adapter", str(run / "final"), "--data.task", "rte",
            "--data.data_dir", str(env["rte"]), "--output", str(out_json)]  # fmt: skip
    assert main(argv) == 0
    assert json.loads(out_json.read_text())["num_examples"] == 4
    argv = ["generate", "--model", str(base), "--adapter", str(run / "final"), "--prompt", "cats",
            "--max_new_tokens", "3", "--num_beams", "2", "--backend", "torch"]  # fmt: skip
    assert main(argv) == 0
