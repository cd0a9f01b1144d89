import math

import pytest

from ssmtune.eval import (
    accuracy,
    bleu,
    f1_binary,
    generation_scores,
    glue_score,
    matthews_corrcoef,
    meteor,
    pearson,
    rouge,
    spearman,
)


def test_classification_metrics_by_hand():
    preds, labels = [1, 1, 0, 0, 1], [1, 0, 1, 0, 1]
    assert accuracy(preds, labels) == pytest.approx(3 / 5)
    # tp 2, fp 1, fn 1, tn 1
    assert f1_binary(preds, labels) == pytest.approx(2 / 3)
    assert matthews_corrcoef(preds, labels) == pytest.approx((2 * 1 - 1 * 1) / math.sqrt(3 * 3 * 2 * 2))
    assert f1_binary([0, 0], [0, 0]) == 0.0
    assert matthews_corrcoef([1, 1, 1], [0, 1, 1]) == 0.0
    with pytest.raises(ValueError, match="3 vs 2"):
        accuracy([1, 2, 3], [1, 2])


def test_multiclass_mcc_by_hand():
    # Confusion counts: t0p0, t1p1, t1p2, t2p0 -> (c*n - t.p) / sqrt((n^2 - p.p)(n^2 - t.t)) = 3 / 10.
    assert matthews_corrcoef([0, 1, 2, 0], [0, 1, 1, 2]) == pytest.approx(0.3)
    assert matthews_corrcoef([0, 1, 2], [0, 1, 2]) == pytest.approx(1.0)


def test_correlations_by_hand():
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(15 / math.sqrt(228))
    # Ties share the average rank: x ranks [1, 2.5, 2.5, 4].
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(3 / math.sqrt(10))
    assert spearman([1, 2, 3], [10, 20, 1000]) == pytest.approx(1.0)


def test_glue_score_out_of_class_strict_and_reference():
    s = glue_score("rte", ["0", "1", "7", "0"], [0, 1, 1, 1])
    assert s["out_of_class"] == 1 and s["num_examples"] == 4
    assert s["accuracy"] == pytest.approx(2 / 4)
    assert s["ref_accuracy"] == pytest.approx(2 / 3)
    assert s["score"] == s["accuracy"]
    # MRPC: the miss on a positive becomes a false negative under the strict metric.
    s = glue_score("mrpc", [1, "x", 0, 1], [1, 1, 0, 0])
    assert s["f1"] == pytest.approx(0.5) and s["ref_f1"] == pytest.approx(2 / 3)
    assert s["accuracy"] == pytest.approx(0.5) and s["ref_accuracy"] == pytest.approx(2 / 3)
    # ints outside the label set (e.g. a token id) and bools are out of class too.
    s = glue_score("mnli", [0, 2, 5, 1, True], [0, 2, 1, 0, 1])
    assert (
        s["out_of_class"] == 2 and s["accuracy"] == pytest.approx(2 / 5) and s["ref_accuracy"] == pytest.approx(2 / 3)
    )
    s = glue_score("cola", [1, 0, 1, 0], [1, 0, 1, 0])
    assert s["matthews_correlation"] == pytest.approx(1.0) and s["score"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown GLUE task 'boolq'"):
        glue_score("boolq", [0], [0])


def test_glue_score_stsb():
    s = glue_score("stsb", ["1.0", "oops", "3.0", "4.0"], [1.0, 2.0, 3.0, 4.0])
    assert s["out_of_class"] == 1
    assert s["ref_pearson"] == pytest.approx(1.0) and s["ref_spearman"] == pytest.approx(1.0)
    assert s["pearson"] == pytest.approx(pearson([1.0, 0.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]))
    assert s["score"] == s["pearson"] < 1.0


def test_rouge_identical_and_by_hand():
    r = rouge(["the cat sat on the mat"], [["the cat sat on the mat"]])
    assert all(v == pytest.approx(100.0) for v in r.values()) and set(r) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    r = rouge(["the cat"], ["the cat sat"])
    # unigrams P 1, R 2/3 -> F 0.8; bigrams P 1, R 1/2 -> F 2/3; LCS 2 -> 0.8.
    assert (
        r["rouge1"] == pytest.approx(80.0)
        and r["rouge2"] == pytest.approx(200 / 3)
        and r["rougeL"] == pytest.approx(80.0)
    )
    # use_stemmer=True: "cats running" matches "cat run".
    assert rouge(["cats running"], [["cat run"]])["rouge1"] == pytest.approx(100.0)
    # With several references the best one counts; the mean runs over examples.
    r = rouge(["a b", "x y"], [["q", "a b"], ["z w"]])
    assert r["rouge1"] == pytest.approx(50.0)


def test_bleu_by_hand():
    assert bleu(["the cat sat on the mat"], [["the cat sat on the mat"]]) == pytest.approx(100.0)
    # Precisions 5/6, 3/5, 2/4, 1/3, no brevity penalty -> (1/12) ** (1/4).
    assert bleu(["the cat sat on the mat"], [["the cat sat on a mat"]]) == pytest.approx(
        100 * (1 / 12) ** 0.25, abs=1e-6
    )
    # Multi-reference with different counts per example: each hypothesis matches one of its references.
    assert bleu(["a b c d e", "v w x y z"], [["q r s", "a b c d e"], ["v w x y z"]]) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="non-empty list"):
        bleu(["a"], [[]])


def test_meteor_without_wordnet_returns_reason(monkeypatch, tmp_path):
    import nltk
    from nltk.corpus import wordnet

    if type(wordnet).__name__ != "LazyCorpusLoader":
        pytest.skip("WordNet is already loaded in this process")
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    value, reason = meteor(["a b"], [["a b"]])
    assert value is None and "WordNet" in reason
    scores = generation_scores("dart", ["a b c d"], [["a b c d"]])
    assert scores["meteor"] is None and "WordNet" in scores["meteor_unavailable"]
    assert scores["bleu"] == pytest.approx(100.0)


def test_meteor_with_wordnet():
    from nltk.corpus import wordnet

    try:
        wordnet.ensure_loaded()
    except LookupError:
        pytest.skip("nltk WordNet data is not installed")
    value, reason = meteor(["the cat sat on the mat"], [["a dog ran", "the cat sat on the mat"]])
    assert reason is None and 99.0 < value <= 100.0


def test_generation_scores_samsum_is_rouge():
    assert set(generation_scores("samsum", ["hi there"], [["hi there"]])) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}


def test_missing_metric_package_is_named_before_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run scored with ROUGE fails before it trains when rouge-score is missing, naming the task and the package."""
    import importlib.util

    from ssmtune.cli.args import TrainArgs
    from ssmtune.cli.commands import validate_train_args
    from ssmtune.eval.metrics import require_metric_packages

    require_metric_packages(["rouge", "bleu", "accuracy", "meteor"])  # installed in the test environment
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "rouge_score" else real(name, *a))
    with pytest.raises(ImportError, match="task 'wn-define' is scored with 'rouge', which needs the 'rouge_score'"):
        require_metric_packages(("rouge",), "wn-define")
    require_metric_packages(("accuracy", "bleu"))  # the others are unaffected
    from ssmtune.data import TaskConfig

    with pytest.raises(ImportError, match="pip install 'rouge-score==0.1.2'"):
        validate_train_args(TrainArgs(model="builtin:mamba-tiny", data=TaskConfig(task="wn-define")))
    validate_train_args(TrainArgs(model="builtin:mamba-tiny", data=TaskConfig(task="wn-category")))
