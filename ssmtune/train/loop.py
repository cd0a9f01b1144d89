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
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ssmtune.eval.metrics import finite_json
from ssmtune.models.lm import causal_lm_loss
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

IGNORE_INDEX = -100
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Parameters that stay fp32 when the frozen base is cast down (as in the reference code: A_log and D stay fp32).
FP32_PARAM_SUFFIXES = ("A_log", ".D", "D_skip", "dt_bias")


@dataclass(kw_only=True)
class TrainConfig:
    """Optimisation settings. Defaults follow METHODS.md §7 (HF Trainer defaults as used by the papers)."""

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
    cuda_graph: bool = False
    """Experimental: replay every optimizer step (forward, backward, clipping, AdamW) from one CUDA graph, so that
    Python and kernel launches no longer bound small steps (2.3x / 6.6x faster at 4 x 512 on a 130M Mamba-1 / Mamba-2,
    docs/training.md).
    Single CUDA process, precision bf16 or fp32, no gradient accumulation; every batch is padded to the longest example
    of the training set (right padding, ignored labels: the loss is unchanged)."""

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
        if self.cuda_graph and self.precision == "fp16":
            raise ValueError("cuda_graph does not support precision 'fp16' (its loss scaler checks for inf on the "
                             "host every step); use bf16 or fp32")  # fmt: skip
        if self.cuda_graph and self.accumulation_steps > 1:
            raise ValueError(f"cuda_graph needs one micro-batch per step, got batch_size={self.batch_size} with "
                             f"micro_batch_size={self.micro_batch_size}")  # fmt: skip
        if not 0 <= self.lr < math.inf:
            raise ValueError(f"lr must be a finite number >= 0, got {self.lr!r}")
        for name in ("eval_steps", "save_steps", "warmup_steps", "log_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")

    @property
    def accumulation_steps(self) -> int:
        return self.batch_size // (self.micro_batch_size or self.batch_size)

    @property
    def maximize(self) -> bool:
        return self.greater_is_better if self.greater_is_better is not None else "loss" not in self.best_metric


# Settings that define the optimisation trajectory: a resumed run must use the same ones (the others, e.g. eval_steps,
# save_steps, strategy and the world size, may change between runs).
RESUME_FIXED = ("epochs", "max_steps", "batch_size", "lr", "weight_decay", "warmup_steps", "max_grad_norm", "seed",
                "precision", "best_metric", "greater_is_better")  # fmt: skip


def check_resume_config(saved: dict[str, Any], config: TrainConfig, n_train: int, where: Path) -> None:
    """Refuse to continue a checkpoint written with other optimisation settings or another training set size."""
    now = asdict(config)
    diffs = [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in RESUME_FIXED if k in saved and saved[k] != now[k]]
    old_n = saved.get("_n_train")
    if old_n is not None and old_n != n_train:
        diffs.append(f"training examples: {old_n} -> {n_train}")
    if diffs:
        raise ValueError(
            f"cannot resume from {str(where)!r}: it was written with other settings ({'; '.join(diffs)}). "
            "Restore them, or start a fresh run with resume=False (`--train.resume false`), which deletes these "
            "checkpoints."
        )


def check_checkpoint_settings(checkpoint: str | Path, config: TrainConfig, n_train: int) -> None:
    """``check_resume_config`` against a checkpoint folder (mmap: only the pickled settings are read, not the
    optimizer's tensors)."""
    saved = read_state(checkpoint, mmap=True)
    check_resume_config(saved.get("config") or {}, config, n_train, Path(checkpoint))


