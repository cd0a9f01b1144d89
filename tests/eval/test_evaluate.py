"""`evaluate`: Spider generation is scored by execution; classification counts answers outside the task labels."""

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
    monkeypatch.setattr(evaluate_mod, "complete_batch", lambda model, tok, prompts, **k: [prediction] * len(prompts))
    model = MambaForCausalLM(MambaConfig(d_model=16, n_layer=1, vocab_size=264))
    result = evaluate(model, ByteTokenizer(), TaskConfig(task="spider", data_dir=str(tmp_path)),
                      EvalConfig(split="validation", mode="generation", num_beams=1, max_new_tokens=4))  # fmt: skip
    assert result["execution_accuracy"] == expected
    assert result["score"] == expected


def test_out_of_class_uses_the_task_label_set(monkeypatch):
    """A valid class that is absent from the evaluated subset is not "out of class"; a non-class answer is."""
    model = MambaForCausalLM(MambaConfig(d_model=16, n_layer=1, vocab_size=264))
    cfg = EvalConfig(split="test", mode="classification", max_examples=3)
    # the first 3 test labels are 3, 0, 2: "1" is a valid class missing from them
    for answer, expected in (("1", 0), ("7", 3)):
        monkeypatch.setattr(evaluate_mod, "teacher_forced", lambda m, ds, bs, a=answer: (0.0, [ord(a)] * len(ds)))
        result = evaluate(model, ByteTokenizer(), TaskConfig(task="wn-pos"), cfg)
        assert result["out_of_class"] == expected
