"""The training loop: AdamW + linear decay, accumulation, clipping, precision, evaluation, checkpoints, exact resume.

The whole loop in a dozen lines (what :func:`fit` does around them is bookkeeping):

    sampler = EpochSampler(len(dataset), config.batch_size, seed=config.seed)
    for epoch, batch_idx in sampler.positions(start):                    # resumable: (epoch, batch) from a checkpoint
        micro = split(indices, config.micro_batch_size)                  # gradient accumulation
        n_tok = sum(target_tokens(m) for m in micro)                     # normalise by the whole batch's tokens
        for m in micro:
            loss_sum = token_loss(model(**m).logits, m["labels"])        # sum of CE over target positions
            (loss_sum / n_tok).backward()
        clip_grad_norm_(trainable, config.max_grad_norm)
        optimizer.step(); scheduler.step(); optimizer.zero_grad()
        if due(eval): metrics = eval_fn(model); keep best adapter
        if due(save): save_checkpoint(...)                               # temp dir + os.replace; keep last k

``fit`` is that loop over three parts: a step object (``EagerStep``: micro-batches, DDP/FSDP gradient sync, the fp16
scaler; or ``GraphedStep``: one CUDA-graph replay; both ``step(chunks, n_targets, step=, epoch=) -> StepResult`` and
raise ``NonFiniteLossError``), a ``Checkpointer`` (restore and save) and a ``RunLogger`` (metrics.jsonl, progress bar).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ssmtune.data.tokenize import PackedRowsCollator
from ssmtune.models.lm import IGNORE_INDEX, SSMPreTrainedModel, count_targets, token_loss, token_loss_sum
from ssmtune.train import distributed as D
from ssmtune.train.checkpoint import (
    clean_interrupted_writes,
    latest_readable_checkpoint,
    load_checkpoint,
    read_state,
    save_checkpoint,
    set_rng_state,
)
from ssmtune.train.graphs import GraphedTrainStep
from ssmtune.train.optim import build_optimizer, linear_schedule, set_capturable
from ssmtune.utils.io import atomic_write_text, finite_json, replace_dir

_log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Parameters that stay fp32 when the frozen base is cast down (as in the reference code: A_log and D stay fp32).
FP32_PARAM_SUFFIXES = ("A_log", ".D", "D_skip", "dt_bias")


@dataclass(kw_only=True)
class TrainConfig:
    """Optimisation settings. Defaults follow docs/methods.md §9 (HF Trainer defaults as used by the papers)."""

    epochs: int = 10
    """Passes over the training set."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (also the length of the LR schedule). Default: `None`, epochs decide."""
    batch_size: int = 4
    """Examples per optimizer step (the papers' batch size)."""
    micro_batch_size: int | None = None
    """Examples per forward pass; `batch_size / micro_batch_size` micro-batches are accumulated. Default: batch_size."""
    lr: float = 1e-3
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay (biases and norms are exempt)."""
    warmup_steps: int = 0
    """Linear warm-up steps before the linear decay to 0 (the papers use 0)."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this value; `None` or 0 disables clipping."""
    seed: int = 42
    """Seed of the data order and of every RNG."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """dtype of the frozen base weights; trainable parameters (adapters) stay fp32 and the forward runs under autocast."""
    eval_every_epoch: bool = True
    """Evaluate at the end of every epoch."""
    eval_steps: int = 0
    """Also evaluate every N optimizer steps (0: never)."""
    best_metric: str = "loss"
    """Evaluation metric that selects the best adapter, e.g. `accuracy`, `mcc`, `rougeL`, `loss`."""
    greater_is_better: bool | None = None
    """Whether a larger best_metric is better. Default: `None`, meaning False for names containing 'loss'."""
    save_steps: int = 500
    """Write a resumable checkpoint every N optimizer steps (0: never)."""
    keep_last: int = 2
    """Number of checkpoints kept."""
    log_steps: int = 10
    """Append a training record to metrics.jsonl every N optimizer steps."""
    resume: bool = True
    """Continue from the latest checkpoint in the output folder, if there is one."""
    device: str = "auto"
    """`auto` (cuda when available), `cpu`, `cuda`, `cuda:1`, ..."""
    progress: bool = True
    """Show a tqdm progress bar (loss, lr, tokens/s)."""
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    """Multi-process training (under torchrun / accelerate launch): `ddp` (replicated model, only trainable
    gradients all-reduced), `fsdp` (FSDP2, one shard unit per Mamba block), or `auto`: DDP for PEFT, FSDP for full
    fine-tuning. Ignored in a single process. batch_size is the global batch and must divide by the world size."""
    cuda_graph: bool | None = None
    """Replay every optimizer step (forward, backward, clipping, AdamW) from one CUDA graph, so that Python and kernel
    launches no longer bound small steps (docs/training.md, "CUDA graphs"); every batch is then padded to the longest
    example of the training set (right padding, ignored labels: the loss is unchanged; packed rows keep their own
    shape). `None` (`auto`): graphed where it applies (`graph_decision`: one CUDA process, bf16 or fp32, no
    accumulation or `cu_seqlens` packing, an ssmtune Mamba model, little extra padding), else eager with a one-line
    note; `True`: graphed, or a ValueError saying why not; `False`: eager. Default: `auto`."""

    def __post_init__(self) -> None:
        if self.epochs < 1 and not self.max_steps:
            raise ValueError(f"epochs must be >= 1 (or set max_steps), got {self.epochs!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size!r}")
        mbs = self.micro_batch_size
        if mbs is not None and (mbs < 1 or self.batch_size % mbs):
            raise ValueError(f"micro_batch_size must divide batch_size={self.batch_size}, got {mbs!r}")
        if self.strategy not in D.STRATEGIES:
            raise ValueError(f"strategy must be one of {D.STRATEGIES}, got {self.strategy!r}")
        if self.precision not in DTYPES:
            raise ValueError(f"precision must be one of {sorted(DTYPES)}, got {self.precision!r}")
        if self.cuda_graph not in (None, True, False):
            raise ValueError(f"cuda_graph must be None (auto), True or False, got {self.cuda_graph!r}")
        if self.cuda_graph and (reason := _config_graph_reason(self.precision, self.accumulation_steps,
                                                               self.batch_size)):  # fmt: skip
            raise ValueError(f"cuda_graph=True cannot run: {reason}")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        for name in ("eval_steps", "save_steps", "warmup_steps", "log_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")

    @property
    def accumulation_steps(self) -> int:
        return self.batch_size // (self.micro_batch_size or self.batch_size)

    @property
    def maximize(self) -> bool:
        return self.greater_is_better if self.greater_is_better is not None else "loss" not in self.best_metric


# Graphed or eager steps (``TrainConfig.cuda_graph``)

GRAPH_MAX_PADDING = 0.25
"""Auto captures the step only when padding every batch to the training set's longest example costs at most this
fraction more tokens than padding each batch to its own longest example (over the first epoch's batches)."""

GRAPH_METHODS = frozenset({"additional_scan", "bitfit", "full", "initial_state", "lora", "partial", "prefix", "prompt",
                           "sdlora", "state_offset"})  # fmt: skip
"""Methods whose step auto captures (each checked against eager steps on the GPU by tests/train/test_graphs.py); a
method registered outside ssmtune trains eagerly unless ``cuda_graph=True``."""


def _config_graph_reason(precision: str, accumulation_steps: int, batch_size: int) -> str | None:
    """What a graph cannot do among the settings alone (TrainConfig refuses ``cuda_graph=True`` with them)."""
    if precision == "fp16":
        return (
            "precision 'fp16' is not captured (its loss scaler checks for inf on the host every step); use bf16 or fp32"
        )
    if accumulation_steps > 1:
        return (f"gradient accumulation ({accumulation_steps} micro-batches of {batch_size // accumulation_steps} per "
                f"step) is not captured; a graph runs one micro-batch of batch_size={batch_size}")  # fmt: skip
    return None


def padding_overhead(lengths: Sequence[int], batch_size: int, *, seed: int = 0) -> float:
    """Extra tokens of padding every batch to ``max(lengths)`` over padding each batch to its own longest example, as
    a fraction (0.25: a quarter more), over the batches of the first epoch (``EpochSampler`` with ``seed``)."""
    sampler = EpochSampler(len(lengths), batch_size, seed=seed)
    own = sum(max(lengths[i] for i in sampler.batch(0, b)) for b in range(len(sampler)))
    return len(sampler) * max(lengths) / own - 1.0 if own else 0.0


def graph_decision(*, device_type: str, world_size: int, precision: str, accumulation_steps: int, packed: bool,
                   methods: Collection[str], native_model: bool, lengths: Sequence[int] | Callable[[], Sequence[int]],
                   batch_size: int, seed: int = 0, forced: bool = False, rows: bool = False) -> str | None:  # fmt: skip
    """Why ``fit`` must run its optimizer step eagerly, or None to capture it in a CUDA graph.

    A graph needs a CUDA device, one process (no DDP/FSDP), precision bf16 or fp32, one micro-batch per step and
    batches of one shape (``packed``, one ``cu_seqlens`` row: its shape changes with every batch). ``forced``
    (``cuda_graph=True``) asks only that; auto (``cuda_graph=None``) also wants an ssmtune Mamba / Mamba-2 model
    (``native_model``; transformers hybrids are not tested under capture), methods from ``GRAPH_METHODS`` and at most
    ``GRAPH_MAX_PADDING`` extra padding (``padding_overhead``). ``lengths``: every training example's length in
    tokens; a callable is only called when everything else allows a graph (collating each example takes time).
    ``rows``: packed rows (``PackedRowsCollator``), every batch already of one shape: no padding is added, so the
    lengths are not read.
    """
    if device_type != "cuda":
        return f"device {device_type!r} is not CUDA"
    if world_size > 1:
        return f"{world_size} processes (DDP/FSDP) are not captured; a graph runs in a single process"
    reason = _config_graph_reason(precision, accumulation_steps, batch_size)
    if reason is not None:
        return reason
    if packed:
        return "packed batches (cu_seqlens) are not captured: their shapes change with every batch"
    if forced:
        return None
    if not native_model:
        return "capture is tested on ssmtune's Mamba / Mamba-2 models only (cuda_graph=True forces it)"
    unknown = sorted(set(methods) - GRAPH_METHODS)
    if unknown:
        return f"method(s) {unknown} are not known to capture (cuda_graph=True forces it)"
    if rows:
        return None
    lengths = lengths() if callable(lengths) else lengths
    extra = padding_overhead(lengths, batch_size, seed=seed)
    if extra > GRAPH_MAX_PADDING:
        return (f"padding every batch to the longest example ({max(lengths)} tokens) would cost {extra:.0%} more "
                f"tokens than padding each batch to its own longest (limit {GRAPH_MAX_PADDING:.0%}); shorten the "
                "longest examples, or cuda_graph=True forces it")  # fmt: skip
    return None


# A packed-rows batch's tensors with one entry per row (split into micro-batches and over ranks)
_ROW_KEYS = ("input_ids", "labels", "attention_mask", "resets")

# Settings that define the optimisation trajectory: a resumed run must use the same ones (the others, e.g. eval_steps,
# save_steps, strategy and the world size, may change between runs).
RESUME_FIXED = ("epochs", "max_steps", "batch_size", "lr", "weight_decay", "warmup_steps", "max_grad_norm", "seed",
                "precision", "best_metric", "greater_is_better")  # fmt: skip


def check_resume_config(saved: dict[str, Any], config: TrainConfig, n_train: int, where: Path,
                        batches: str | None = None) -> None:  # fmt: skip
    """Refuse to continue a checkpoint written with other optimisation settings, another training set size or, when
    ``batches`` (``batches_of``) is given, other batches (a step is a position in its run's batches)."""
    now = asdict(config)
    diffs = [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in RESUME_FIXED if k in saved and saved[k] != now[k]]
    old_n = saved.get("_n_train")
    if old_n is not None and old_n != n_train:
        diffs.append(f"training examples: {old_n} -> {n_train}")
    old_b = saved.get("_batches")
    if batches is not None and old_b is not None and old_b != batches:
        diffs.append(f"batches: {old_b!r} -> {batches!r}")
    if diffs:
        raise ValueError(
            f"cannot resume from {str(where)!r}: it was written with other settings ({'; '.join(diffs)}). "
            "Restore them, or start a fresh run with resume=False (`--train.resume false`), which deletes these "
            "checkpoints."
        )


def check_checkpoint_settings(checkpoint: str | Path, config: TrainConfig, n_train: int,
                              batches: str | None = None) -> None:  # fmt: skip
    """``check_resume_config`` against a checkpoint folder (mmap: only the pickled settings are read, not the
    optimizer's tensors)."""
    saved = read_state(checkpoint, mmap=True)
    check_resume_config(saved.get("config") or {}, config, n_train, Path(checkpoint), batches)


def batches_of(collate_fn: Callable) -> str:
    """What ``fit``'s steps are made of, for the resume check: ``batch_size`` examples, or packed rows, whose batches
    (and so the steps per epoch) follow from their width and lead."""
    if isinstance(collate_fn, PackedRowsCollator):
        return f"packed rows of {collate_fn.width} tokens, lead {collate_fn.lead}"
    return "batch_size examples"


def check_resume(out_dir: str | Path, config: TrainConfig, n_train: int, batches: str | None = None) -> None:
    """Raise now (before anything is written) if ``fit(..., out_dir=out_dir)`` would refuse to resume (``batches``:
    ``batches_of`` its collator, else the batches go unchecked)."""
    # fit() itself warns about a damaged checkpoint it skips
    latest = latest_readable_checkpoint(Path(out_dir) / "checkpoints", warn=False) if config.resume else None
    if latest is not None:
        check_checkpoint_settings(latest, config, n_train, batches)


class NonFiniteLossError(RuntimeError):
    """The loss (or the gradient norm) became NaN or infinite; training stopped."""


@dataclass
class TrainResult:
    step: int
    """Optimizer steps taken in total."""
    epoch: float
    """Epochs completed (fractional when max_steps stops mid-epoch)."""
    best_metric: str
    best_value: float | None
    best_step: int | None
    final_dir: Path | None
    last_eval: dict[str, float] = field(default_factory=dict)
    resumed_from: int | None = None


class EpochSampler:
    """Deterministic, resumable batches of indices: epoch e uses ``randperm(n)`` seeded by ``seed + e``.

    The last incomplete batch is dropped (as in the reference code). The position is just ``(epoch, batch)``, so a
    checkpoint stores two integers.
    """

    def __init__(self, num_examples: int, batch_size: int, *, seed: int, shuffle: bool = True) -> None:
        self.num_examples, self.batch_size, self.seed, self.shuffle = num_examples, batch_size, seed, shuffle

    def __len__(self) -> int:
        return self.num_examples // self.batch_size

    def batch(self, epoch: int, index: int) -> list[int]:
        order = self._order(epoch)
        return order[index * self.batch_size : (index + 1) * self.batch_size]

    def _order(self, epoch: int) -> list[int]:
        if getattr(self, "_cached_epoch", None) != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                self._cached = torch.randperm(self.num_examples, generator=g).tolist()
            else:
                self._cached = list(range(self.num_examples))
            self._cached_epoch = epoch
        return self._cached


class RowsSampler:
    """Batches of packed rows (``PackedRowsCollator``): epoch e's order (``EpochSampler``'s, seeded by ``seed + e``)
    cut by the collator's ``plan`` into batches that fill its ``rows`` rows first fit. Every example is in one batch
    of each epoch (the last batch may be less full) and the number of batches varies with the epoch; a position is
    still ``(epoch, batch)``, deterministic from the seed and the examples' lengths."""

    def __init__(self, lengths: Sequence[int], collator: Any, *, seed: int, shuffle: bool = True) -> None:
        self.lengths, self.collator = list(lengths), collator
        self.order = EpochSampler(len(self.lengths), 1, seed=seed, shuffle=shuffle)
        # epoch -> where each of its batches starts in its order, then the order's end: each epoch is planned once
        # (O(examples)) and only when asked for, and keeps O(batches) integers rather than its batches' indices
        self._cuts: dict[int, list[int]] = {}

    def _epoch_cuts(self, epoch: int) -> list[int]:
        if epoch not in self._cuts:
            order = self.order._order(epoch)
            cuts = [0]
            # plan() cuts the stream in order: each batch is the next run of positions, so its length says where
            for b in self.collator.plan([self.lengths[i] for i in order]):
                cuts.append(cuts[-1] + len(b))
            self._cuts[epoch] = cuts
        return self._cuts[epoch]

    def batches(self, epoch: int) -> list[list[int]]:
        return [self.batch(epoch, k) for k in range(self.count(epoch))]

    def count(self, epoch: int) -> int:
        """Batches in epoch ``epoch``."""
        return len(self._epoch_cuts(epoch)) - 1

    def batch(self, epoch: int, index: int) -> list[int]:
        cuts = self._epoch_cuts(epoch)
        return self.order._order(epoch)[cuts[index] : cuts[index + 1]]


class StepPlan:
    """Optimizer steps <-> (epoch, batch): ``per_epoch`` batches in every epoch, or a count per epoch (packed rows)."""

    def __init__(self, per_epoch: int | Callable[[int], int]) -> None:
        self.per_epoch = per_epoch
        self._starts = [0]  # the first step of each epoch counted so far (variable counts only)

    def count(self, epoch: int) -> int:
        return self.per_epoch if isinstance(self.per_epoch, int) else self.per_epoch(epoch)

    def start(self, epoch: int) -> int:
        """The step at which epoch ``epoch`` begins."""
        if isinstance(self.per_epoch, int):
            return epoch * self.per_epoch
        while len(self._starts) <= epoch:
            self._starts.append(self._starts[-1] + self.count(len(self._starts) - 1))
        return self._starts[epoch]

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch index) of the step after ``step`` steps."""
        if isinstance(self.per_epoch, int):
            return divmod(step, self.per_epoch)
        epoch = 0
        # every epoch has a batch, so a step at an epoch's start needs no count of that epoch (which may never run)
        while self.start(epoch) < step and self.start(epoch + 1) <= step:
            epoch += 1
        return epoch, step - self.start(epoch)

    def epochs(self, step: int) -> float:
        """Epochs completed after ``step`` steps (fractional mid-epoch)."""
        if isinstance(self.per_epoch, int):
            return step / self.per_epoch
        epoch, index = self.position(step)
        return epoch + (index / self.count(epoch) if index else 0.0)

    def total(self, epochs: int, max_steps: int) -> int:
        """The steps of a run of ``epochs`` epochs stopped at ``max_steps`` (0: no limit; ``epochs`` 0: only
        ``max_steps``); the epochs after the limit are not counted (packed rows: not planned)."""
        if epochs < 1 or not max_steps:
            return max_steps if epochs < 1 else self.start(epochs)
        epoch = 0
        while epoch < epochs and self.start(epoch) < max_steps:
            epoch += 1
        return min(self.start(epoch), max_steps)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def apply_precision(model: nn.Module, precision: str) -> None:
    """Cast the frozen floating-point parameters to the precision's dtype; trainable ones and A_log/D stay fp32."""
    dtype = DTYPES[precision]
    if dtype == torch.float32:
        return
    for name, p in model.named_parameters():
        if p.requires_grad or not p.is_floating_point() or name.endswith(FP32_PARAM_SUFFIXES):
            continue
        p.data = p.data.to(dtype)


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (unpadded) input tokens of a collated batch, for the tokens/s log."""
    mask = batch.get("attention_mask", batch.get("token_mask"))  # token_mask: a packed batch's real tokens
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def save_model(model: nn.Module, out_dir: str | Path) -> Path:
    """``model.save_pretrained``: a PeftModel writes its adapter, a plain model (full fine-tuning) itself."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}-{os.getpid()}")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(tmp)
    elif hasattr(model, "save_adapter"):  # duck-typed models that only save their trainable tensors
        model.save_adapter(tmp)
    else:
        from safetensors.torch import save_file

        tmp.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    # Swap the folder in whole so a reader never sees half of it.
    return replace_dir(tmp, out_dir)