def check_resume(out_dir: str | Path, config: TrainConfig, n_train: int) -> None:
    """Raise now (before anything is written) if ``fit(..., out_dir=out_dir)`` would refuse to resume."""
    # fit() itself warns about a damaged checkpoint it skips
    latest = latest_readable_checkpoint(Path(out_dir) / "checkpoints", warn=False) if config.resume else None
    if latest is not None:
        check_checkpoint_settings(latest, config, n_train)


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


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of cross-entropy over target positions and their count; position t predicts labels[t + 1].

    logits: [B, L, V]; labels: [B, L] with IGNORE_INDEX where there is no target (the HF convention).
    """
    return token_loss_sum(logits, labels), count_targets(labels)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The summed cross-entropy of :func:`token_loss` alone: no host synchronisation (CUDA-graph safe)."""
    # the models' own loss (labels shifted, not logits sliced; fp32 from the logits' dtype), summed
    return causal_lm_loss(logits, labels, reduction="sum")


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (unpadded) input tokens of a collated batch, for the tokens/s log."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def count_targets(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def save_model(model: nn.Module, out_dir: str | Path) -> Path:
    """Save an adapter (``save_adapter``) or, for full fine-tuning, the whole model (``save_pretrained``)."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}-{os.getpid()}")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    if hasattr(model, "save_adapter"):
        model.save_adapter(tmp)
    elif hasattr(model, "save_pretrained"):
        model.save_pretrained(tmp)
    else:
        from safetensors.torch import save_file

        tmp.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    # Swap the folder in whole so a reader never sees half of it.
    if out_dir.exists():
        import shutil

        old = out_dir.with_name(f".old-{out_dir.name}-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
    return out_dir


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
        D.atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def reset(self) -> None:
        D.atomic_write_text(self.path, "")

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
            ``labels`` [B, L] (labels aligned with input_ids, IGNORE_INDEX outside the target).
        config: the optimisation settings.
        out_dir: run folder: ``metrics.jsonl``, ``checkpoints/``, ``best/`` (best by ``config.best_metric``) and
            ``final/`` (the adapter, or the whole model for full fine-tuning).
        eval_fn: returns a dict of metrics (``loss``, ``accuracy``, ...); called in eval mode under no_grad.
        save_fn: how to save the trained model to a folder (default: save_adapter / save_pretrained); None: never.
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
    model.to(device)
    strategy = D.resolve_strategy(config.strategy, model, ctx)
    if strategy == "fsdp" and config.precision == "fp16":
        raise ValueError("precision 'fp16' is not supported with strategy 'fsdp' (use bf16), got 'fp16'")
    if strategy != "fsdp":
        # FSDP keeps one dtype per shard unit: it casts to the compute dtype in its all-gather instead.
        apply_precision(model, config.precision)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters (did the adapter attach anything?)")
    # Trainable parameters live in fp32 (no bf16 optimiser state: METHODS.md §8 pitfall 6, fixed deliberately).
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()

    global_sampler = EpochSampler(len(dataset), config.batch_size, seed=config.seed)
    sampler = D.ShardedSampler(global_sampler, ctx.rank, ctx.world_size)
    steps_per_epoch = len(global_sampler)
    if steps_per_epoch == 0:
        raise ValueError(f"the training set has {len(dataset)} examples, fewer than batch_size={config.batch_size}")
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps) if config.epochs >= 1 else config.max_steps

    if ctx.is_main:
        clean_interrupted_writes(out_dir)
    log = MetricsLog(out_dir / "metrics.jsonl") if ctx.is_main else _NoLog()
    ckpt_root = out_dir / "checkpoints"
    step, best_value, best_step, resumed_from = 0, None, None, None
    last_eval: dict[str, float] = {}
    # Rank 0 picks the checkpoint so that every rank resumes from the same one.
    latest = ctx.broadcast(latest_readable_checkpoint(ckpt_root) if config.resume else None)
    state = None
    if latest is not None:
        # The settings are checked before any weight is loaded: a refused resume leaves the caller's model untouched.
        check_checkpoint_settings(latest, config, len(dataset))
        # Full (unsharded) weights go into the plain model before it is wrapped: any world size can resume.
        state = load_checkpoint(latest, model)

    skeleton = D.meta_skeleton(model) if strategy == "fsdp" and ctx.is_main else None
    train_model = D.wrap_model(model, strategy, ctx, mixed_precision=DTYPES[config.precision]
                               if strategy == "fsdp" and config.precision != "fp32" else None)  # fmt: skip
    # DDP averages gradients over ranks and so does FSDP; the loss is scaled back to a sum over the global batch.
    grad_scale = float(ctx.world_size) if strategy != "none" else 1.0
    trainable = [p for p in train_model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = linear_schedule(optimizer, total_steps=total_steps, warmup_steps=config.warmup_steps)
    use_scaler = config.precision == "fp16"
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    autocast_dtype = DTYPES[config.precision]
    if state is not None:
        D.load_optimizer_state(model, optimizer, state["optimizer"], strategy)
        scheduler.load_state_dict(state["scheduler"])
        if use_scaler and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        step, best_value, best_step = state["step"], state["best_value"], state["best_step"]
        last_eval = state.get("last_eval", {})
        resumed_from = step
        log.truncate_after(step)
    else:
        log.reset()
        if ctx.is_main:
            # a fresh run: an earlier run's checkpoints and best adapter must not be resumed or reported later
            for stale in (ckpt_root, out_dir / "best"):
                if stale.exists():
                    shutil.rmtree(stale)

    graphed = None
    if config.cuda_graph:
        if device.type != "cuda" or ctx.enabled:
            raise ValueError(f"cuda_graph needs a single CUDA process, got device {device} with world size "
                             f"{ctx.world_size}")  # fmt: skip
        warnings.warn("cuda_graph is experimental: fit's graphed path passed its GPU tests, but emptying the CUDA "
                      "cache after a graph was freed faulted once in a benchmark (do not call torch.cuda.empty_cache() "
                      "after a graphed fit; docs/training.md, 'CUDA graphs')", stacklevel=2)  # fmt: skip
        set_capturable(optimizer, True)  # after the checkpoint's state: loading resets the groups' settings
        # every step replays one graph of one shape: the global batch, padded to the longest example
        length = max(collate_fn([dataset[i]])["input_ids"].shape[1] for i in range(len(dataset)))
        graphed = GraphedTrainStep(train_model, optimizer, trainable, rows=config.batch_size, length=length,
                                   clip=config.max_grad_norm or float("inf"), autocast_dtype=autocast_dtype,
                                   loss_fn=token_loss_sum, ignore_index=IGNORE_INDEX)  # fmt: skip
    elif state is not None:
        set_capturable(optimizer, False)  # a checkpoint of a CUDA-graph run holds device step counts

    def save(target: Path) -> Any:
        return D.save_unsharded(train_model, strategy, ctx, save_fn, target, skeleton)

    def evaluate(epoch: float) -> None:
        nonlocal best_value, best_step, last_eval
        was_training = model.training
        model.eval()
        with torch.no_grad():
            # Every rank evaluates (FSDP needs all ranks in the forward); rank 0's numbers decide for all.
            metrics = {k: float(v) for k, v in eval_fn(model).items() if isinstance(v, (int, float))}
        metrics = ctx.broadcast(metrics)
        model.train(was_training)
        last_eval = metrics
        log.write({"type": "eval", "step": step, "epoch": epoch, **metrics})
        if config.best_metric not in metrics:
            raise ValueError(
                f"best_metric {config.best_metric!r} is not among the evaluation metrics {sorted(metrics)}"
            )
        value = metrics[config.best_metric]
        better = best_value is None or (value > best_value if config.maximize else value < best_value)
        if better and math.isfinite(value):
            best_value, best_step = value, step
            save(out_dir / "best")

    def stop(msg: str, epoch: int) -> NonFiniteLossError:
        log.write({"type": "error", "step": step + 1, "epoch": epoch, "message": msg})
        return NonFiniteLossError(msg)

    def eager_step(chunks: list[dict], n_targets: int, epoch: int) -> tuple[float, float, float]:
        """One optimizer step over the micro-batches ``chunks``; returns the loss, the gradient norm and the lr."""
        nonlocal tokens_since
        loss_total = 0.0
        for c, chunk in enumerate(chunks):
            chunk = {k: v.to(device) if torch.is_tensor(v) else v for k, v in chunk.items()}
            with D.grad_sync(train_model, strategy, sync=c == len(chunks) - 1):
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32):
                    out = train_model(chunk["input_ids"], attention_mask=chunk.get("attention_mask"))
                loss_sum, _ = token_loss(out.logits, chunk["labels"])
                loss = loss_sum / n_targets
                # One process stops at once; with several, all ranks must agree first (after the step's loop).
                if not ctx.enabled and not torch.isfinite(loss):
                    lr = float(scheduler.get_last_lr()[0])
                    raise stop(f"non-finite training loss ({loss.item()}) at step {step + 1} (epoch {epoch}, "
                               f"lr {lr:.3g}); training stopped. Try a lower --train.lr, --train.precision fp32, "
                               "or check the data.", epoch)  # fmt: skip
                scaler.scale(loss * grad_scale if grad_scale != 1.0 else loss).backward()
            loss_total += loss.item()
            tokens_since += count_tokens(chunk)
        if ctx.enabled:
            loss_total = ctx.all_reduce_sum([loss_total])[0]
            if not math.isfinite(loss_total):
                lr = float(scheduler.get_last_lr()[0])
                raise stop(f"non-finite training loss ({loss_total}) at step {step + 1} (epoch {epoch}, lr {lr:.3g}); "
                           "training stopped. Try a lower --train.lr, --train.precision fp32, or check the data.",
                           epoch)  # fmt: skip
        scaler.unscale_(optimizer)
        clip = config.max_grad_norm if config.max_grad_norm else float("inf")
        grad_norm = D.as_float(torch.nn.utils.clip_grad_norm_(trainable, clip))
        if not math.isfinite(grad_norm) and not use_scaler:
            raise stop(f"non-finite gradient norm ({grad_norm}) at step {step + 1} (epoch {epoch}); training stopped.",
                       epoch)  # fmt: skip
        lr = float(scheduler.get_last_lr()[0])
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss_total, grad_norm, lr

    bar = _progress(total_steps, step, config.progress and ctx.is_main)
    model.train()
    local_batch = sampler.local_batch_size
    micro = min(config.batch_size // config.accumulation_steps, local_batch)
    tokens_since, time_since = 0, time.perf_counter()
    last_eval_step = step if resumed_from is not None else -1
    while step < total_steps:
        epoch, index = divmod(step, steps_per_epoch)
        examples = [dataset[i] for i in sampler.batch(epoch, index)]
        chunks = [collate_fn(examples[j : j + micro]) for j in range(0, len(examples), micro)]
        n_targets = sum(count_targets(c["labels"]) for c in chunks)
        if ctx.enabled:
            n_targets = int(ctx.all_reduce_sum([n_targets])[0])
        if n_targets == 0:
            raise ValueError(f"batch {index} of epoch {epoch} has no target tokens (labels are all {IGNORE_INDEX})")
        if graphed is not None:
            chunk = chunks[0]  # one micro-batch per step (checked by TrainConfig)
            loss_t, norm_t = graphed(chunk, n_targets)
            loss_total, grad_norm = loss_t.item(), norm_t.item()
            tokens_since += count_tokens(chunk)
            lr = float(scheduler.get_last_lr()[0])
            if not (math.isfinite(loss_total) and math.isfinite(grad_norm)):
                raise stop(f"non-finite training loss ({loss_total}) or gradient norm ({grad_norm}) at step {step + 1} "
                           f"(epoch {epoch}, lr {lr:.3g}); training stopped (the step applied zero gradients). Try a "
                           "lower --train.lr, --train.precision fp32, or check the data.", epoch)  # fmt: skip
        else:
            loss_total, grad_norm, lr = eager_step(chunks, n_targets, epoch)
        scheduler.step()
        step += 1

        epoch_float = step / steps_per_epoch
        if config.log_steps and (step % config.log_steps == 0 or step == total_steps):
            elapsed = max(time.perf_counter() - time_since, 1e-9)
            tokens = ctx.all_reduce_sum([tokens_since])[0] if ctx.enabled else tokens_since
            rate = tokens / elapsed
            log.write({"type": "train", "step": step, "epoch": epoch_float, "loss": loss_total, "lr": lr,
                       "grad_norm": grad_norm, "tokens_per_s": rate})  # fmt: skip
            tokens_since, time_since = 0, time.perf_counter()
            if bar is not None:
                bar.set_postfix(loss=f"{loss_total:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:.0f}", refresh=False)
        if bar is not None:
            bar.update(1)
        if eval_fn is not None:
            end_of_epoch = step % steps_per_epoch == 0
            if (config.eval_every_epoch and end_of_epoch) or (config.eval_steps and step % config.eval_steps == 0):
                evaluate(epoch_float)
                last_eval_step = step
        if config.save_steps and step % config.save_steps == 0 and step < total_steps:
            tensors = D.trainable_tensors(train_model, strategy) if strategy == "fsdp" else None
            optim_state = D.optimizer_state(model, optimizer, strategy)
            if ctx.is_main:
                state = {"optimizer": optim_state, "scheduler": scheduler.state_dict(),
                         "scaler": scaler.state_dict() if use_scaler else None, "best_value": best_value,
                         "best_step": best_step, "last_eval": last_eval,
                         "sampler": {"epoch": epoch, "next_batch": index + 1},
                         "config": {**asdict(config), "_n_train": len(dataset)},
                         "world_size": ctx.world_size}  # fmt: skip
                save_checkpoint(ckpt_root, step=step, model=D.unwrap(model), state=state, keep_last=config.keep_last,
                                tensors=tensors)  # fmt: skip
            ctx.barrier()
        if on_step is not None:
            on_step(step)
    if bar is not None:
        bar.close()
    if eval_fn is not None and last_eval_step != step:
        evaluate(step / steps_per_epoch)
    final_dir = save(out_dir / "final")
    return TrainResult(step=step, epoch=step / steps_per_epoch, best_metric=config.best_metric, best_value=best_value,
                       best_step=best_step, final_dir=Path(final_dir) if final_dir else out_dir / "final",
                       last_eval=last_eval, resumed_from=resumed_from)  # fmt: skip


def write_json(path: str | Path, obj: Any) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, default=str) + "\n")
