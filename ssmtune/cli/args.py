"""Argument dataclasses of the CLI commands and a small dataclass -> argparse bridge (litgpt style, no extra deps).

Each command takes one dataclass. Nested dataclass fields become dotted flags (``--train.lr 1e-3``) and nested YAML
mappings in recipes (``train: {lr: 1e-3}``). The help text of every flag is the docstring under its field.
Precedence: field defaults < ``--recipe file.yaml`` < flags on the command line.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import math
import textwrap
import types
import typing
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml

from ssmtune.data.tasks import TaskConfig
from ssmtune.eval.evaluate import EvalConfig
from ssmtune.train.loop import TrainConfig
from ssmtune.utils.io import atomic_write_text

RECIPE_FLAG = "recipe"
MAX_GENERATE_TOKENS = 1 << 16
"""Largest `ssmtune generate --max_new_tokens`."""


@dataclass(kw_only=True)
class TrainArgs:
    """ssmtune train: fine-tune a base model on a task with a PEFT method (or fully)."""

    model: str
    """Base model: a folder written by save_pretrained (or an HF / mamba_ssm checkpoint folder), or `builtin:<name>`."""
    tokenizer: str | None = None
    """Tokenizer folder, or `byte`. Default: `None`, the model folder's tokenizer."""
    method: str = "state_offset_h"
    """PEFT method: a registered name (see the epilog) or `full` (full fine-tuning, no adapter)."""
    method_args: dict[str, Any] = field(default_factory=dict)
    """Options of the method's config, as a YAML mapping, e.g. `--method_args '{r: 8, target_modules: [x_proj]}'`."""
    data: TaskConfig
    """The task and where its data lives."""
    max_length: int | None = None
    """Cut training inputs from the left so that prompt + target fit this many tokens. Default: `None`, no limit."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(best_metric="score"))
    """Optimisation. The best adapter is kept by the task's headline `score` (accuracy, MCC, ROUGE-L, BLEU, ...)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation during and after training."""
    out_dir: str = "runs"
    """Parent folder of the run folders."""
    name: str | None = None
    """Run folder name under out_dir. Default: `None`, meaning `<model>-<task>-<method>`."""
    backend: str = "auto"
    """Scan backend: `auto`, `ref`, `torch` or `triton`."""