class _NoLog:
    """Stands in for MetricsLog on ranks other than 0: only rank 0 writes files."""

    def truncate_after(self, step: int) -> None: ...

    def reset(self) -> None: ...

    def write(self, record: dict[str, Any]) -> None: ...


class MetricsLog:
    """JSON lines at ``<run>/metrics.jsonl``; on resume, records after the checkpoint's step are dropped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [
            line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step
        ]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def reset(self) -> None:
        atomic_write_text(self.path, "")

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            # a NaN metric becomes null (with a "non_finite" note): the file stays valid JSON lines
            f.write(finite_json(record) + "\n")


def _progress(total: int, initial: int, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, desc="train")


@dataclass
class TrainProgress:
    """What a checkpoint restores besides the weights and the optimizer: the step and the best evaluation so far."""

    step: int = 0
    best_value: float | None = None
    best_step: int | None = None
    last_eval: dict[str, float] = field(default_factory=dict)
    resumed_from: int | None = None


@dataclass
class StepResult:
    loss: float
    """Mean loss over the (global) batch's target tokens."""
    grad_norm: float
    lr: float
    """The learning rate the step used."""
    tokens: int
    """Real input tokens of this rank's micro-batches."""


class RunLogger:
    """``metrics.jsonl`` (rank 0 only), the progress bar and the tokens/s rate of the training records."""

    def __init__(self, out_dir: Path, config: TrainConfig, ctx: D.DistContext) -> None:
        self.config, self.ctx = config, ctx
        self.log = MetricsLog(out_dir / "metrics.jsonl") if ctx.is_main else _NoLog()
        self.bar = None
        self.tokens_since, self.time_since = 0, time.perf_counter()

    def start(self, total_steps: int, step: int) -> None:
        self.total_steps = total_steps
        self.bar = _progress(total_steps, step, self.config.progress and self.ctx.is_main)
        self.tokens_since, self.time_since = 0, time.perf_counter()

    def step(self, step: int, epoch: float, result: StepResult) -> None:
        """After optimizer step ``step``: a training record every ``log_steps`` steps and at the last one."""
        self.tokens_since += result.tokens
        log_steps = self.config.log_steps
        if log_steps and (step % log_steps == 0 or step == self.total_steps):
            elapsed = max(time.perf_counter() - self.time_since, 1e-9)
            tokens = self.ctx.all_reduce_sum([self.tokens_since])[0] if self.ctx.enabled else self.tokens_since
            rate = tokens / elapsed
            self.log.write({"type": "train", "step": step, "epoch": epoch, "loss": result.loss, "lr": result.lr,
                            "grad_norm": result.grad_norm, "tokens_per_s": rate})  # fmt: skip
            self.tokens_since, self.time_since = 0, time.perf_counter()
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{result.lr:.2e}", tok_s=f"{rate:.0f}",
                                     refresh=False)  # fmt: skip
        if self.bar is not None:
            self.bar.update(1)

    def eval(self, step: int, epoch: float, metrics: dict[str, float]) -> None:
        self.log.write({"type": "eval", "step": step, "epoch": epoch, **metrics})

    def error(self, step: int, epoch: int, message: str) -> None:
        self.log.write({"type": "error", "step": step, "epoch": epoch, "message": message})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


