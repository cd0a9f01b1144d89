"""Multi-process training on ``torch.distributed``: process group, sharded batches, DDP / FSDP2, rank-0 I/O.

``fit`` calls :func:`init_distributed`, so ``ssmtune train`` runs unchanged under

    torchrun --nproc_per_node 4 -m ssmtune.cli train --recipe ...        # or: accelerate launch -m ssmtune.cli train ...

Both launchers set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; those are the only
inputs read here (``accelerate`` itself is not needed). Design:

- every rank builds the same global batch from the shared :class:`~ssmtune.train.loop.EpochSampler` and keeps a
  contiguous, disjoint slice of it (:class:`ShardedSampler`), so the global batch of a W-rank run is the 1-rank one;
- the summed token loss of each rank is divided by the *global* target-token count (all-reduced), then multiplied by W
  because DDP and FSDP average gradients over ranks: the update equals the 1-rank update up to fp32 rounding;
- PEFT runs use DDP, which only registers (and all-reduces) parameters with ``requires_grad``; full fine-tuning uses
  FSDP2 (``fully_shard``) with one unit per :class:`~ssmtune.models.lm.Block` plus the root (embedding, norm_f, head);
- checkpoints and saved models are unsharded (FSDP: full state dict gathered to rank 0), so a run can resume with
  another world size; only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

Strategy = Literal["auto", "ddp", "fsdp"]
STRATEGIES = ("auto", "ddp", "fsdp")


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job. A single process has rank 0, world size 1 and no process group."""

    rank: int = 0
    """Global rank of this process."""
    world_size: int = 1
    """Number of processes."""
    local_rank: int = 0
    """Rank on this host; picks the GPU (``cuda:<local_rank>``)."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """The device this process trains on."""
    backend: str | None = None
    """``nccl`` / ``gloo``, or None without a process group."""
    owns_group: bool = False
    """Whether :func:`init_distributed` created the process group (and :func:`shutdown` should destroy it)."""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum a few Python numbers over ranks (float64; exact for token counts below 2**53)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.backend == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (picklable objects)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device if self.backend == "nccl" else None)
        return box[0]


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


def env_ranks() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the torchrun / accelerate environment variables (0, 1, 0 when unset)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1:
        raise ValueError(f"WORLD_SIZE must be >= 1, got {world!r}")
    if not 0 <= rank < world:
        raise ValueError(f"RANK must be in [0, WORLD_SIZE={world}), got {rank!r}")
    return rank, world, local


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)  # one GPU per process
    return dev


def init_distributed(device: str = "auto", *, backend: str | None = None, timeout_s: float = 1800.0) -> DistContext:
    """The context of this process; creates the process group when launched with ``WORLD_SIZE > 1``.

    Idempotent: when a group already exists (created by the caller, by a previous call, or by ``accelerate``), it is
    used as is. Backend: ``nccl`` on CUDA, ``gloo`` on CPU, unless ``backend`` says otherwise.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = _env_int("LOCAL_RANK", rank)
        dev = _pick_device(device, local)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistContext(rank=rank, world_size=world, local_rank=local, device=dev, backend=dist.get_backend())
    rank, world, local = env_ranks()
    dev = _pick_device(device, local)
    if world == 1:
        return DistContext(device=dev)
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    return DistContext(rank=rank, world_size=world, local_rank=local, device=dev, backend=backend, owns_group=True)


def shutdown(ctx: DistContext) -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


# --- data -------------------------------------------------------------------------------------------------------------


def shard_batch(indices: list[int], rank: int, world_size: int) -> list[int]:
    """The contiguous slice of a global batch that ``rank`` processes; the slices are disjoint and cover the batch."""
    if len(indices) % world_size:
        raise ValueError(f"a global batch of {len(indices)} examples does not split over world_size={world_size}")
    per = len(indices) // world_size
    return indices[rank * per : (rank + 1) * per]


class ShardedSampler:
    """This rank's part of every global batch of ``base`` (an ``EpochSampler``).

    All ranks draw the same global batch (same seed, same ``(epoch, batch)`` position) and keep their own slice, so
    the union over ranks is exactly the 1-rank run's batch and the position stays world-size independent.
    """

    def __init__(self, base: Any, rank: int = 0, world_size: int = 1) -> None:
        if base.batch_size % world_size:
            raise ValueError(f"batch_size must be a multiple of the world size {world_size}, got {base.batch_size!r}")
        self.base, self.rank, self.world_size = base, rank, world_size

    @property
    def local_batch_size(self) -> int:
        return self.base.batch_size // self.world_size

    def __len__(self) -> int:
        return len(self.base)

    def batch(self, epoch: int, index: int) -> list[int]:
        return shard_batch(self.base.batch(epoch, index), self.rank, self.world_size)


# --- wrapping ---------------------------------------------------------------------------------------------------------


