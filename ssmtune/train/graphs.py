"""CUDA-graph capture of a whole training step (forward, backward, optimizer step).

A PEFT step on a small model is launch-bound: at batch 4 × 512 on a 130M Mamba the GPU idles between a few thousand
small kernels while Python and autograd queue them. Replaying one captured graph removes that host work. The graph
fixes every tensor's shape and address, so the step reads its batch from static tensors that the caller refills
before each replay (``GraphedStep.run``).

Requirements (checked where they can be): a CUDA device; an optimizer built with ``capturable=True`` (AdamW and Adam
keep their step count on the device then); no host synchronisation inside the step (``.item()``, ``bool(tensor)``);
autocast with ``cache_enabled=False`` (cached casts of the trainable weights would be baked into the graph).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ssmtune.ops.varlen import RESET_ALIGN

__all__ = ["GraphedStep", "GraphedTrainStep", "pad_batch"]


class GraphedStep:
    """Capture ``step(batch)`` once and replay it on new batches of the same shapes.

    ``step`` takes a dict of tensors, runs forward + backward (+ ``optimizer.step()``), and returns the loss tensor;
    it must start by zeroing the gradients with ``set_to_none=True`` so that the captured backward allocates them
    from the graph's memory pool. ``warmup`` eager steps run on a side stream before the capture (the caching
    allocator, autotuning and Triton compilation must happen outside the graph); they are real training steps on
    ``example`` and change the parameters, as the steps after them will, unless ``restore`` is set: then the
    parameters and the optimizers' state are put back as they were before the warm-up (a fresh optimizer's state is
    zeroed, which is what its first step would have created). The capture itself runs nothing. ``step`` may return
    a tuple of tensors (e.g. the loss and the gradient norm); ``run`` returns the same, as static tensors.

    Example::

        opt = torch.optim.AdamW(params, lr=1e-4, capturable=True)
        def step(b):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                loss = model(b["input_ids"], labels=b["labels"]).loss
            loss.backward()
            opt.step()
            return loss
        graphed = GraphedStep(step, first_batch, optimizers=[opt])
        for batch in loader:                  # every batch of first_batch's shapes
            loss = graphed.run(batch)         # a device tensor; .item() syncs
    """

    def __init__(
        self,
        step: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        example: dict[str, torch.Tensor],
        *,
        optimizers: list[torch.optim.Optimizer] = (),
        warmup: int = 3,
        restore: bool = False,
    ) -> None:
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (allocator and kernel compilation happen outside the graph), "
                             f"got {warmup!r}")  # fmt: skip
        for opt in optimizers:
            for group in opt.param_groups:
                if "capturable" in group and not group["capturable"]:
                    raise ValueError(f"optimizer {type(opt).__name__} must be built with capturable=True for a CUDA "
                                     "graph (its step count would otherwise live on the host)")  # fmt: skip
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA device; none is available (run the step eagerly instead)")
        bad = {k: v.device for k, v in example.items() if not (torch.is_tensor(v) and v.is_cuda)}
        if bad:
            raise ValueError(f"every batch entry must be a CUDA tensor; not: {bad}")
        self.static = {k: v.clone() for k, v in example.items()}
        saved = _snapshot(optimizers) if restore else None
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                out = step(self.static)
            del out
            if saved is not None:
                _restore(optimizers, saved)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # cuBLAS keeps one workspace per (handle, stream), allocated on first use. One allocated during the capture
        # lives in this graph's private pool: left in cuBLAS's cache, later matmuls and later captures would use
        # memory that is released with this graph (illegal addresses once it is gone or the cache is emptied).
        # Clearing the cache before and after the capture keeps every workspace the graph uses inside its own pool
        # (what torch's inductor does around its graph recordings).
        _clear_cublas_workspaces()
        with torch.cuda.graph(self.graph):
            out = step(self.static)
        _clear_cublas_workspaces()
        self.out = tuple(t.detach() for t in out) if isinstance(out, tuple) else out.detach()
        # The capture only recorded the kernels: no step of the graph has run yet.

    def run(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Copy ``batch`` into the static inputs and replay the step; returns the step's (static) output tensors,
        overwritten by the next replay."""
        if batch.keys() != self.static.keys():
            raise ValueError(f"batch keys {sorted(batch)} differ from the captured ones {sorted(self.static)}")
        for k, v in batch.items():
            if v.shape != self.static[k].shape:
                raise ValueError(f"batch[{k!r}] has shape {tuple(v.shape)}; the graph was captured for "
                                 f"{tuple(self.static[k].shape)}")  # fmt: skip
            self.static[k].copy_(v, non_blocking=True)
        self.graph.replay()
        return self.out


def _clear_cublas_workspaces() -> None:
    torch.cuda.synchronize()
    torch._C._cuda_clearCublasWorkspaces()