_ADVICE = "Try a lower --train.lr, --train.precision fp32, or check the data."


class EagerStep:
    """One optimizer step in eager mode: the micro-batches' forward and backward (gradients synchronised by DDP/FSDP
    on the last one), the fp16 loss scaler, clipping and the optimizer. The scheduler is stepped by the loop."""

    def __init__(self, train_model: nn.Module, optimizer, scheduler, scaler: torch.amp.GradScaler,
                 trainable: list[nn.Parameter], *, config: TrainConfig, ctx: D.DistContext, strategy: str,
                 device: torch.device) -> None:  # fmt: skip
        self.model, self.optimizer, self.scheduler, self.scaler = train_model, optimizer, scheduler, scaler
        self.trainable, self.config, self.ctx, self.strategy, self.device = trainable, config, ctx, strategy, device
        self.autocast_dtype = DTYPES[config.precision]
        self.use_scaler = config.precision == "fp16"
        # DDP averages gradients over ranks and so does FSDP; the loss is scaled back to a sum over the global batch.
        self.grad_scale = float(ctx.world_size) if strategy != "none" else 1.0

    def __call__(self, chunks: list[dict], n_targets: int, *, step: int, epoch: int) -> StepResult:
        """Optimizer step ``step + 1`` over ``chunks``; raises NonFiniteLossError for a NaN/inf loss or norm."""
        device, dtype, ctx = self.device, self.autocast_dtype, self.ctx
        loss_total, tokens = 0.0, 0
        for c, chunk in enumerate(chunks):
            chunk = {k: v.to(device) if torch.is_tensor(v) else v for k, v in chunk.items()}
            with D.grad_sync(self.model, self.strategy, sync=c == len(chunks) - 1):
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    packed = {k: chunk[k] for k in ("cu_seqlens", "resets") if k in chunk}
                    out = self.model(chunk["input_ids"], attention_mask=chunk.get("attention_mask"), **packed)
                loss_sum, _ = token_loss(out.logits, chunk["labels"])
                loss = loss_sum / n_targets
                # One process stops at once; with several, all ranks must agree first (after the step's loop).
                if not ctx.enabled and not torch.isfinite(loss):
                    raise NonFiniteLossError(f"non-finite training loss ({loss.item()}) at step {step + 1} (epoch "
                                             f"{epoch}, lr {self._lr():.3g}); training stopped. {_ADVICE}")  # fmt: skip
                self.scaler.scale(loss * self.grad_scale if self.grad_scale != 1.0 else loss).backward()
            loss_total += loss.item()
            tokens += count_tokens(chunk)
        if ctx.enabled:
            loss_total = ctx.all_reduce_sum([loss_total])[0]
            if not math.isfinite(loss_total):
                raise NonFiniteLossError(f"non-finite training loss ({loss_total}) at step {step + 1} (epoch {epoch}, "
                                         f"lr {self._lr():.3g}); training stopped. {_ADVICE}")  # fmt: skip
        self.scaler.unscale_(self.optimizer)
        clip = self.config.max_grad_norm if self.config.max_grad_norm else float("inf")
        grad_norm = D.as_float(torch.nn.utils.clip_grad_norm_(self.trainable, clip))
        if not math.isfinite(grad_norm) and not self.use_scaler:
            raise NonFiniteLossError(f"non-finite gradient norm ({grad_norm}) at step {step + 1} (epoch {epoch}); "
                                     "training stopped.")  # fmt: skip
        lr = self._lr()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss_total, grad_norm, lr, tokens)

    def _lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def close(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)  # a step that raised leaves its gradients


