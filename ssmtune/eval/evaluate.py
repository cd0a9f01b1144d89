"""Evaluate a model (with its adapter) on a task split; the result is a JSON-ready dict.

- every mode: the teacher-forced loss over target tokens (``loss``);
- ``classification`` (GLUE, docs/methods.md §9): the argmax over the *full* vocabulary at the label position of a
  teacher-forced pass, decoded, then ``glue_score`` (strict metrics, reference-style ``ref_*`` ones that drop
  out-of-class predictions, and ``out_of_class``); non-GLUE classification tasks get accuracy;
- ``generation`` (DART, SAMSum, Spider, user tasks): beam search (``num_beams`` 5 as in the papers) or greedy via
  ``model.generate``, then ``generation_scores`` (BLEU + METEOR for DART, ROUGE otherwise).

``score`` is the task's headline metric, so ``best_metric: score`` works for every task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ssmtune.data import Collator, TaskConfig, TokenizedDataset, get_task, load_examples, tokenize_examples
from ssmtune.eval.generation import complete_batch
from ssmtune.eval.metrics import GLUE_NUM_LABELS, generation_scores, glue_score
from ssmtune.models.lm import token_loss


@dataclass(kw_only=True)
class EvalConfig:
    """How a fine-tuned model is evaluated (every epoch during training, and by `ssmtune eval`)."""

    mode: Literal["auto", "classification", "generation", "loss", "none"] = "auto"
    """`classification`: teacher-forced argmax over the vocabulary at the label position (GLUE); `generation`:
    decode and score with ROUGE/BLEU/METEOR; `loss`: teacher-forced loss only; `auto`: from the task's kind;
    `none`: no evaluation during training."""
    split: Literal["train", "validation", "test"] = "validation"
    """Split to evaluate on."""
    batch_size: int = 8
    """Examples per forward pass of the teacher-forced evaluation, and prompts per `generate` call of generation
    (each with `num_beams` rows; every prompt gets what it would get alone)."""
    max_examples: int | None = None
    """Evaluate on the first N examples only. Default: `None`, all."""
    num_beams: int = 5
    """Beam width of generation-based evaluation (5 in the papers; 1 = greedy)."""
    max_new_tokens: int = 128
    """Longest generated continuation."""
    min_new_tokens: int = 5
    """Shortest generated continuation (the papers' min_length 5)."""
    length_penalty: float = 1.0
    """Beam scores are divided by length**length_penalty (length-normalised beam scoring)."""
    max_length: int | None = None
    """Cut evaluation inputs from the left to fit this many tokens. Default: `None`, no limit."""
    cuda_graph: bool | None = None
    """Generation decodes from captured CUDA graphs (docs/serving.md, Graphed decoding): default on CUDA where the
    model supports it; `true` insists, `false`: eager steps (the same tokens)."""

    def __post_init__(self) -> None:
        if self.num_beams < 1:
            raise ValueError(f"eval.num_beams must be >= 1, got {self.num_beams!r}")
        if self.batch_size < 1:
            raise ValueError(f"eval.batch_size must be >= 1, got {self.batch_size!r}")
        if self.max_examples is not None and self.max_examples < 1:
            raise ValueError(f"eval.max_examples must be >= 1, got {self.max_examples!r}")


HEADLINE = {"dart": "bleu", "samsum": "rougeL", "spider": "execution_accuracy", "jsonl": "rougeL"}


def resolve_mode(task: str, mode: str) -> str:
    if mode != "auto":
        return mode
    kind = get_task(task).kind
    return {"classification": "classification", "generation": "generation"}.get(kind, "loss")


def load_eval_dataset(task_cfg: TaskConfig, tokenizer, config: EvalConfig) -> TokenizedDataset:
    """The evaluation split, one example per record (all references kept), tokenised."""
    examples = load_examples(task_cfg, config.split, expand_references=False)
    if config.max_examples is not None:
        examples = examples[: config.max_examples]
    task = get_task(task_cfg.task)
    return tokenize_examples(
        examples, tokenizer, add_eos=task.add_eos, max_length=config.max_length, length_filter=task_cfg.length_filter
    )


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def teacher_forced(model: nn.Module, dataset: TokenizedDataset, batch_size: int) -> tuple[float, list[int]]:
    """(mean loss over target tokens, argmax token id at each example's first label position)."""
    collate = Collator(dataset.pad_token_id)
    device = _device(model)
    loss_sum, n_tok, argmax = 0.0, 0, []
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        logits = model(ids, attention_mask=mask).logits  # [B, L, V]
        s, n = token_loss(logits, batch["labels"].to(device))
        loss_sum, n_tok = loss_sum + float(s), n_tok + n
        # The logits at position prompt_length - 1 predict the first target token (the label digit).
        pos = (batch["prompt_lengths"] - 1).to(device)  # [B]
        argmax += logits[torch.arange(len(pos), device=device), pos].argmax(-1).tolist()
    return (loss_sum / n_tok if n_tok else math.nan), argmax


def evaluate(
    model: nn.Module,
    tokenizer,
    task_cfg: TaskConfig,
    config: EvalConfig,
    *,
    dataset: TokenizedDataset | None = None,
    num_samples: int = 3,
) -> dict[str, Any]:
    """Evaluate ``model`` on ``task_cfg``'s split; returns metrics, ``score`` and a few sample predictions."""
    task_name = get_task(task_cfg.task).name
    mode = resolve_mode(task_name, config.mode)
    if dataset is None:
        dataset = load_eval_dataset(task_cfg, tokenizer, config)
    was_training = model.training
    model.eval()
    try:
        loss, argmax = teacher_forced(model, dataset, config.batch_size)
        result: dict[str, Any] = {"task": task_name, "split": config.split, "mode": mode, "loss": loss,
                                  "num_examples": len(dataset)}  # fmt: skip
        samples = []
        if mode == "classification":
            preds = [tokenizer.decode([t]).strip() for t in argmax]
            labels = [dataset.example(i)["label"] for i in range(len(dataset))]
            if task_name in GLUE_NUM_LABELS:
                result.update(glue_score(task_name, preds, labels))
            else:
                result["accuracy"] = sum(p == str(g) for p, g in zip(preds, labels)) / max(len(labels), 1)
                # strict scoring: an answer outside the label set is wrong; say how many there were
                label_set = {str(i) for i in range(num_labels)} if (num_labels := getattr(get_task(task_name),
                             "num_labels", None)) else {str(g) for g in labels}  # fmt: skip
                result["out_of_class"] = sum(p not in label_set for p in preds)
                result["score"] = result["accuracy"]
            samples = [{"prediction": p, "label": g} for p, g in zip(preds[:num_samples], labels)]
        elif mode == "generation":
            prompts = [dataset[i]["input_ids"][: dataset[i]["prompt_length"]] for i in range(len(dataset))]
            preds = [p.strip() for p in complete_batch(
                model, tokenizer, prompts, batch_size=config.batch_size, max_new_tokens=config.max_new_tokens,
                num_beams=config.num_beams, min_new_tokens=config.min_new_tokens,
                length_penalty=config.length_penalty, cuda_graph=config.cuda_graph)]  # fmt: skip
            refs = []
            for i in range(len(dataset)):
                ex = dataset.example(i)
                refs.append(ex.get("references") or [ex["target"]])
            scores = generation_scores(task_name, preds, refs)
            if task_name == "spider":
                # execution accuracy and exact-set match against the released SQL, on the example's sqlite file
                from ssmtune.eval.spider import spider_scores

                exs = [dataset.example(i) for i in range(len(dataset))]
                db_dir = Path(exs[0]["db_path"]).parent.parent
                scores.update(spider_scores(preds, [e["gold_sql"] for e in exs], [e["db_id"] for e in exs], db_dir))
            result.update(scores)
            head = HEADLINE.get(task_name, "rougeL")
            result["score"] = scores.get(head) if scores.get(head) is not None else next(iter(scores.values()))
            samples = [{"prediction": p, "references": r[:2]} for p, r in zip(preds[:num_samples], refs)]
        else:
            result["score"] = -loss
        result["samples"] = samples
    finally:
        model.train(was_training)
    return result
