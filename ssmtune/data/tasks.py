"""Task registry: raw records -> examples with the exact prompt formats of the reference code (docs/methods.md §9).

Every example is a dict with
- `input`: the full prompt string, separators included;
- `target`: the string the model learns to produce (EOS is added by id at tokenisation for generation tasks);
- `prefix`: the instruction part at the start of `input` (the reference tokenises it separately; may be "");
- `label` (classification/regression) or `references` (generation: every reference, for multi-reference scoring);
- task extras (Spider: `db_id`, `db_path`, `gold_sql`).

Splits (`TaskConfig.split_scheme`):
- `"official"` (default, ssm-state-tuning): train = official train, validation = official validation (MNLI: matched then
  mismatched, scored as one set), test = official test (GLUE test sets have no labels and are rejected).
- `"train_val_split"` (ssm-peft's `-tvt` datasets: GLUE and Spider): train / validation = an 80/20 split of the official
  train set, drawn exactly as `datasets.Dataset.train_test_split(test_size=0.2, seed=123)` (numpy `default_rng(seed)`
  permutation, validation = its first ceil(0.2 n) indices); test = the official validation set. DART, SAMSum and
  user datasets keep their official splits under this scheme, as in ssm-peft.
The official split is the default because the papers report validation numbers on it ([SDT] reports the best
epoch's validation metric); the 80/20 scheme leaves the official validation set untouched for a final test.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np

from ssmtune.data.sources import find_split_file, jsonl_line, load_hub_split, read_records

SEP = "###"
Split = Literal["train", "validation", "test"]


@dataclass(kw_only=True)
class TaskConfig:
    """Where a task's data lives and how it is split and prompted."""

    task: str
    """Registered task name (see `list_tasks()`), e.g. "rte", "mnli", "dart", "samsum", "spider", "jsonl"."""
    data_dir: str | None = None
    """Local folder with one file per split (`train.jsonl`, `validation.tsv`, `dev.json`, ...; Spider: its release
    layout). Default: `None`, meaning the hub (needs `datasets` and a network)."""
    data_files: dict[str, str | list[str]] | None = None
    """Explicit files per official split ("train", "validation", "test"), overriding the lookup in `data_dir`."""
    source: Literal["auto", "local", "hub"] = "auto"
    """"auto": local when `data_dir` or `data_files` is given, else the hub."""
    hub_id: str | None = None
    """Override the task's hub dataset id."""
    split_scheme: Literal["official", "train_val_split"] = "official"
    """"official" (ssm-state-tuning) or "train_val_split" (ssm-peft: 80/20 split of train, official validation as test)."""
    split_seed: int = 123
    """Seed of the 80/20 split (ssm-peft uses 123; 321, 532, 523 exist)."""
    val_fraction: float = 0.2
    """Fraction of the official train set held out as validation under "train_val_split"."""
    prompt_style: Literal["state_tuning", "peft"] = "state_tuning"
    """GLUE prompt: "state_tuning" = instruction + s1 [+ ### + s2] + ###; "peft" = instruction + ### + s1 [+ ### + s2] + ###."""
    input_field: str = "input"
    """User datasets ("jsonl" task): the record field holding the input text."""
    target_field: str = "target"
    """User datasets: the field holding the target (a string, or a list of reference strings)."""
    references_field: str | None = None
    """User datasets: an optional field with all references for evaluation. Default: the target(s)."""
    instruction: str = ""
    """User datasets: text put before the input (tokenised separately, like the reference's prompt prefix)."""
    separator: str = SEP
    """User datasets: text appended to the input before the target."""
    max_examples: int | None = None
    """Keep only the first this many records of a split (after splitting). Default: all."""
    length_filter: int | None = None
    """Drop examples whose input (without its instruction prefix) + target exceed this many tokens, in training and
    evaluation alike (Spider's reference runs: 1536). Default: `None`, keep all."""
    packing: bool = False
    """Training only: pack examples instead of padding each batch to its longest (needs `--max_length`, which every
    example must fit); each example still runs from its own initial states and its loss is unchanged
    (docs/training.md, "Packed sequences"). How: `packing_layout`."""
    packing_layout: Literal["rows", "cu_seqlens"] = "rows"
    """With `packing`: `rows` fills each step's `batch_size` rows of `max_length` (+ 3, rounded up to 64) tokens
    with as many examples as fit, each in a slot that restarts the scan (`resets`): static shapes, so the step is
    CUDA-graphed by default on ssmtune's Mamba models; `cu_seqlens` lays each micro-batch's examples end to end in one
    row (a shape per batch, eager; the layout the transformers hybrids take)."""

    def __post_init__(self) -> None:
        if self.source not in ("auto", "local", "hub"):
            raise ValueError(f"source must be 'auto', 'local' or 'hub', got {self.source!r}")
        if self.split_scheme not in ("official", "train_val_split"):
            raise ValueError(f"split_scheme must be 'official' or 'train_val_split', got {self.split_scheme!r}")
        if self.packing_layout not in ("rows", "cu_seqlens"):
            raise ValueError(f"packing_layout must be 'rows' or 'cu_seqlens', got {self.packing_layout!r}")
        if self.prompt_style not in ("state_tuning", "peft"):
            raise ValueError(f"prompt_style must be 'state_tuning' or 'peft', got {self.prompt_style!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in (0, 1), got {self.val_fraction!r}")
        if self.length_filter is not None and self.length_filter < 1:
            raise ValueError(f"length_filter must be >= 1, got {self.length_filter!r}")
        if self.max_examples is not None and self.max_examples < 1:
            raise ValueError(f"max_examples must be >= 1, got {self.max_examples!r}")