class GraphedStep:
    """One optimizer step replayed from a CUDA graph (``GraphedTrainStep``): one micro-batch, padded to a fixed
    shape. Same interface as ``EagerStep``."""

    def __init__(self, graphed: GraphedTrainStep, scheduler) -> None:
        self.graphed, self.scheduler = graphed, scheduler

    def __call__(self, chunks: list[dict], n_targets: int, *, step: int, epoch: int) -> StepResult:
        chunk = chunks[0]  # one micro-batch per step (checked by TrainConfig)
        loss_t, norm_t = self.graphed(chunk, n_targets)
        loss_total, grad_norm = loss_t.item(), norm_t.item()
        lr = float(self.scheduler.get_last_lr()[0])
        if not (math.isfinite(loss_total) and math.isfinite(grad_norm)):
            raise NonFiniteLossError(f"non-finite training loss ({loss_total}) or gradient norm ({grad_norm}) at step "
                                     f"{step + 1} (epoch {epoch}, lr {lr:.3g}); training stopped (the step applied "
                                     f"zero gradients). {_ADVICE}")  # fmt: skip
        return StepResult(loss_total, grad_norm, lr, count_tokens(chunk))

    def close(self) -> None:
        self.graphed.close()


def load_latest(ckpt_root: Path, model: nn.Module, config: TrainConfig, n_train: int, ctx: D.DistContext,
                batches: str | None = None):  # fmt: skip
    """The latest checkpoint's state (its weights loaded into ``model``), or None for a fresh run."""
    # Rank 0 picks the checkpoint so that every rank resumes from the same one.
    latest = ctx.broadcast(latest_readable_checkpoint(ckpt_root) if config.resume else None)
    if latest is None:
        return None
    # The settings are checked before any weight is loaded: a refused resume leaves the caller's model untouched.
    check_checkpoint_settings(latest, config, n_train, batches)
    # Full (unsharded) weights go into the plain model before it is wrapped: any world size can resume.
    return load_checkpoint(latest, model)


