"""The built-in offline tasks (ssmtune/builtin/tasks/, built from WordNet 3.0 by scripts/build_builtin_data.py).

Registered as "wn-pos" (gloss -> part of speech, 4 classes, accuracy), "wn-category" (10-way gloss classification),
"wn-define" (word -> gloss, ROUGE-L) and "wn-pos-long" (part of speech of the last of 4-24 glosses). They read the packaged files unless `data_dir` or
`data_files` point elsewhere, and have a fixed train/validation/test split.
"""

from __future__ import annotations

from typing import ClassVar

from ssmtune.builtin.wordnet import load_task
from ssmtune.data.tasks import Task, TaskConfig, register_task


class BuiltinTask(Task):
    supports_train_val_split: ClassVar[bool] = False
    hub_id = None

    def read(self, official: str, cfg: TaskConfig) -> tuple[list[dict], str]:
        if cfg.data_dir or cfg.data_files:
            return super().read(official, cfg)
        return load_task(self.name, official), f"builtin:{self.name}/{official}"

    def to_examples(self, record: dict, cfg: TaskConfig, *, expand_references: bool, where: str) -> list[dict]:
        ex = {"input": record["input"], "target": record["target"], "prefix": ""}
        if "label" in record:
            ex["label"] = record["label"]
        if self.kind == "generation":
            ex["references"] = [record["target"]]
        return [ex]


class WordNetCategory(BuiltinTask):
    name = "wn-category"
    kind = "classification"
    add_eos = False
    metrics = ("accuracy",)
    num_labels: ClassVar[int] = 10


class WordNetDefine(BuiltinTask):
    name = "wn-define"
    kind = "generation"
    add_eos = True
    metrics = ("rouge",)


class WordNetPos(WordNetCategory):
    name = "wn-pos"
    num_labels = 4


class WordNetPosLong(WordNetPos):
    name = "wn-pos-long"


for _task in (WordNetPos(), WordNetCategory(), WordNetDefine(), WordNetPosLong()):
    register_task(_task)