def _snapshot(optimizers) -> list[tuple[list[torch.Tensor], dict | None]]:
    """Copies of every optimized parameter and of each optimizer's state tensors (None: no state yet)."""
    out = []
    for opt in optimizers:
        params = [p for g in opt.param_groups for p in g["params"]]
        state = {id(p): {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)} for p in params
                 if p in opt.state} or None  # fmt: skip
        out.append(([p.detach().clone() for p in params], state))
    return out


@torch.no_grad()
def _restore(optimizers, saved) -> None:
    for opt, (values, state) in zip(optimizers, saved, strict=True):
        params = [p for g in opt.param_groups for p in g["params"]]
        for p, v in zip(params, values, strict=True):
            p.copy_(v)
            p.grad = None
        for p in params:
            for k, v in opt.state.get(p, {}).items():
                if not torch.is_tensor(v):
                    continue
                if state is None or id(p) not in state:
                    v.zero_()  # a fresh optimizer: its state starts at zero (moments, step count)
                else:
                    v.copy_(state[id(p)][k])


def pad_batch(batch: dict[str, torch.Tensor], rows: int, length: int, *, ignore_index: int) -> dict[str, torch.Tensor]:
    """``input_ids`` / ``attention_mask`` / ``labels`` [B, L] right-padded to [rows, length]: padded positions get
    token 0, mask 0 and ``ignore_index`` labels, so a causal model's loss over the real tokens is unchanged. Packed
    rows' ``resets`` [B, L / 64] come along, padded with False (a padded row holds no sequence)."""
    ids = batch["input_ids"]
    b, n = ids.shape
    if b > rows or n > length:
        raise ValueError(f"batch of shape {(b, n)} does not fit the captured shape {(rows, length)}")
    mask = batch.get("attention_mask")
    fills = {"input_ids": (ids, 0), "labels": (batch["labels"], ignore_index),
             "attention_mask": (torch.ones_like(ids) if mask is None else mask, 0)}  # fmt: skip
    out = {}
    for key, (t, fill) in fills.items():
        full = t.new_full((rows, length), fill)
        full[:b, :n] = t
        out[key] = full
    if "resets" in batch:
        resets = batch["resets"]
        full = resets.new_zeros((rows, -(-length // RESET_ALIGN)))
        full[:b, : resets.shape[1]] = resets
        out["resets"] = full
    return out


class GraphedTrainStep:
    """``fit``'s optimizer step, captured on its first call: forward under autocast, token loss over ``n_targets``,
    backward, gradient clipping, optimizer step. Returns the loss and the gradient norm as device tensors.

    A non-finite loss or gradient norm makes the captured step zero the gradients before the optimizer step (the
    eager loop raises before stepping; a graph cannot branch), so the parameters stay finite and the caller raises.
    """

    def __init__(self, model, optimizer, trainable, *, rows: int, length: int, clip: float,
                 autocast_dtype: torch.dtype, loss_fn, ignore_index: int, warmup: int = 2) -> None:  # fmt: skip
        self.model, self.optimizer, self.trainable = model, optimizer, list(trainable)
        self.rows, self.length, self.clip = rows, length, clip
        self.autocast_dtype, self.loss_fn, self.ignore_index, self.warmup = (
            autocast_dtype,
            loss_fn,
            ignore_index,
            warmup,
        )
        self.graph: GraphedStep | None = None

    def _step(self, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        on = self.autocast_dtype != torch.float32
        with torch.autocast("cuda", dtype=self.autocast_dtype, enabled=on, cache_enabled=False):
            rows = {"resets": b["resets"]} if "resets" in b else {}  # packed rows: copied in like the other inputs
            out = self.model(b["input_ids"], attention_mask=b["attention_mask"], **rows)
        loss = self.loss_fn(out.logits, b["labels"]) / b["n_targets"]
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.clip)
        finite = torch.isfinite(loss) & torch.isfinite(norm)
        for p in self.trainable:
            if p.grad is not None:
                p.grad.masked_fill_(~finite, 0.0)
        self.optimizer.step()
        return loss.detach(), norm.detach()

    def __call__(self, batch: dict[str, torch.Tensor], n_targets: int) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.trainable[0].device
        b = {k: v.to(device, non_blocking=True) for k, v in
             pad_batch(batch, self.rows, self.length, ignore_index=self.ignore_index).items()}  # fmt: skip
        b["n_targets"] = torch.tensor(float(n_targets), device=device)
        if self.graph is None:
            self.graph = GraphedStep(self._step, b, optimizers=[self.optimizer], warmup=self.warmup, restore=True)
        return self.graph.run(b)

    def close(self) -> None:
        """Free the graph and the gradients its last replay left on the parameters; the next call captures again.

        The captured backward allocated those gradients in the graph's private memory pool. Left on the parameters
        they would keep part of that pool alive after the graph is gone, and a later eager backward on the model (a
        second ``fit``: the eager step zeroes gradients after its update, not before) would add to the last
        replay's gradients instead of starting from zero."""
        self.graph = None
        for p in self.trainable:
            p.grad = None