class Checkpointer:
    """Resumable checkpoints under ``<run>/checkpoints`` (weights, optimizer, scheduler, scaler, RNG, progress)."""

    def __init__(self, root: Path, *, config: TrainConfig, n_train: int, ctx: D.DistContext, strategy: str,
                 model: nn.Module, train_model: nn.Module, optimizer, scheduler, scaler: torch.amp.GradScaler,
                 batches: str | None = None) -> None:  # fmt: skip
        self.root, self.config, self.n_train, self.ctx, self.strategy = root, config, n_train, ctx, strategy
        self.batches = batches
        self.model, self.train_model = model, train_model
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.use_scaler = config.precision == "fp16"

    def restore(self, state: dict[str, Any]) -> TrainProgress:
        """Load what ``load_latest`` returned into the optimizer, scheduler, scaler and RNGs."""
        D.load_optimizer_state(self.model, self.optimizer, state["optimizer"], self.strategy)
        self.scheduler.load_state_dict(state["scheduler"])
        if self.use_scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        return TrainProgress(step=state["step"], best_value=state["best_value"], best_step=state["best_step"],
                             last_eval=state.get("last_eval", {}), resumed_from=state["step"])  # fmt: skip

    def due(self, step: int, total_steps: int) -> bool:
        return bool(self.config.save_steps) and step % self.config.save_steps == 0 and step < total_steps

    def save(self, progress: TrainProgress, epoch: int, index: int) -> None:
        """Checkpoint after batch ``index`` of ``epoch`` (every rank calls it; rank 0 writes)."""
        strategy, ctx = self.strategy, self.ctx
        tensors = D.trainable_tensors(self.train_model, strategy) if strategy == "fsdp" else None
        optim_state = D.optimizer_state(self.model, self.optimizer, strategy)
        if ctx.is_main:
            state = {"optimizer": optim_state, "scheduler": self.scheduler.state_dict(),
                     "scaler": self.scaler.state_dict() if self.use_scaler else None,
                     "best_value": progress.best_value, "best_step": progress.best_step,
                     "last_eval": progress.last_eval, "sampler": {"epoch": epoch, "next_batch": index + 1},
                     "config": {**asdict(self.config), "_n_train": self.n_train, "_batches": self.batches},
                     "world_size": ctx.world_size}  # fmt: skip
            save_checkpoint(self.root, step=progress.step, model=D.unwrap(self.model), state=state,
                            keep_last=self.config.keep_last, tensors=tensors)  # fmt: skip
        ctx.barrier()


