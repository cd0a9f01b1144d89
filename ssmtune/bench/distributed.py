"""Data-parallel training throughput: tokens/s of ``ssmtune.train.fit`` on 1, 2, 4, ... GPUs (under torchrun).

Each process runs the real trainer (sharded global batches, DDP for PEFT / FSDP2 per block for full fine-tuning) on a
randomly initialised model of the chosen shape and synthetic token sequences (every position a target). Weak scaling:
the per-GPU batch is fixed, so the global batch grows with the world size; ``--global-batch`` gives strong scaling.
Times are taken at the end of each optimizer step (after a device synchronisation), the first ``--warmup`` steps
dropped; tokens/s = global tokens per step / median step time. Check: ``fit`` stops on a non-finite loss. Rank 0 writes
the report; ``--summarize a.json b.json ...`` prints the scaling table of several reports (one per world size).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ssmtune.bench.common import markdown
from ssmtune.bench.registry import Benchmark, register

# mamba-1.4b: d_model 2048, 48 layers, N 16, expand 2
SHAPES = {
    "1.4b": {"d_model": 2048, "n_layer": 48, "d_state": 16, "vocab_size": 50277},
    "130m": {"d_model": 768, "n_layer": 24, "d_state": 16, "vocab_size": 50277},
    "tiny": {"d_model": 64, "n_layer": 2, "d_state": 8, "vocab_size": 264},
}
METHODS = ("state_offset_h", "full")


def build_model(method: str, shape: str, backend: str, device: torch.device) -> torch.nn.Module:
    from ssmtune.core.peft_model import get_peft_model
    from ssmtune.methods import StateOffsetConfig
    from ssmtune.models import MambaConfig, causal_lm_for

    torch.manual_seed(0)
    with torch.device(device):  # initialise in place: a 1.4b model on the CPU first takes a minute
        model = causal_lm_for(MambaConfig(**SHAPES[shape]))
    if backend != "auto":
        model.backend = backend
    if method == "full":
        return model.requires_grad_(True)
    return get_peft_model(model, StateOffsetConfig(variant="h"))


def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    ids = torch.stack([e["input_ids"] for e in examples])  # [B, L]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def run_one(method: str, args: argparse.Namespace, ctx) -> dict:
    from ssmtune.train import TrainConfig, fit
    from ssmtune.train.distributed import resolve_strategy

    device = ctx.device
    model = build_model(method, args.shape, args.backend, device)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    strategy = resolve_strategy(args.strategy, model, ctx)
    batch = args.global_batch or args.batch_per_gpu * ctx.world_size
    steps = args.warmup + args.steps
    # eager on every world size: a single process would otherwise capture its step, and the scaling against 1 GPU
    # would compare a graphed step with DDP's eager ones
    cfg = TrainConfig(epochs=1, max_steps=steps, batch_size=batch, micro_batch_size=args.micro_batch, lr=args.lr,
                      precision=args.precision, save_steps=0, log_steps=0, eval_every_epoch=False, progress=False,
                      device=str(device), strategy=args.strategy, cuda_graph=False)  # fmt: skip
    g = torch.Generator().manual_seed(1)
    vocab = SHAPES[args.shape]["vocab_size"]
    data = [{"input_ids": torch.randint(1, vocab, (args.seq_len,), generator=g)} for _ in range(batch * steps)]
    stamps: list[float] = []

    def on_step(step: int) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # only rank 0 writes (metrics.jsonl); the other ranks just get its folder's name
    with tempfile.TemporaryDirectory(prefix="bench-dist-") if ctx.is_main else contextlib.nullcontext() as tmp:
        out = Path(ctx.broadcast(tmp))
        stamps.append(time.perf_counter())
        fit(model, data, collate, config=cfg, out_dir=out / method, save_fn=None, on_step=on_step, dist=ctx)
    times = [b - a for a, b in zip(stamps[args.warmup : -1], stamps[args.warmup + 1 :], strict=True)]
    step_s = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    if peak is not None and ctx.enabled:
        peak = ctx.all_reduce_sum([peak])[0] / ctx.world_size  # mean over GPUs
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"method": method, "world_size": ctx.world_size, "strategy": strategy, "global_batch": batch,
            "seq_len": args.seq_len, "trainable_params": n_trainable, "step_s_median": step_s, "step_s_all": times,
            "tokens_per_s": batch * args.seq_len / step_s, "peak_mem_gib_mean": peak}  # fmt: skip


def summarize(rows: list[dict]) -> str:
    """Tokens/s per method and world size, and the scaling efficiency against 1 GPU."""
    base = {r["method"]: r["tokens_per_s"] for r in rows if r["world_size"] == 1}
    out = []
    for r in sorted(rows, key=lambda r: (r["method"], r["world_size"])):
        b = base.get(r["method"])
        speed = r["tokens_per_s"] / b if b else None
        out.append([r["method"], r["strategy"], r["world_size"], r["global_batch"], f"{r['step_s_median']:.3f}",
                    f"{r['tokens_per_s']:,.0f}", f"{speed:.2f}x" if speed else "n/a",
                    f"{100 * speed / r['world_size']:.0f}%" if speed else "n/a",
                    f"{r['peak_mem_gib_mean']:.1f}" if r.get("peak_mem_gib_mean") else "n/a"])  # fmt: skip
    header = ["method", "strategy", "GPUs", "global batch", "step (s)", "tokens/s", "x 1 GPU", "efficiency", "GiB/GPU"]
    return markdown(header, out)


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1.4b")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-per-gpu", type=int, default=8, help="examples per GPU per step (weak scaling)")
    ap.add_argument("--global-batch", type=int, default=0, help="fixed global batch (strong scaling); 0: off")
    ap.add_argument("--micro-batch", type=int, default=None, help="examples per forward (gradient accumulation)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed first steps (Triton compilation, allocator)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--strategy", choices=["auto", "ddp", "fsdp"], default="auto")
    ap.add_argument("--backend", default="auto", help="scan backend: auto, triton, torch, ref")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--summarize", type=Path, nargs="+", default=None,
                    help="print the scaling table of these reports instead of running")  # fmt: skip


def run(args: argparse.Namespace) -> dict | None:
    from ssmtune.train.distributed import init_distributed, shutdown

    if args.summarize:
        rows = [r for p in args.summarize for r in json.loads(p.read_text())["results"]["rows"]]
        return {"rows": rows, "table": summarize(rows)}
    if args.steps < 2:
        raise ValueError(f"--steps must be >= 2, got {args.steps!r}")
    ctx = init_distributed(args.device)
    try:
        rows = []
        for method in args.methods:
            rows.append(run_one(method, args, ctx))
            if ctx.is_main:
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "step_s_all"}), flush=True)
    finally:
        shutdown(ctx)
    return {"shape": args.shape, "rows": rows, "table": summarize(rows)} if ctx.is_main else None


register(Benchmark("distributed", "data-parallel training throughput of fit() on 1, 2, 4, ... GPUs (torchrun)",
                   add_args, run))  # fmt: skip
