"""Data-parallel training throughput: tokens/s of ``ssmtune.train.fit`` with 1, 2, 4, ... GPUs (torchrun).

Each process runs the real trainer (sharded global batches, DDP for PEFT / FSDP2 per Block for full fine-tuning) on a
randomly initialised model of the chosen shape and synthetic token sequences (every position a target). Weak scaling:
the per-GPU batch is fixed, so the global batch grows with the world size; ``--global-batch`` gives strong scaling.
Times are taken at the end of each optimizer step (after a device synchronise) and the first ``--warmup`` steps are
dropped; tokens/s = global tokens per step / median step time.

On a multi-GPU host (one JSON per world size, then the table for docs/benchmarks.md):

    for n in 1 2 4; do
        torchrun --standalone --nproc_per_node $n benchmarks/bench_distributed.py --out bench_dist_$n.json
    done
    python benchmarks/bench_distributed.py --summarize bench_dist_*.json

One process without torchrun is the 1-GPU baseline (``python benchmarks/bench_distributed.py --out bench_dist_1.json``);
``--shape tiny --device cpu --steps 4`` is a CPU smoke test (add ``--strategy ddp`` with torchrun to test gloo).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ssmtune.models import MambaConfig, causal_lm_for
from ssmtune.train import TrainConfig, fit
from ssmtune.train.distributed import init_distributed, resolve_strategy, shutdown

# mamba-1.4b (state-spaces/mamba-1.4b-hf): d_model 2048, 48 layers, N = 16, expand 2, vocab 50280 (padded).
SHAPES = {
    "1.4b": {"d_model": 2048, "n_layer": 48, "d_state": 16, "vocab_size": 50277},
    "130m": {"d_model": 768, "n_layer": 24, "d_state": 16, "vocab_size": 50277},
    "tiny": {"d_model": 64, "n_layer": 2, "d_state": 8, "vocab_size": 264},
}
METHODS = ("state_offset_h", "full")


def build_model(method: str, shape: str, backend: str, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.device(device):  # initialise in place: a 1.4b model on the CPU first takes a minute
        model = causal_lm_for(MambaConfig(**SHAPES[shape]))
    if backend != "auto":
        model.backend = backend
    if method == "full":
        return model.requires_grad_(True)
    from ssmtune.core.peft_model import get_peft_model
    from ssmtune.methods.state_offset import StateOffsetConfig

    return get_peft_model(model, StateOffsetConfig(variant="h"))


def synthetic(n: int, seq_len: int, vocab: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(1, vocab, (seq_len,), generator=g)} for _ in range(n)]


def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    ids = torch.stack([e["input_ids"] for e in examples])  # [B, L]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def run_one(method: str, args: argparse.Namespace, ctx) -> dict:
    device = ctx.device
    model = build_model(method, args.shape, args.backend, device)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    strategy = resolve_strategy(args.strategy, model, ctx)
    batch = args.global_batch or args.batch_per_gpu * ctx.world_size
    steps = args.warmup + args.steps
    cfg = TrainConfig(epochs=1, max_steps=steps, batch_size=batch, micro_batch_size=args.micro_batch,
                      lr=args.lr, precision=args.precision, save_steps=0, log_steps=0, eval_every_epoch=False,
                      progress=False, device=str(device), strategy=args.strategy)  # fmt: skip
    data = synthetic(batch * steps, args.seq_len, SHAPES[args.shape]["vocab_size"])
    stamps: list[float] = []

    def on_step(step: int) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # Only rank 0 writes (metrics.jsonl); the other ranks just get its folder's name.
    with tempfile.TemporaryDirectory(prefix="bench-dist-") if ctx.is_main else contextlib.nullcontext() as tmp:
        out = Path(ctx.broadcast(tmp))
        stamps.append(time.perf_counter())
        fit(model, data, collate, config=cfg, out_dir=out / method, save_fn=None, on_step=on_step, dist=ctx)
    times = [b - a for a, b in zip(stamps[args.warmup : -1], stamps[args.warmup + 1 :], strict=True)]
    step_s = statistics.median(times)
    tokens = batch * args.seq_len
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    if peak is not None and ctx.enabled:
        peak = ctx.all_reduce_sum([peak])[0] / ctx.world_size  # mean over GPUs
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "method": method,
        "world_size": ctx.world_size,
        "strategy": strategy,
        "global_batch": batch,
        "seq_len": args.seq_len,
        "trainable_params": n_trainable,
        "total_params": n_total,
        "step_s_median": step_s,
        "step_s_all": times,
        "tokens_per_s": tokens / step_s,
        "peak_mem_gib_mean": peak,
    }


def summarize(paths: list[Path]) -> str:
    """Markdown table: tokens/s per method and world size, and scaling efficiency against 1 GPU."""
    rows = [r for p in paths for r in json.loads(p.read_text())["rows"]]
    base = {r["method"]: r["tokens_per_s"] for r in rows if r["world_size"] == 1}
    lines = ["| method | strategy | GPUs | global batch | step (s) | tokens/s | speed-up | efficiency | peak GiB/GPU |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in sorted(rows, key=lambda r: (r["method"], r["world_size"])):
        b = base.get(r["method"])
        speed = r["tokens_per_s"] / b if b else None
        eff = f"{100 * speed / r['world_size']:.0f}%" if speed else "n/a"
        mem = f"{r['peak_mem_gib_mean']:.1f}" if r.get("peak_mem_gib_mean") else "n/a"
        lines.append(f"| {r['method']} | {r['strategy']} | {r['world_size']} | {r['global_batch']} | "
                     f"{r['step_s_median']:.3f} | {r['tokens_per_s']:,.0f} | {f'{speed:.2f}x' if speed else 'n/a'} | "
                     f"{eff} | {mem} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=None, help="JSON file written by rank 0")
    ap.add_argument("--summarize", type=Path, nargs="+", default=None, help="print the table of these JSON files")
    args = ap.parse_args()
    if args.summarize:
        print(summarize(args.summarize))
        return
    if args.steps < 2:
        raise ValueError(f"--steps must be >= 2, got {args.steps!r}")
    ctx = init_distributed(args.device)
    try:
        rows = []
        for method in args.methods:
            row = run_one(method, args, ctx)
            rows.append(row)
            if ctx.is_main:
                print(json.dumps({k: v for k, v in row.items() if k != "step_s_all"}), flush=True)
        if ctx.is_main and args.out:
            meta = {"torch": torch.__version__, "python": platform.python_version(), "shape": args.shape,
                    "device": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu",
                    "args": {k: str(v) for k, v in vars(args).items()}}  # fmt: skip
            args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    finally:
        shutdown(ctx)


if __name__ == "__main__":
    main()