def _prepare_model(model: nn.Module, config: TrainConfig, ctx: D.DistContext, device: torch.device) -> str:
    """Move the model to ``device``, cast the frozen base to the precision (trainable tensors stay fp32) and return
    the resolved multi-process strategy."""
    model.to(device)
    strategy = D.resolve_strategy(config.strategy, model, ctx)
    if strategy == "fsdp" and config.precision == "fp16":
        raise ValueError("precision 'fp16' is not supported with strategy 'fsdp' (use bf16), got 'fp16'")
    if strategy != "fsdp":
        # FSDP keeps one dtype per shard unit: it casts to the compute dtype in its all-gather instead.
        apply_precision(model, config.precision)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters (did the adapter attach anything?)")
    # Trainable parameters live in fp32 (no bf16 optimiser state: docs/methods.md §10.6, fixed deliberately).
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return strategy


def _graphed_step(train_model: nn.Module, optimizer, scheduler, trainable: list[nn.Parameter], *, length: int,
                  config: TrainConfig) -> GraphedStep:  # fmt: skip
    set_capturable(optimizer, True)  # after the checkpoint's state: loading resets the groups' settings
    # every step replays one graph of one shape: the global batch, padded to the longest example
    graphed = GraphedTrainStep(train_model, optimizer, trainable, rows=config.batch_size, length=length,
                               clip=config.max_grad_norm or float("inf"), autocast_dtype=DTYPES[config.precision],
                               loss_fn=token_loss_sum, ignore_index=IGNORE_INDEX)  # fmt: skip
    return GraphedStep(graphed, scheduler)