def resolve_strategy(strategy: str, model: nn.Module, ctx: DistContext) -> Literal["none", "ddp", "fsdp"]:
    """``none`` for one process; ``auto`` picks DDP when only some parameters train (PEFT), FSDP for full FT."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not ctx.enabled:
        return "none"
    if strategy != "auto":
        return strategy  # type: ignore[return-value]
    params = list(model.parameters())
    return "fsdp" if all(p.requires_grad for p in params) else "ddp"


def default_wrap_classes(model: nn.Module | None = None) -> tuple[type[nn.Module], ...]:
    """The FSDP units: ssmtune's Mamba ``Block``s, or a transformers model's decoder layers (``_no_split_modules``)."""
    from ssmtune.models.lm import Block

    names = set(getattr(model, "_no_split_modules", None) or [])
    hosted = tuple({type(m) for m in model.modules() if type(m).__name__ in names}) if names else ()
    return hosted or (Block,)


def wrap_model(
    model: nn.Module,
    strategy: str,
    ctx: DistContext,
    *,
    mixed_precision: torch.dtype | None = None,
    wrap_classes: tuple[type[nn.Module], ...] | None = None,
) -> nn.Module:
    """The module to call in the training step: ``model`` itself (none), a DDP wrapper, or ``model`` sharded in place.

    DDP only all-reduces parameters with ``requires_grad`` (the adapter in PEFT runs); ``find_unused_parameters`` is
    False, so every trainable parameter must take part in each forward. FSDP2 shards each ``wrap_classes`` module
    (default: every Mamba :class:`Block`, or every decoder layer of a transformers model), then the root; ``mixed_precision`` sets the all-gathered compute dtype while
    the sharded master weights and gradient reduction stay fp32.
    """
    if strategy == "none":
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        # No buffers change in forward, so syncing them every step would be wasted traffic (newer torch renames it).
        params = inspect.signature(DistributedDataParallel).parameters
        sync = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False, **{sync: False})
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
        mp = MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32)
        classes = default_wrap_classes(model) if wrap_classes is None else wrap_classes
        for module in list(model.modules()):
            if module is not model and isinstance(module, classes):
                fully_shard(module, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        return model
    raise ValueError(f"strategy must be one of none, ddp, fsdp, got {strategy!r}")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module behind a DDP wrapper (FSDP2 shards in place, so there is nothing to strip)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def grad_sync(model: nn.Module, strategy: str, sync: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
    if strategy == "ddp" and not sync:
        return model.no_sync()
    if strategy == "fsdp":
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def as_float(x: torch.Tensor | float) -> float:
    """A (possibly DTensor) scalar as a Python float; FSDP's clip_grad_norm_ returns a DTensor."""
    if hasattr(x, "full_tensor"):
        x = x.full_tensor()
    return float(x)


# --- state dicts (unsharded, so resume works across world sizes) ---------------------------------------------------------


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def trainable_tensors(model: nn.Module, strategy: str) -> dict[str, torch.Tensor] | None:
    """Full trainable tensors by name on rank 0 (None on other ranks under FSDP). Collective under FSDP."""
    from ssmtune.train.checkpoint import trainable_state_dict

    if strategy != "fsdp":
        return trainable_state_dict(unwrap(model))
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    names = {n for n, p in model.named_parameters() if p.requires_grad}
    full = get_model_state_dict(model, options=_full_options())
    if not full:
        return None
    return {n: t.contiguous() for n, t in full.items() if n in names}


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, strategy: str) -> dict[str, Any] | None:
    """The optimizer state in ``optimizer.state_dict()``'s index-keyed layout, unsharded; None off rank 0 (FSDP).

    The layout is the same for every world size, so a checkpoint from a W-rank run loads into any other.
    """
    if strategy != "fsdp":
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    full = get_optimizer_state_dict(model, optimizer, options=_full_options())
    if not full:
        return None
    index, groups = {}, []
    for group in full["param_groups"]:
        ids = []
        for name in group["params"]:
            index[name] = len(index)
            ids.append(index[name])
        groups.append({**group, "params": ids})
    return {"state": {index[k]: v for k, v in full["state"].items()}, "param_groups": groups}


def load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], strategy: str
) -> None:
    """Load an index-keyed, unsharded optimizer state (from any world size) into this rank's optimizer."""
    if strategy != "fsdp":
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    groups = _param_names(model, optimizer)
    flat = [n for g in groups for n in g]
    saved_groups = state["param_groups"]
    if [len(g["params"]) for g in saved_groups] != [len(g) for g in groups]:
        raise ValueError(
            f"optimizer state has groups of {[len(g['params']) for g in saved_groups]} parameters, "
            f"the model {[len(g) for g in groups]}"
        )
    by_name = {
        "state": {flat[int(i)]: v for i, v in state["state"].items()},
        "param_groups": [{**sg, "params": g} for sg, g in zip(saved_groups, groups, strict=True)],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


# --- rank-0 I/O ---------------------------------------------------------------------------------------------------------


def meta_skeleton(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are on the meta device (no memory), for saving under FSDP."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def save_unsharded(
    model: nn.Module,
    strategy: str,
    ctx: DistContext,
    save_fn: Callable[[nn.Module, Path], Any] | None,
    path: Path,
    skeleton: nn.Module | None = None,
) -> Any:
    """``save_fn(model, path)`` on rank 0 with full (unsharded) weights; every rank must call it under FSDP.

    ``save_fn=None`` saves nothing (and gathers nothing), e.g. in benchmarks.
    """
    result = None
    if save_fn is None:
        return None
    if strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        full = get_model_state_dict(model, options=_full_options())
        if ctx.is_main:
            if skeleton is None:
                raise ValueError("save_unsharded under FSDP needs the meta skeleton taken before sharding")
            # Fill a fresh copy each time: assign=True hands the CPU tensors over without another copy.
            replica = copy.deepcopy(skeleton)
            replica.load_state_dict(full, assign=True)
            result = save_fn(replica, path)
    elif ctx.is_main:
        result = save_fn(unwrap(model), path)
    ctx.barrier()
    return result


@contextlib.contextmanager
def main_first(ctx: DistContext) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. to create folders or download), the others after it."""
    if not ctx.is_main:
        ctx.barrier()
    yield
    if ctx.is_main:
        ctx.barrier()
