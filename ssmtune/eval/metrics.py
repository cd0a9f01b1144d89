"""Task metrics: GLUE classification scores (plain numpy) and generation scores through their libraries.

Accuracy, F1, Matthews correlation, Pearson and Spearman are computed here. ROUGE comes from `rouge-score`,
BLEU from `sacrebleu` and METEOR from nltk (only when WordNet data is installed): the `[eval]` extra. Generation
scores are on a 0-100 scale (identical strings score 100 for ROUGE and BLEU).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

# GLUE label sets; STS-B is a regression on [0, 5].
GLUE_NUM_LABELS = {"rte": 2, "mrpc": 2, "cola": 2, "sst2": 2, "qnli": 2, "qqp": 2, "mnli": 3, "wnli": 2}
GLUE_MAIN_METRIC = {"cola": "matthews_correlation", "stsb": "pearson"}


def accuracy(preds: Sequence, labels: Sequence) -> float:
    preds, labels = np.asarray(preds), np.asarray(labels)
    _check_lengths(preds, labels)
    return float(np.mean(preds == labels)) if len(labels) else 0.0


def f1_binary(preds: Sequence[int], labels: Sequence[int], *, positive: int = 1) -> float:
    """F1 of the positive class (1, as GLUE's MRPC/QQP); 0 when there is no true or predicted positive."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    _check_lengths(preds, labels)
    tp = int(np.sum((preds == positive) & (labels == positive)))
    fp = int(np.sum((preds == positive) & (labels != positive)))
    fn = int(np.sum((preds != positive) & (labels == positive)))
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def matthews_corrcoef(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation (the multiclass R_K of Gorodkin, = the binary phi coefficient); 0 when undefined."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    _check_lengths(preds, labels)
    classes = np.union1d(preds, labels)
    p = np.searchsorted(classes, preds)
    t = np.searchsorted(classes, labels)
    k = len(classes)
    conf = np.zeros((k, k), dtype=np.float64)
    np.add.at(conf, (t, p), 1)
    t_sum, p_sum = conf.sum(1), conf.sum(0)
    n, correct = conf.sum(), np.trace(conf)
    cov_tp = correct * n - t_sum @ p_sum
    cov_pp = n * n - p_sum @ p_sum
    cov_tt = n * n - t_sum @ t_sum
    if cov_pp == 0 or cov_tt == 0:
        return 0.0
    return float(cov_tp / np.sqrt(cov_tt * cov_pp))


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    _check_lengths(x, y)
    xc, yc = x - x.mean(), y - y.mean()
    denom = np.sqrt((xc @ xc) * (yc @ yc))
    return float(xc @ yc / denom) if denom > 0 else 0.0


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties sharing their average rank (as scipy.stats.rankdata)."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    start = 0
    for end in range(1, len(x) + 1):
        if end == len(x) or sorted_x[end] != sorted_x[start]:
            ranks[order[start:end]] = (start + end + 1) / 2
            start = end
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    _check_lengths(x, y)
    return pearson(_ranks(x), _ranks(y))


def _check_lengths(a: np.ndarray, b: np.ndarray) -> None:
    if len(a) != len(b):
        raise ValueError(f"predictions and labels differ in length: {len(a)} vs {len(b)}")


def _parse_class(pred, num_labels: int) -> int | None:
    """A prediction as a class id, or None when it is not one (e.g. the token "7" or " yes")."""
    if isinstance(pred, (bool, np.bool_)):
        return None
    if isinstance(pred, (int, np.integer)):
        return int(pred) if 0 <= pred < num_labels else None
    if isinstance(pred, str) and pred in {str(i) for i in range(num_labels)}:
        return int(pred)
    return None


def _parse_score(pred) -> float | None:
    try:
        value = float(pred)
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) else None


def _classification_metrics(task: str, preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    if task == "cola":
        return {"matthews_correlation": matthews_corrcoef(preds, labels), "accuracy": accuracy(preds, labels)}
    out = {"accuracy": accuracy(preds, labels)}
    if task in ("mrpc", "qqp"):
        out["f1"] = f1_binary(preds, labels)
    return out


def glue_score(task: str, preds: Sequence, labels: Sequence) -> dict[str, float | int]:
    """GLUE metrics in two flavours, plus the count of out-of-class predictions (METHODS.md §8.1).

    Predictions are class ids or decoded strings ("0", "1", ...; the argmax token at the label position). A
    prediction outside the label set is out of class:
    - strict metrics (`accuracy`, `f1`, `matthews_correlation`): it counts as wrong. It is replaced by a wrong class
      (for binary tasks the other class, so it becomes a false negative or a false positive; for MNLI
      `(label + 1) % 3`);
    - reference-style metrics (`ref_` prefix): it is dropped, as the reference code does, which inflates scores.
    STS-B: predictions are parsed as floats; an unparsable one is out of class and strictly scored as 0.0.
    Returns also `out_of_class`, `num_examples`, and `score` (the task's main strict metric: MCC for CoLA,
    Pearson for STS-B, accuracy otherwise).
    """
    task = task.lower().replace("-", "")
    labels_arr = np.asarray(labels)
    if len(preds) != len(labels_arr):
        raise ValueError(f"predictions and labels differ in length: {len(preds)} vs {len(labels_arr)}")
    if task == "stsb":
        parsed = [_parse_score(p) for p in preds]
        valid = np.array([v is not None for v in parsed], dtype=bool)
        strict = np.array([0.0 if v is None else v for v in parsed])
        gold = labels_arr.astype(np.float64)
        out: dict[str, float | int] = {"pearson": pearson(strict, gold), "spearman": spearman(strict, gold)}
        kept = strict[valid], gold[valid]
        out.update({"ref_pearson": pearson(*kept), "ref_spearman": spearman(*kept)})
    else:
        if task not in GLUE_NUM_LABELS:
            raise ValueError(f"unknown GLUE task {task!r}; known: {sorted(GLUE_NUM_LABELS) + ['stsb']}")
        k = GLUE_NUM_LABELS[task]
        gold = labels_arr.astype(np.int64)
        parsed = [_parse_class(p, k) for p in preds]
        valid = np.array([v is not None for v in parsed], dtype=bool)
        strict = np.array([(g + 1) % k if v is None else v for v, g in zip(parsed, gold)], dtype=np.int64)
        out = _classification_metrics(task, strict, gold)
        ref = _classification_metrics(task, strict[valid], gold[valid])
        out.update({f"ref_{name}": value for name, value in ref.items()})
    out["out_of_class"] = int((~valid).sum())
    out["num_examples"] = len(labels_arr)
    out["score"] = out[GLUE_MAIN_METRIC.get(task, "accuracy")]
    return out


def _check_refs(preds: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(preds) != len(references):
        raise ValueError(f"predictions and references differ in length: {len(preds)} vs {len(references)}")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"references[{i}] must be a non-empty list of strings, got {refs!r}")


# metric -> the package it cannot be computed without (METEOR is left out: without nltk it reports why, not fails)
METRIC_PACKAGES = {"rouge": ("rouge_score", "rouge-score==0.1.2"), "bleu": ("sacrebleu", "sacrebleu>=2.4")}


def require_metric_packages(metrics: Sequence[str], task: str = "") -> None:
    """Raise ImportError naming the missing package if a metric of ``metrics`` could not be computed.

    Called before training, so a run does not train for minutes and then fail at its first evaluation.
    """
    import importlib.util

    for metric in metrics:
        if metric in METRIC_PACKAGES:
            module, spec = METRIC_PACKAGES[metric]
            if importlib.util.find_spec(module) is None:
                what = f"task {task!r} is scored with {metric!r}" if task else f"metric {metric!r}"
                raise ImportError(
                    f"{what}, which needs the {module!r} package: pip install '{spec}' (or ssmtune[eval])"
                )


def rouge(preds: Sequence[str], references: Sequence[Sequence[str]] | Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F-measure x 100 (rouge-score, `use_stemmer=True`).

    With several references the best-scoring one counts (rouge-score's `score_multi`). ROUGE-Lsum treats newlines
    as sentence breaks; no sentence splitter is applied.
    """
    from rouge_score import rouge_scorer

    references = [[r] if isinstance(r, str) else list(r) for r in references]
    _check_refs(preds, references)
    keys = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    scorer = rouge_scorer.RougeScorer(keys, use_stemmer=True)
    totals = dict.fromkeys(keys, 0.0)
    for pred, refs in zip(preds, references):
        scores = scorer.score_multi(refs, pred) if len(refs) > 1 else scorer.score(refs[0], pred)
        for key in keys:
            totals[key] += scores[key].fmeasure
    n = max(len(preds), 1)
    return {key: 100.0 * totals[key] / n for key in keys}


def bleu(preds: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Multi-reference corpus BLEU (sacrebleu defaults: 13a tokenisation, exp smoothing), 0-100.

    Examples may have different numbers of references (missing ones are passed as None).
    """
    import sacrebleu

    _check_refs(preds, references)
    max_refs = max(len(r) for r in references)
    streams = [[refs[j] if j < len(refs) else None for refs in references] for j in range(max_refs)]
    return float(sacrebleu.corpus_bleu(list(preds), streams).score)


def meteor(preds: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float | None, str | None]:
    """Mean nltk METEOR x 100 over examples (best reference per example), or (None, reason) without WordNet.

    Texts are lowercased and split on whitespace (nltk's word_tokenize would need the punkt data). nltk never
    downloads here: install WordNet with `python -m nltk.downloader wordnet` or point NLTK_DATA at a copy.
    """
    _check_refs(preds, references)
    try:
        from nltk.corpus import wordnet
        from nltk.translate.meteor_score import meteor_score
    except ImportError as e:
        return None, f"nltk is not installed ({e})"
    try:
        wordnet.ensure_loaded()
    except LookupError:
        return None, "nltk WordNet data not found (python -m nltk.downloader wordnet, or set NLTK_DATA)"
    total = 0.0
    for pred, refs in zip(preds, references):
        total += meteor_score([r.lower().split() for r in refs], pred.lower().split())
    return 100.0 * total / max(len(preds), 1), None


def generation_scores(task: str, preds: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float | None]:
    """The protocol's scores for a generation task: DART BLEU + METEOR, SAMSum (and others) ROUGE."""
    if task == "dart":
        value, reason = meteor(preds, references)
        out: dict = {"bleu": bleu(preds, references), "meteor": value}
        if reason is not None:
            out["meteor_unavailable"] = reason
        return out
    return rouge(preds, references)


def finite_json(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that always writes valid JSON: a NaN or infinite float becomes ``null``, and a top-level
    ``non_finite`` mapping (for a dict) says where and what it was, e.g. ``{"loss": "nan"}``."""
    found: dict[str, str] = {}

    def clean(x: Any, where: str) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            found[where or "value"] = str(x)
            return None
        if isinstance(x, dict):
            return {k: clean(v, f"{where}.{k}" if where else str(k)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v, f"{where}[{i}]") for i, v in enumerate(x)]
        return x

    out = clean(obj, "")
    if found and isinstance(out, dict):
        out["non_finite"] = found
    return json.dumps(out, allow_nan=False, **kwargs)
