"""`evaluate` on Spider scores generated SQL by execution on the example's sqlite database."""

import importlib.util
from pathlib import Path

import pytest

from ssmtune.data import TaskConfig
from ssmtune.eval import evaluate as evaluate_mod
from ssmtune.eval.evaluate import EvalConfig, evaluate
from ssmtune.models import MambaConfig, MambaForCausalLM
from ssmtune.tokenizer import ByteTokenizer

_spec = importlib.util.spec_from_file_location("spider_fixture", Path(__file__).parents[1] / "data" / "test_tasks.py")
_tasks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tasks)


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ("select count(*) from singer where name = 'Ann'", 100.0),  # same result as the gold query
        ("select count(*) from singer", 0.0),  # runs, different result
        ("select nonsense from", 0.0),  # does not run
    ],
)
def test_spider_execution_accuracy(tmp_path, monkeypatch, prediction, expected):
    _tasks.make_spider(tmp_path)
    monkeypatch.setattr(evaluate_mod, "complete", lambda *a, **k: prediction)
    model = MambaForCausalLM(MambaConfig(d_model=16, n_layer=1, vocab_size=264))
    result = evaluate(model, ByteTokenizer(), TaskConfig(task="spider", data_dir=str(tmp_path)),
                      EvalConfig(split="validation", mode="generation", num_beams=1, max_new_tokens=4))  # fmt: skip
    assert result["execution_accuracy"] == expected
    assert result["score"] == expected