def _choose_step(model: nn.Module, dataset: Sequence[Any], collate_fn: Callable, *, config: TrainConfig,
                 ctx: D.DistContext, device: torch.device) -> int | None:  # fmt: skip
    """The length every batch is padded to for a graphed step (packed rows: their width), or None to train eagerly
    (``config.cuda_graph``: see ``graph_decision``; auto notes why it stays eager in one logged line, except on the
    CPU)."""
    if config.cuda_graph is False or (config.cuda_graph is None and device.type != "cuda"):
        return None
    from ssmtune.core.peft_model import PeftModel
    from ssmtune.models.lm import SSMPreTrainedModel

    base = model.base_model if isinstance(model, PeftModel) else model
    methods = ({c.method for configs in model.peft_config.values() for c in configs} if isinstance(model, PeftModel)
               else {"full"})  # fmt: skip
    lengths: list[int] = []

    def example_lengths() -> list[int]:
        if not lengths:
            lengths.extend(collate_fn([dataset[i]])["input_ids"].shape[1] for i in range(len(dataset)))
        return lengths

    reason = graph_decision(
        device_type=device.type, world_size=ctx.world_size if ctx.enabled else 1, precision=config.precision,
        accumulation_steps=config.accumulation_steps, packed="cu_seqlens" in collate_fn([dataset[0]]),
        methods=methods, native_model=isinstance(base, SSMPreTrainedModel), lengths=example_lengths,
        batch_size=config.batch_size, seed=config.seed, forced=bool(config.cuda_graph),
        rows=isinstance(collate_fn, PackedRowsCollator),
    )  # fmt: skip
    if reason is None:
        return collate_fn.width if isinstance(collate_fn, PackedRowsCollator) else max(example_lengths())
    if config.cuda_graph:
        raise ValueError(f"cuda_graph=True cannot run: {reason}")
    if ctx.is_main:
        _log.warning("training eagerly: %s", reason)
    return None


