"""Evaluation metrics: GLUE scores, generation scores (ROUGE, BLEU, METEOR) and Spider text-to-SQL scores."""

from ssmtune.eval.metrics import (
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
from ssmtune.eval.spider import exact_set_match, execute_sql, execution_match, spider_scores

__all__ = [
    "accuracy",
    "bleu",
    "exact_set_match",
    "execute_sql",
    "execution_match",
    "f1_binary",
    "generation_scores",
    "glue_score",
    "matthews_corrcoef",
    "meteor",
    "pearson",
    "rouge",
    "spearman",
    "spider_scores",
]
