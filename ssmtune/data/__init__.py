"""Tasks, prompt formats, tokenised datasets and data loaders (docs/methods.md §9)."""

from ssmtune.data.sources import find_split_file, load_hub_split, read_records
from ssmtune.data.tasks import (
    GLUE_INSTRUCTIONS,
    SEP,
    Task,
    TaskConfig,
    get_task,
    list_tasks,
    load_examples,
    register_task,
    spider_schema,
    train_val_split,
)
from ssmtune.data.tokenize import (
    IGNORE_INDEX,
    Collator,
    PackedRowsCollator,
    PackingCollator,
    ResumableBatchSampler,
    TokenizedDataset,
    TokenizeStats,
    make_dataloader,
    tokenize_examples,
)

__all__ = [
    "GLUE_INSTRUCTIONS",
    "IGNORE_INDEX",
    "SEP",
    "Collator",
    "PackedRowsCollator",
    "PackingCollator",
    "ResumableBatchSampler",
    "Task",
    "TaskConfig",
    "TokenizeStats",
    "TokenizedDataset",
    "find_split_file",
    "get_task",
    "list_tasks",
    "load_examples",
    "load_hub_split",
    "make_dataloader",
    "read_records",
    "register_task",
    "spider_schema",
    "tokenize_examples",
    "train_val_split",
]

# registers the built-in WordNet tasks
from ssmtune.data import builtin as _builtin  # noqa: F401