def fit(
    model: nn.Module,
    dataset: Sequence[Any],
    collate_fn: Callable[[list[Any]], dict[str, torch.Tensor]],
    *,
    config: TrainConfig,
    out_dir: str | Path,
    eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    save_fn: Callable[[nn.Module, Path], Any] | None = save_model,
    on_step: Callable[[int], None] | None = None,
    dist: D.DistContext | None = None,
) -> TrainResult:
    """Train the parameters of ``model`` that require grad on ``dataset``.

    Under torchrun / accelerate launch (``WORLD_SIZE > 1``) every rank calls ``fit`` with the same arguments: each
    trains on its slice of every global batch (DDP or FSDP, see ``config.strategy``) and only rank 0 writes files.

    Args:
        model: a PeftModel (only adapters train) or a bare LM (full fine-tuning); ``model(input_ids,
            attention_mask=..., labels=...)`` returns an object with ``.logits`` [B, L, V].
        dataset: indexable examples; ``collate_fn(list_of_examples)`` returns ``input_ids``, ``attention_mask`` and
            ``labels`` [B, L] (labels aligned with input_ids, IGNORE_INDEX outside the target), or a packed batch:
            ``input_ids`` and ``labels`` [1, L] with ``cu_seqlens`` (``ssmtune.data.PackingCollator``). A
            ``PackedRowsCollator`` (with ``rows == config.batch_size``) forms the batches itself: each step is one
            batch of that many packed rows holding as many examples as fit (``RowsSampler``), its rows split into
            micro-batches and over the ranks; an epoch then has a varying number of steps.
        config: the optimisation settings.
        out_dir: run folder: ``metrics.jsonl``, ``checkpoints/``, ``best/`` (best by ``config.best_metric``) and
            ``final/`` (the adapter, or the whole model for full fine-tuning).
        eval_fn: returns a dict of metrics (``loss``, ``accuracy``, ...); called in eval mode under no_grad.
        save_fn: how to save the trained model to a folder (default: save_pretrained); None: never.
        on_step: called with the step number after each optimizer step (and its checkpoint).
        dist: the process context; default: :func:`ssmtune.train.distributed.init_distributed` (which reads the
            launcher's environment and is a single process without one).

    Raises:
        NonFiniteLossError: the loss or the gradient norm is NaN/inf.
    """
    out_dir = Path(out_dir)
    ctx = D.init_distributed(config.device) if dist is None else dist
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    device = ctx.device if ctx.enabled else resolve_device(config.device)
    seed_everything(config.seed)
    strategy = _prepare_model(model, config, ctx, device)

    packed_rows = isinstance(collate_fn, PackedRowsCollator)
    if packed_rows:
        if collate_fn.rows != config.batch_size:
            raise ValueError(f"packed rows: the collator lays {collate_fn.rows} rows per batch but batch_size is "
                             f"{config.batch_size}; a step trains batch_size rows "
                             "(PackedRowsCollator(rows=...))")  # fmt: skip
        if config.batch_size % ctx.world_size:
            raise ValueError(f"batch_size must be a multiple of the world size {ctx.world_size}, got "
                             f"{config.batch_size!r}")  # fmt: skip
        base = getattr(model, "base_model", model)
        if isinstance(base, SSMPreTrainedModel) and collate_fn.lead < (need := base.rows_lead()):
            raise ValueError(f"packed rows: lead {collate_fn.lead} is shorter than the model's d_conv - 1 = {need} "
                             "(an example's conv window would read the previous one); "
                             f"PackedRowsCollator(lead={need})")  # fmt: skip
        global_sampler = RowsSampler([len(dataset[i]["input_ids"]) for i in range(len(dataset))], collate_fn,
                                     seed=config.seed)  # fmt: skip
        plan = StepPlan(global_sampler.count)
    else:
        global_sampler = EpochSampler(len(dataset), config.batch_size, seed=config.seed)
        sampler = D.ShardedSampler(global_sampler, ctx.rank, ctx.world_size)
        plan = StepPlan(len(global_sampler))
    if plan.count(0) == 0:
        raise ValueError(f"the training set has {len(dataset)} examples, fewer than batch_size={config.batch_size}")
    total_steps = plan.total(config.epochs, config.max_steps)

    if ctx.is_main:
        clean_interrupted_writes(out_dir)
    logger = RunLogger(out_dir, config, ctx)
    ckpt_root = out_dir / "checkpoints"
    batches = batches_of(collate_fn)
    state = load_latest(ckpt_root, model, config, len(dataset), ctx, batches)
    skeleton = D.meta_skeleton(model) if strategy == "fsdp" and ctx.is_main else None
    train_model = D.wrap_model(model, strategy, ctx, mixed_precision=DTYPES[config.precision]
                               if strategy == "fsdp" and config.precision != "fp32" else None)  # fmt: skip
    trainable = [p for p in train_model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = linear_schedule(optimizer, total_steps=total_steps, warmup_steps=config.warmup_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    checkpointer = Checkpointer(ckpt_root, config=config, n_train=len(dataset), ctx=ctx, strategy=strategy,
                                model=model, train_model=train_model, optimizer=optimizer, scheduler=scheduler,
                                scaler=scaler, batches=batches)  # fmt: skip
    if state is not None:
        progress = checkpointer.restore(state)
        logger.log.truncate_after(progress.step)
    else:
        progress = TrainProgress()
        logger.log.reset()
        if ctx.is_main:
            # a fresh run: an earlier run's checkpoints and best adapter must not be resumed or reported later
            for stale in (ckpt_root, out_dir / "best"):
                if stale.exists():
                    shutil.rmtree(stale)

    length = _choose_step(model, dataset, collate_fn, config=config, ctx=ctx, device=device)
    if length is not None:
        train_step: EagerStep | GraphedStep = _graphed_step(train_model, optimizer, scheduler, trainable,
                                                            length=length, config=config)  # fmt: skip
    else:
        if state is not None:
            set_capturable(optimizer, False)  # a checkpoint of a CUDA-graph run holds device step counts
        train_step = EagerStep(train_model, optimizer, scheduler, scaler, trainable, config=config, ctx=ctx,
                               strategy=strategy, device=device)  # fmt: skip

    def save(target: Path) -> Any:
        return D.save_unsharded(train_model, strategy, ctx, save_fn, target, skeleton)

    def evaluate(epoch: float) -> None:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            # Every rank evaluates (FSDP needs all ranks in the forward); rank 0's numbers decide for all.
            metrics = {k: float(v) for k, v in eval_fn(model).items() if isinstance(v, (int, float))}
        metrics = ctx.broadcast(metrics)
        model.train(was_training)
        progress.last_eval = metrics
        logger.eval(progress.step, epoch, metrics)
        if config.best_metric not in metrics:
            raise ValueError(
                f"best_metric {config.best_metric!r} is not among the evaluation metrics {sorted(metrics)}"
            )
        value, best = metrics[config.best_metric], progress.best_value
        better = best is None or (value > best if config.maximize else value < best)
        if better and math.isfinite(value):
            progress.best_value, progress.best_step = value, progress.step
            save(out_dir / "best")

    logger.start(total_steps, progress.step)
    model.train()
    local = config.batch_size // ctx.world_size
    micro = min(config.batch_size // config.accumulation_steps, local)
    last_eval_step = progress.step if progress.resumed_from is not None else -1
    while progress.step < total_steps:
        epoch, index = plan.position(progress.step)
        if packed_rows:
            # every rank lays the global batch out and trains its own rows, in micro-batches of rows
            batch = collate_fn([dataset[i] for i in global_sampler.batch(epoch, index)])
            mine = range(ctx.rank * local, (ctx.rank + 1) * local)
            chunks = [{k: batch[k][mine.start + j : mine.start + j + micro] for k in _ROW_KEYS}
                      for j in range(0, local, micro)]  # fmt: skip
        else:
            examples = [dataset[i] for i in sampler.batch(epoch, index)]
            chunks = [collate_fn(examples[j : j + micro]) for j in range(0, len(examples), micro)]
        if length is not None and "cu_seqlens" in chunks[0]:
            raise ValueError("cuda_graph does not support packed batches (cu_seqlens); pass --data.packing false")
        n_targets = sum(count_targets(c["labels"]) for c in chunks)
        if ctx.enabled:
            n_targets = int(ctx.all_reduce_sum([n_targets])[0])
        if n_targets == 0:
            raise ValueError(f"batch {index} of epoch {epoch} has no target tokens (labels are all {IGNORE_INDEX})")
        try:
            result = train_step(chunks, n_targets, step=progress.step, epoch=epoch)
        except NonFiniteLossError as e:
            logger.error(progress.step + 1, epoch, str(e))
            train_step.close()
            raise
        scheduler.step()
        progress.step += 1
        step = progress.step
        logger.step(step, plan.epochs(step), result)
        if eval_fn is not None:
            end_of_epoch = plan.position(step)[1] == 0
            if (config.eval_every_epoch and end_of_epoch) or (config.eval_steps and step % config.eval_steps == 0):
                evaluate(plan.epochs(step))
                last_eval_step = step
        if checkpointer.due(step, total_steps):
            checkpointer.save(progress, epoch, index)
        if on_step is not None:
            on_step(step)
    # the graph's gradients and memory pool go now, not whenever the step object is collected
    train_step.close()
    logger.close()
    step = progress.step
    if eval_fn is not None and last_eval_step != step:
        evaluate(plan.epochs(step))
    final_dir = save(out_dir / "final")
    return TrainResult(step=step, epoch=plan.epochs(step), best_metric=config.best_metric,
                       best_value=progress.best_value, best_step=progress.best_step,
                       final_dir=Path(final_dir) if final_dir else out_dir / "final", last_eval=progress.last_eval,
                       resumed_from=progress.resumed_from)  # fmt: skip


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, finite_json(obj, indent=2, default=str) + "\n")