@dataclass(kw_only=True)
class EvalCommandArgs:
    """ssmtune eval: evaluate a base model, with an optional adapter, on a task."""

    model: str
    """Base model folder or `builtin:<name>` (for full fine-tuning: the fine-tuned model folder)."""
    adapter: str | None = None
    """Adapter folder written by training (`runs/<name>/best` or `final`). Default: `None`, the bare model."""
    tokenizer: str | None = None
    """Tokenizer folder, or `byte`. Default: the model folder's tokenizer."""
    data: TaskConfig
    """The task and where its data lives."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation settings."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """dtype of the model weights."""
    device: str = "auto"
    """`auto`, `cpu` or `cuda[:i]`."""
    output: str | None = None
    """Write the result JSON here as well as printing it."""
    backend: str = "auto"
    """Scan backend."""


@dataclass(kw_only=True)
class GenerateArgs:
    """ssmtune generate: print a model's completion of a prompt."""

    model: str
    """Base model folder or `builtin:<name>`."""
    prompt: str
    """The prompt text."""
    adapter: str | None = None
    """Adapter folder. Default: `None`, the bare model."""
    tokenizer: str | None = None
    """Tokenizer folder, or `byte`. Default: the model folder's tokenizer."""
    max_new_tokens: int = 64
    """Longest continuation."""
    num_beams: int = 1
    """Beam width (1 = greedy, unless sampling)."""
    do_sample: bool = False
    """Sample instead of greedy / beam search."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float | None = None
    """Nucleus sampling threshold."""
    seed: int = 0
    """Seed of sampling."""
    device: str = "auto"
    """`auto`, `cpu` or `cuda[:i]`."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """dtype of the model weights."""
    backend: str = "auto"
    """Scan backend."""

    def __post_init__(self) -> None:
        if not 1 <= self.max_new_tokens <= MAX_GENERATE_TOKENS:
            raise ValueError(f"--max_new_tokens must be in 1..{MAX_GENERATE_TOKENS}, got {self.max_new_tokens!r}")
        if not 1 <= self.num_beams <= 64:
            raise ValueError(f"--num_beams must be in 1..64, got {self.num_beams!r}")
        if not 0 < self.temperature < math.inf:
            raise ValueError(f"--temperature must be a finite number > 0, got {self.temperature!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"--top_p must be in (0, 1], got {self.top_p!r}")


@dataclass(kw_only=True)
class CompareArgs:
    """ssmtune compare: run several recipes (or read finished runs) and tabulate score vs trainable parameters."""

    recipes: list[str] = field(default_factory=list)
    """Recipe YAML files to train (each like `ssmtune train --recipe`); finished runs are read, not retrained."""
    runs: list[str] = field(default_factory=list)
    """Finished run folders to read (each holds results.json)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Options applied on top of every recipe, as a YAML mapping with dotted keys, e.g. `{train.max_steps: 10}`."""
    metric: str | None = None
    """Score column of the plot. Default: `None`, meaning `score` (each run's headline metric)."""
    out: str = "runs/compare"
    """Folder for compare.md, compare.csv and compare.png."""


@dataclass(kw_only=True)
class ModelShape:
    """Shape of a model trained from scratch."""

    arch: Literal["mamba", "mamba2"] = "mamba"
    """Mamba-1 (S6) or Mamba-2 (SSD)."""
    d_model: int = 128
    """Hidden size."""
    n_layer: int = 4
    """Number of blocks."""
    d_state: int = 16
    """SSM state size N."""
    headdim: int = 32
    """Mamba-2 head dimension P."""


@dataclass(kw_only=True)
class PretrainArgs:
    """ssmtune pretrain: train a small model from scratch on a text corpus with the byte tokenizer."""

    corpus: str
    """A text file, or a folder whose *.txt files are read (sorted by name)."""
    out: str
    """Folder to save the model to (save_pretrained), with its tokenizer marker."""
    shape: ModelShape = field(default_factory=ModelShape)
    """The model."""
    seq_len: int = 256
    """Length of the packed training sequences (documents joined by EOS, then cut)."""
    val_fraction: float = 0.02
    """Fraction of the packed sequences held out to report a validation loss."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1, batch_size=16, lr=2e-3, warmup_steps=50))
    """Optimisation."""
    backend: str = "auto"
    """Scan backend."""


@dataclass(kw_only=True)
class ServeArgs:
    """ssmtune serve: an HTTP server that answers prompts for many adapters, batched side by side."""

    model: str
    """Base model folder or `builtin:<name>`."""
    adapter: list[str] = field(default_factory=list, metadata={"repeatable": True})
    """An adapter to serve, as `name=folder`; repeat the flag for more (`--adapter a=runs/a/best --adapter b=...`)."""
    tokenizer: str | None = None
    """Tokenizer folder, or `byte`. Default: the model folder's tokenizer."""
    host: str = "127.0.0.1"
    """Address to bind (loopback by default; `0.0.0.0` to accept other machines)."""
    port: int = 8000
    """TCP port."""
    max_batch: int = 16
    """Most rows decoded together (a beam-search request, `num_beams` > 1, runs alone outside this batch); on a
    transformers hybrid, most requests in one `generate` call."""
    batch_wait_ms: float = 5.0
    """When idle, how long to collect requests arriving together into the first batch."""
    max_queue: int = 256
    """Most requests waiting; more get HTTP 503."""
    max_prompt_tokens: int = 1024
    """Longest prompt accepted (HTTP 400 beyond)."""
    max_new_tokens: int = 256
    """Largest `max_new_tokens` a request may ask for (HTTP 400 beyond)."""
    max_body_bytes: int = 1 << 20
    """Largest request body in bytes (HTTP 413 beyond, refused from its Content-Length or as soon as a streamed body
    crosses it, so an oversized body is never held in memory)."""
    shutdown_timeout_s: float = 10.0
    """On SIGTERM / Ctrl-C, how long requests still running may take to finish before they are cut off."""
    device: str = "auto"
    """`auto`, `cpu` or `cuda[:i]`."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """dtype of the model weights."""
    backend: str = "auto"
    """Scan backend."""
    cuda_graph: bool | None = None
    """Decode steps from captured CUDA graphs (docs/serving.md, Graphed decoding): default on CUDA where the model
    supports it; `true` insists, `false`: eager steps."""
    state_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """dtype of the decode steps' SSM states (docs/serving.md, Graphed decoding): auto (the default) keeps the model's
    dtype where it is bf16 / fp16 (half the memory traffic), else fp32; fp32 continues the training scan exactly.
    ssmtune's Mamba models only (not transformers hybrids)."""

    def __post_init__(self) -> None:
        if isinstance(self.adapter, str):
            self.adapter = [self.adapter]
        for item in self.adapter:
            name, sep, folder = str(item).partition("=")
            if not sep or not name or not folder:
                raise ValueError(f"--adapter must be name=folder, got {item!r}")
        names = [str(a).partition("=")[0] for a in self.adapter]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"--adapter names must be unique, got {dup} more than once")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in 0..65535, got {self.port!r}")
        for flag in ("max_batch", "max_queue", "max_prompt_tokens", "max_new_tokens", "max_body_bytes"):
            if getattr(self, flag) < 1:
                raise ValueError(f"--{flag} must be >= 1, got {getattr(self, flag)!r}")
        for flag in ("batch_wait_ms", "shutdown_timeout_s"):
            if not 0 <= getattr(self, flag) < math.inf:
                raise ValueError(f"--{flag} must be a finite number >= 0, got {getattr(self, flag)!r}")

    def adapters(self) -> dict[str, str]:
        """{name: folder} of the --adapter flags."""
        return dict(str(a).split("=", 1) for a in self.adapter)