def train_val_split(n: int, *, val_fraction: float = 0.2, seed: int = 123) -> tuple[list[int], list[int]]:
    """(train, val) indices exactly as `datasets.Dataset.train_test_split(test_size=val_fraction, seed=seed)`."""
    n_val = math.ceil(val_fraction * n)
    perm = np.random.default_rng(seed).permutation(n)
    return perm[n_val:].tolist(), perm[:n_val].tolist()


def _field(record: dict, key: str, task: str, where: str):
    if key not in record:
        raise ValueError(f"{task}: a record of {where} has no field {key!r}; its fields are {sorted(record)}")
    return record[key]


class Task:
    """A task: how to find its records and how to turn one record into examples."""

    name: ClassVar[str]
    kind: ClassVar[Literal["classification", "regression", "generation"]]
    add_eos: ClassVar[bool]
    """Whether tokenisation appends EOS to the target (generation tasks) or not (GLUE digit labels)."""
    metrics: ClassVar[tuple[str, ...]]
    hub_id: ClassVar[str | None] = None
    hub_config: ClassVar[str | None] = None
    supports_train_val_split: ClassVar[bool] = True
    split_stems: ClassVar[dict[str, list[str]]] = {
        "train": ["train"],
        "validation": ["validation", "dev", "val"],
        "test": ["test"],
    }
    hub_splits: ClassVar[dict[str, list[str]]] = {"train": ["train"], "validation": ["validation"], "test": ["test"]}

    def resolve_split(self, split: str, cfg: TaskConfig) -> tuple[str, str | None]:
        """(official split, part of it) for a logical split; part is "train"/"val" under the 80/20 scheme."""
        if split not in ("train", "validation", "test"):
            raise ValueError(f"split must be 'train', 'validation' or 'test', got {split!r}")
        if cfg.split_scheme == "train_val_split" and self.supports_train_val_split:
            return {"train": ("train", "train"), "validation": ("train", "val"), "test": ("validation", None)}[split]
        return split, None

    def read(self, official: str, cfg: TaskConfig) -> tuple[list[dict], str]:
        """Records of an official split and a description of where they came from."""
        local = cfg.source == "local" or (cfg.source == "auto" and (cfg.data_dir or cfg.data_files))
        if local:
            paths = self.local_files(official, cfg)
            records = [r for p in paths for r in self.read_file(p)]
            return records, ", ".join(str(p) for p in paths)
        hub_id = cfg.hub_id or self.hub_id
        if hub_id is None:
            raise ValueError(f"task {self.name!r} has no hub dataset; pass data_dir or data_files")
        records = [r for s in self.hub_splits[official] for r in load_hub_split(hub_id, self.hub_config, s)]
        return records, f"hub:{hub_id}/{official}"

    def local_files(self, official: str, cfg: TaskConfig) -> list[Path]:
        if cfg.data_files and official in cfg.data_files:
            files = cfg.data_files[official]
            paths = [Path(f) for f in ([files] if isinstance(files, str) else files)]
            for p in paths:
                if not p.is_file():
                    raise FileNotFoundError(
                        f"{self.name}: dataset file {str(p)!r} for split {official!r} does not exist"
                    )
            return paths
        if cfg.data_dir is None:
            raise ValueError(f"{self.name}: no file for split {official!r}: pass data_dir or data_files[{official!r}]")
        return [find_split_file(cfg.data_dir, self.split_stems[official])]

    def read_file(self, path: Path) -> list[dict]:
        return read_records(path)

    def locate(self, official: str, cfg: TaskConfig, index: int) -> str:
        """Where record ``index`` of ``read(official, cfg)`` came from, for error messages: ``<file> line <n>`` for
        JSON lines, ``<file> record <n>`` otherwise (re-reads the files: only called when something is wrong)."""
        if cfg.source == "local" or (cfg.source == "auto" and (cfg.data_dir or cfg.data_files)):
            for path in self.local_files(official, cfg):
                n = len(self.read_file(path))
                if index < n:
                    line = jsonl_line(path, index) if path.suffix.lower() == ".jsonl" else None
                    return f"{path} line {line}" if line is not None else f"{path} record {index + 1}"
                index -= n
        return f"record {index + 1} of split {official!r}"

    def to_examples(self, record: dict, cfg: TaskConfig, *, expand_references: bool, where: str) -> list[dict]:
        raise NotImplementedError


_TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add a task instance to the registry under `task.name` (replacing any previous one)."""
    _TASKS[_key(task.name)] = task
    return task


def _key(name: str) -> str:
    return name.lower().replace("-", "")


def list_tasks() -> list[str]:
    return sorted(t.name for t in _TASKS.values())


def get_task(name: str) -> Task:
    key = _key(name)
    if key not in _TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {list_tasks()}")
    return _TASKS[key]


def load_examples(cfg: TaskConfig, split: Split, *, expand_references: bool | None = None) -> list[dict]:
    """Examples of one logical split ("train", "validation" or "test") of a task.

    Args:
        cfg: the task config.
        split: the logical split; see the module docstring for how it maps to files under each split scheme.
        expand_references: one example per reference (training) instead of one example carrying all references
            (evaluation). Default: `True` for "train", else `False`.
    """
    task = get_task(cfg.task)
    official, part = task.resolve_split(split, cfg)
    records, where = task.read(official, cfg)
    index = list(range(len(records)))  # each record's place in its files, to name it in errors
    if part is not None:
        train_idx, val_idx = train_val_split(len(records), val_fraction=cfg.val_fraction, seed=cfg.split_seed)
        index = train_idx if part == "train" else val_idx
    if cfg.max_examples is not None:
        index = index[: cfg.max_examples]
    expand = split == "train" if expand_references is None else expand_references
    examples = []
    for i in index:
        try:
            examples += task.to_examples(records[i], cfg, expand_references=expand, where=where)
        except ValueError as e:
            raise ValueError(f"{e} ({task.locate(official, cfg, i)})") from None
    if not examples:
        raise ValueError(f"{task.name}: split {split!r} from {where} yielded no examples")
    return examples


# GLUE

# PromptBench-style instructions as used by the reference code (microsoft/promptbench task prompts, digits as
# answers). RTE's is quoted verbatim in docs/methods.md §9; STS-B's was written for ssmtune in the same style.
GLUE_INSTRUCTIONS = {
    "rte": "Determine if the given pair of sentences displays entailment or not_entailment. "
    "Respond with '0' if entailment or '1' if not_entailment: ",
    "cola": "Review the sentence below and identify whether its grammar is Unacceptable or Acceptable. "
    "Respond with '0' if Unacceptable or '1' if Acceptable: ",
    "mrpc": "Can the given sentences be considered semantically identical? "
    "Respond with '0' if not_equivalent or '1' if equivalent: ",
    "sst2": "Read the provided excerpt and choose between negative and positive to describe its sentiment. "
    "Respond with '0' if negative or '1' if positive: ",
    "qnli": "Consider the context and question, and indicate if the answer can be logically deduced from the context. "
    "Respond with '0' if entailment or '1' if not_entailment: ",
    "qqp": "Can these two statements be considered equal in meaning? "
    "Respond with '0' if not_equivalent or '1' if equivalent: ",
    "mnli": "Assess the connection between the following sentences and classify it as entailment, neutral, or "
    "contradiction. Respond with '0' if entailment, '1' if neutral or '2' if contradiction: ",
    "wnli": "Identify whether the given pair of sentences demonstrates entailment or not_entailment. "
    "Respond with '0' if not_entailment or '1' if entailment: ",
    "stsb": "Evaluate the semantic similarity of the given pair of sentences. "
    "Respond with a score from '0.0' if unrelated to '5.0' if equivalent, with one decimal: ",
}


class GlueTask(Task):
    """One GLUE task from `nyu-mll/glue` or local files (HF field names, or GLUE's original TSV columns).

    Prompt (ssm-state-tuning): `<instruction><s1>[###<s2>]###`, target = the label digit, no EOS. With
    `prompt_style="peft"` (ssm-peft): `<instruction>###<s1>[###<s2>]###`. STS-B (not in the papers) is a regression:
    its target is the score rounded to one decimal as text ("3.8"), so it is generated, not read from one token.
    Records whose label is missing or -1 (unlabelled test sets) are skipped with a warning.
    """

    hub_id = "nyu-mll/glue"
    add_eos = False

    def __init__(
        self,
        name: str,
        keys: tuple[str, str | None],
        *,
        label_names: tuple[str, ...] | None,
        metrics: tuple[str, ...],
        aliases: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.keys = keys
        self.label_names = label_names
        self.kind = "regression" if label_names is None else "classification"
        self.metrics = metrics
        self.aliases = aliases or {}
        self.hub_config = name
        # Raw GLUE files name their labels in words; digits are the HF ids.
        self.label_words = {w.lower(): i for i, w in enumerate(label_names or ())}
        if name == "mnli":
            self.split_stems = {
                "train": ["train"],
                "validation": ["validation"],
                "validation_matched": ["validation_matched", "dev_matched"],
                "validation_mismatched": ["validation_mismatched", "dev_mismatched"],
                "test": ["test_matched", "test"],
            }
            self.hub_splits = {
                "train": ["train"],
                "validation": ["validation_matched", "validation_mismatched"],
                "test": ["test_matched", "test_mismatched"],
            }

    def local_files(self, official: str, cfg: TaskConfig) -> list[Path]:
        if self.name != "mnli" or official != "validation" or (cfg.data_files and "validation" in cfg.data_files):
            return super().local_files(official, cfg)
        # MNLI validation = matched ∪ mismatched: one combined file, or the two official ones.
        try:
            return super().local_files("validation", cfg)
        except FileNotFoundError:
            return [
                super(GlueTask, self).local_files(s, cfg)[0] for s in ("validation_matched", "validation_mismatched")
            ]

    def read_file(self, path: Path) -> list[dict]:
        if self.name == "cola" and path.suffix in (".tsv", ".txt"):
            # CoLA's raw TSVs have no header: source, label, original label, sentence.
            with path.open(encoding="utf-8-sig") as f:
                first = f.readline().split("\t")
            if "sentence" not in [c.strip() for c in first]:
                return read_records(path, fieldnames=["source", "label", "original_label", "sentence"])
        return read_records(path)

    def _get(self, record: dict, key: str, where: str):
        if key not in record:
            for alias, canonical in self.aliases.items():
                if canonical == key and alias in record:
                    return record[alias]
        return _field(record, key, self.name, where)

    def parse_label(self, value, where: str) -> int | float | None:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if self.kind == "regression":
            return float(value)
        if isinstance(value, str) and value.strip().lower() in self.label_words:
            return self.label_words[value.strip().lower()]
        try:
            label = int(float(value))
        except ValueError:
            raise ValueError(
                f"{self.name}: label {value!r} in {where} is neither a digit nor one of {list(self.label_words)}"
            ) from None
        if label < 0:
            return None
        if label >= len(self.label_names):
            raise ValueError(f"{self.name}: label {value!r} in {where} is out of range 0..{len(self.label_names) - 1}")
        return label

    def to_examples(self, record: dict, cfg: TaskConfig, *, expand_references: bool, where: str) -> list[dict]:
        label = self.parse_label(self._get(record, "label", where), where)
        if label is None:
            warnings.warn(f"{self.name}: skipping an unlabelled record in {where}", stacklevel=2)
            return []
        k1, k2 = self.keys
        body = str(self._get(record, k1, where))
        if k2 is not None:
            body = body + SEP + str(self._get(record, k2, where))
        instruction = GLUE_INSTRUCTIONS[self.name]
        prefix = instruction if cfg.prompt_style == "state_tuning" else instruction + SEP
        target = str(label) if self.kind == "classification" else f"{round(label, 1):.1f}"
        return [{"input": prefix + body + SEP, "target": target, "prefix": prefix, "label": label}]


_BINARY_ENTAIL = ("entailment", "not_entailment")
for _task in (
    GlueTask("rte", ("sentence1", "sentence2"), label_names=_BINARY_ENTAIL, metrics=("accuracy",)),
    GlueTask("qnli", ("question", "sentence"), label_names=_BINARY_ENTAIL, metrics=("accuracy",)),
    GlueTask("wnli", ("sentence1", "sentence2"), label_names=("not_entailment", "entailment"), metrics=("accuracy",)),
    GlueTask(
        "mrpc",
        ("sentence1", "sentence2"),
        label_names=("not_equivalent", "equivalent"),
        metrics=("accuracy", "f1"),
        aliases={"#1 String": "sentence1", "#2 String": "sentence2", "Quality": "label"},
    ),
    GlueTask(
        "qqp",
        ("question1", "question2"),
        label_names=("not_duplicate", "duplicate"),
        metrics=("accuracy", "f1"),
        aliases={"is_duplicate": "label"},
    ),
    GlueTask("cola", ("sentence", None), label_names=("unacceptable", "acceptable"), metrics=("matthews_correlation",)),
    GlueTask("sst2", ("sentence", None), label_names=("negative", "positive"), metrics=("accuracy",)),
    GlueTask(
        "mnli",
        ("premise", "hypothesis"),
        label_names=("entailment", "neutral", "contradiction"),
        metrics=("accuracy",),
        aliases={"sentence1": "premise", "sentence2": "hypothesis", "gold_label": "label"},
    ),
    GlueTask(
        "stsb",
        ("sentence1", "sentence2"),
        label_names=None,
        metrics=("pearson", "spearman"),
        aliases={"score": "label"},
    ),
):
    register_task(_task)


# Generation tasks


def _references(record: dict, task: str, where: str) -> list[str]:
    """DART references: `annotations` as a list of {"text"} dicts (raw release) or {"text": [...]} (HF)."""
    ann = record.get("annotations")
    if isinstance(ann, list):
        return [a["text"] if isinstance(a, dict) else str(a) for a in ann]
    if isinstance(ann, dict):
        return list(ann.get("text", []))
    if "references" in record:
        return list(record["references"])
    if "target" in record:
        return [record["target"]]
    _field(record, "annotations", task, where)
    return []


def _expand(input_: str, prefix: str, refs: list[str], expand_references: bool, **extra) -> list[dict]:
    if expand_references:
        return [{"input": input_, "target": r, "prefix": prefix, "references": [r], **extra} for r in refs]
    return [{"input": input_, "target": refs[0], "prefix": prefix, "references": refs, **extra}]


class DartTask(Task):
    """DART: "Generate text for the following RDF triples:\\n" + " | ".join("s : p : o") + "###" -> text + EOS.

    Training makes one example per reference; evaluation keeps one example per tripleset with all references.
    """

    name = "dart"
    kind = "generation"
    add_eos = True
    metrics = ("bleu", "meteor")
    hub_id = "Yale-LILY/dart"
    supports_train_val_split = False
    split_stems: ClassVar[dict[str, list[str]]] = {
        "train": ["train", "dart-v1.1.1-full-train"],
        "validation": ["validation", "dev", "dart-v1.1.1-full-dev"],
        "test": ["test", "dart-v1.1.1-full-test"],
    }
    instruction = "Generate text for the following RDF triples:\n"

    def to_examples(self, record: dict, cfg: TaskConfig, *, expand_references: bool, where: str) -> list[dict]:
        triples = _field(record, "tripleset", self.name, where)
        refs = [r for r in _references(record, self.name, where) if r]
        if not refs:
            return []
        body = " | ".join(" : ".join(str(x) for x in t) for t in triples)
        return _expand(self.instruction + body + SEP, self.instruction, refs, expand_references)


class SamsumTask(Task):
    """SAMSum: dialogue + "###" -> summary + EOS, with no instruction.

    The [SOT] 1.4B configs evaluate on the **test** split every epoch (docs/methods.md §10.2): pass split="test" to
    reproduce that; "validation" is the official `val.json`.
    """

    name = "samsum"
    kind = "generation"
    add_eos = True
    metrics = ("rouge",)
    hub_id = "Samsung/samsum"
    supports_train_val_split = False

    def to_examples(self, record: dict, cfg: TaskConfig, *, expand_references: bool, where: str) -> list[dict]:
        dialogue = _field(record, "dialogue", self.name, where)
        summary = _field(record, "summary", self.name, where)
        return _expand(str(dialogue) + SEP, "", [str(summary)], expand_references)


def spider_table_str(
    name: str, columns: list[tuple[str, str]], primary: list[str], foreign: list[tuple[str, str]]
) -> str:
    """One table as the reference renders it: "name: col type ,  col type ,  foreign: col from t , ... ,  primary: col"."""
    parts = [f"{c} {t}" for c, t in columns]
    parts.append("foreign: " + " , ".join(f"{c} from {t}" for c, t in foreign))
    parts.append("primary: " + " , ".join(primary))
    return (name + ": " + " ,  ".join(parts)).lower()


def spider_schema(db: dict) -> str:
    """A `tables.json` entry rendered as the reference's schema prompt (tables joined with " | ")."""
    cols, types, tables = db["column_names_original"], db["column_types"], db["table_names_original"]
    out = []
    for t_idx, t_name in enumerate(tables):
        columns = [(name, typ) for (i, name), typ in zip(cols, types) if i == t_idx]
        # Newer tables.json files nest composite keys as lists; flatten them.
        primary = [p for k in db["primary_keys"] for p in ([k] if isinstance(k, int) else k) if cols[p][0] == t_idx]
        primary = [cols[p][1] for p in primary]
        foreign = [(cols[k2][1], tables[cols[k2][0]]) for k1, k2 in db["foreign_keys"] if cols[k1][0] == t_idx]
        out.append(spider_table_str(t_name, columns, primary, foreign))
    return " | ".join(out)


class SpiderTask(Task):
    """Spider text-to-SQL from its release folder: train_spider.json, dev.json, tables.json, database/<db>/<db>.sqlite.

    Prompt: "Create a sql request for the following question and schema:\\n###" + "Question: {q}\\Schema: {schema}\\n"
    + "###" -> lowercased, stripped SQL + EOS. "\\Schema" keeps the reference's typo (a literal backslash). Examples
    carry `db_id`, `db_path` (the sqlite file, for execution accuracy) and `gold_sql` (the original query: lowercasing
    changes string literals, so execution must use the original). The reference's 1536-token length filter is a
    tokenisation option (`length_filter=1536`). Questions may come from the hub (`xlangai/spider`), but `tables.json`
    and the databases must be local (`data_dir`).
    """

    name = "spider"
    kind = "generation"
    add_eos = True
    metrics = ("execution_accuracy", "exact_set_match")
    hub_id = "xlangai/spider"
    split_stems: ClassVar[dict[str, list[str]]] = {
        "train": ["train_spider", "train"],
        "validation": ["dev", "validation"],
        "test": ["test"],
    }
    instruction = "Create a sql request for the following question and schema:\n" + SEP

    def __init__(self) -> None:
        self._schemas: dict[str, dict[str, str]] = {}

    def schemas(self, cfg: TaskConfig) -> dict[str, str]:
        if cfg.data_dir is None:
            raise ValueError("spider: data_dir must point at the Spider folder (tables.json, database/)")
        tables = Path(cfg.data_dir) / "tables.json"
        if not tables.is_file():
            raise FileNotFoundError(f"spider: {str(tables)!r} does not exist (needed for the schema prompt)")
        key = str(tables.resolve())
        if key not in self._schemas:
            self._schemas[key] = {db["db_id"]: spider_schema(db) for db in read_records(tables)}
        return self._schemas[key]

    def to_examples(self, record: dict, cfg: TaskConfig, *, expand_references: bool, where: str) -> list[dict]:
        db_id = _field(record, "db_id", self.name, where)
        question = _field(record, "question", self.name, where)
        query = _field(record, "query", self.name, where)
        schemas = self.schemas(cfg)
        if db_id not in schemas:
            raise ValueError(f"spider: db_id {db_id!r} from {where} is not in tables.json")
        target = query.lower().strip()
        body = f"Question: {question}\\Schema: {schemas[db_id]}\n"
        db_path = Path(cfg.data_dir) / "database" / db_id / f"{db_id}.sqlite"
        return [
            {
                "input": self.instruction + body + SEP,
                "target": target,
                "prefix": self.instruction,
                "references": [target],
                "db_id": db_id,
                "db_path": str(db_path),
                "gold_sql": query,
            }
        ]


class JsonlTask(Task):
    """A user dataset of records with configurable fields (`input_field`, `target_field`, `references_field`).

    Prompt: `instruction + record[input_field] + separator` -> target + EOS. A list-valued target is a set of
    references: training makes one example per reference, evaluation keeps them all. Files are any format that
    `read_records` reads (JSON lines, JSON, CSV, TSV, parquet), found as train/validation(dev, val)/test in `data_dir`.
    """

    name = "jsonl"
    kind = "generation"
    add_eos = True
    metrics = ("rouge",)

    def to_examples(self, record: dict, cfg: TaskConfig, *, expand_references: bool, where: str) -> list[dict]:
        text = _field(record, cfg.input_field, self.name, where)
        target = _field(record, cfg.target_field, self.name, where)
        targets = target if isinstance(target, list) else [target]
        if not targets:
            raise ValueError(f"jsonl: empty target list in field {cfg.target_field!r} of {where}")
        bad = [t for t in targets if not isinstance(t, str)]
        if bad:
            # str() would train on the text "None" or "5"
            raise ValueError(f"jsonl: field {cfg.target_field!r} holds {bad[0]!r}, not a string (or a list of them)")
        input_ = cfg.instruction + str(text) + cfg.separator
        if cfg.references_field is not None and not expand_references:
            refs = _field(record, cfg.references_field, self.name, where)
            refs = [str(r) for r in refs] if isinstance(refs, list) else [str(refs)]
            return [{"input": input_, "target": targets[0], "prefix": cfg.instruction, "references": refs}]
        return _expand(input_, cfg.instruction, targets, expand_references)


for _task in (DartTask(), SamsumTask(), SpiderTask(), JsonlTask()):
    register_task(_task)