# dataclass -> argparse


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (and its bases), by field name."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and (
                    isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)
                )
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _bool(text: str, *, auto: bool = False) -> bool:
    low = str(text).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected {'auto/' if auto else ''}true/false, got {text!r}")


def _converter(tp: Any):
    """A str -> value converter for one field type (YAML parsing for lists and dicts)."""
    inner, optional = _strip_optional(tp)

    def convert(text: str):
        # `bool | None` fields read None as "decide for me" (e.g. --train.cuda_graph auto)
        if optional and str(text).lower() in ("none", "null") + (("auto",) if inner is bool else ()):
            return None
        if inner is bool:
            return _bool(text, auto=optional)
        if inner in (int, float, str):
            return inner(text)
        if typing.get_origin(inner) is Literal:
            return text
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise argparse.ArgumentTypeError(f"{text!r} is not valid YAML ({yaml_problem(e)})") from None

    convert.__name__ = getattr(inner, "__name__", str(inner))
    return convert


def yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where (PyYAML's own text spans several lines)."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or type(e).__name__}{where}"


class _Parser(argparse.ArgumentParser):
    """A bad option is reported in one line: the error, not the usage text (that is what --help is for)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def _flat_fields(cls: type, prefix: str = "") -> dict[str, tuple[type, dataclasses.Field, Any]]:
    """Dotted key -> (owning class, field, type) for every leaf field."""
    out: dict[str, tuple[type, dataclasses.Field, Any]] = {}
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_dataclass_type(tp):
            out.update(_flat_fields(tp, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = (cls, f, tp)
    return out


def valid_keys(cls: type) -> list[str]:
    return list(_flat_fields(cls))


def _default_of(f: dataclasses.Field, parent_default: Any) -> Any:
    if parent_default is not None:
        return getattr(parent_default, f.name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _show(value: Any) -> str:
    if value is dataclasses.MISSING:
        return "required"
    return f"default: {value!r}" if not isinstance(value, str) else f"default: {value}"


def build_parser(cls: type, *, prog: str, epilog: str = "") -> argparse.ArgumentParser:
    """An argparse parser with one flag per leaf field (dotted for nested dataclasses) and `--recipe`."""
    parser = _Parser(
        prog=prog,
        description=(inspect.getdoc(cls) or "").split("\n")[0],
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument(f"--{RECIPE_FLAG}", metavar="FILE.yaml", help="YAML file whose keys mirror these options.")
    _add_fields(parser, parser, cls, "", None)
    return parser


class _Extend(argparse.Action):
    """A list flag that may be repeated (fields with ``metadata={"repeatable": True}``); a YAML list adds many."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        items = list(getattr(namespace, self.dest, None) or [])
        items.extend(values if isinstance(values, list) else [values])
        setattr(namespace, self.dest, items)


def _add_fields(parser, group, cls: type, prefix: str, parent_default: Any) -> None:
    hints, docs = _hints(cls), field_docs(cls)
    nested = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        default = _default_of(f, parent_default)
        if _is_dataclass_type(tp):
            nested.append((f, tp, default))
            continue
        inner, optional = _strip_optional(tp)
        kwargs: dict[str, Any] = {"type": _converter(tp), "dest": f"{prefix}{f.name}"}
        if typing.get_origin(inner) is Literal:
            kwargs["choices"] = list(typing.get_args(inner))
            kwargs["metavar"] = "{" + ",".join(map(str, kwargs["choices"])) + "}"
        elif inner is bool and optional:
            kwargs["metavar"] = "{auto,true,false}"
        else:
            kwargs["metavar"] = getattr(inner, "__name__", "VALUE").upper()
        if f.metadata.get("repeatable"):
            kwargs["action"] = _Extend
        doc = docs.get(f.name, "")
        shown = "" if "Default:" in doc else f" ({_show(default)})"
        kwargs["help"] = f"{doc}{shown}".replace("%", "%%")
        group.add_argument(f"--{prefix}{f.name}", **kwargs)
    for f, tp, default in nested:
        title = f"{prefix}{f.name}"
        sub = parser.add_argument_group(title, docs.get(f.name) or (inspect.getdoc(tp) or "").split("\n")[0])
        instance = default if default is not dataclasses.MISSING else None
        _add_fields(parser, sub, tp, f"{title}.", instance)


def flatten(mapping: dict[str, Any], cls: type, *, where: str) -> dict[str, Any]:
    """Nested recipe mapping -> dotted keys, validated against the fields of ``cls``."""
    keys = _flat_fields(cls)
    groups = {k.rsplit(".", 1)[0] for k in keys if "." in k}
    out: dict[str, Any] = {}

    def walk(d: dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            key = f"{prefix}{k}"
            if key in groups and isinstance(v, dict):
                walk(v, f"{key}.")
            elif key in keys:
                out[key] = v
            else:
                raise ValueError(f"unknown key {key!r} in {where}; valid keys: {', '.join(keys)}")

    if not isinstance(mapping, dict):
        raise ValueError(f"{where} must hold a YAML mapping, got {type(mapping).__name__}")  # noqa: TRY004
    walk(mapping, "")
    return out


def load_recipe(path: str | Path, cls: type) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {str(path)!r} does not exist")
    try:
        mapping = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"recipe {str(path)!r} is not valid YAML ({yaml_problem(e)})") from None
    return flatten(mapping or {}, cls, where=f"recipe {str(path)!r}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert a recipe value against the field type (YAML already gives ints, floats, lists)."""
    inner, optional = _strip_optional(tp)
    if optional and inner is bool and isinstance(value, str) and value.lower() == "auto":
        value = None  # a recipe's `cuda_graph: auto`
    if value is None:
        if optional:
            return None
        raise ValueError(f"{key} must not be null")
    if typing.get_origin(inner) is Literal:
        choices = typing.get_args(inner)
        if value not in choices:
            raise ValueError(f"{key} must be one of {list(choices)}, got {value!r}")
        return value
    if inner is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        return float(value)
    if inner is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if inner is bool and isinstance(value, bool):
        return value
    if inner is str and isinstance(value, (str, int, float)):
        return str(value)
    origin = typing.get_origin(inner)
    if origin is list and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return [value]  # `--recipes a.yaml`: one item
    if origin in (list, dict):
        if not isinstance(value, origin):
            kind = "a YAML mapping ({key: value, ...})" if origin is dict else "a YAML list ([a, b, ...])"
            raise ValueError(f"{key} must be {kind}, got {value!r}")
        return value
    if inner in (int, bool, str):
        raise ValueError(f"{key} must be {inner.__name__}, got {value!r}")
    return value


def build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Instantiate ``cls`` from dotted values (missing ones take the field defaults)."""
    hints = _hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        key, tp = f"{prefix}{f.name}", hints[f.name]
        if _is_dataclass_type(tp):
            sub = {k: v for k, v in values.items() if k.startswith(key + ".")}
            if sub or f.default_factory is dataclasses.MISSING:
                base = _default_of(f, None)
                base_values = _to_flat(base, f"{key}.") if base is not dataclasses.MISSING else {}
                kwargs[f.name] = build(tp, {**base_values, **sub}, f"{key}.")
        elif key in values:
            kwargs[f.name] = _coerce(values[key], tp, key)
    missing = [
        f"--{prefix}{f.name}"
        for f in dataclasses.fields(cls)
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(f"missing required option(s): {', '.join(missing)}")
    return cls(**kwargs)


def _to_flat(obj: Any, prefix: str) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            out.update(_to_flat(v, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = v
    return out


def parse(cls: type, argv: list[str], *, prog: str, epilog: str = "") -> Any:
    """Parse ``argv`` into an instance of ``cls``: defaults < recipe < flags. Errors exit through argparse."""
    parser = build_parser(cls, prog=prog, epilog=epilog)
    ns = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    try:
        recipe = ns.pop(RECIPE_FLAG, None)
        if recipe is not None:
            values.update(load_recipe(recipe, cls))
        values.update(ns)
        return build(cls, values)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))


def to_nested_dict(obj: Any) -> dict[str, Any]:
    """A dataclass (with nested ones) as a plain nested dict, for config.yaml."""
    return dataclasses.asdict(obj)


def dump_yaml(obj: Any, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(to_nested_dict(obj), sort_keys=False))
