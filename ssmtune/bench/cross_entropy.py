"""Token cross-entropy of a language-model head: ssmtune's Triton kernels against torch, forward and forward+backward.

Rows = batch x seqlen of the training-step benchmark (4 x 512 and 8 x 2048), vocabulary 50280 (mamba-130m's padded
head), bf16 logits, every 17th label ignored (-100). Peers in the same run: ``F.cross_entropy(logits.float())`` (what
transformers' Mamba and mamba_ssm compute; also the reference of the check) and ``F.cross_entropy`` on the bf16 logits
directly (no fp32 copy; its log-softmax is rounded to bf16). Before any timing ours is checked against the fp32 path
(loss and gradient). Reported: median ms, peak memory above the logits, the loss's relative difference to fp32.
"""

from __future__ import annotations

import argparse
import functools

import torch
import torch.nn.functional as F

from ssmtune.bench.common import check_op, free_memory, measure_op, op_table, parse_sizes
from ssmtune.bench.registry import Benchmark, register


def impls() -> dict:
    from ssmtune import ops

    return {
        "ssmtune": lambda logits, labels: ops.cross_entropy(logits, labels, backend="triton"),
        "torch fp32": lambda logits, labels: F.cross_entropy(logits.float(), labels),
        "torch bf16": lambda logits, labels: F.cross_entropy(logits, labels).float(),
    }


def make(rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[::17] = -100
    return {"logits": (2 * torch.randn(rows, vocab, generator=g)).to(device, dtype), "labels": labels.to(device)}


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--sizes", nargs="+", default=["4x512", "8x2048"], help="batch x seqlen, e.g. 4x512")
    ap.add_argument("--vocab", type=int, default=50280)
    ap.add_argument("--rep-ms", type=int, default=100, help="do_bench time per measurement")


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    fns = impls()
    err = check_op(
        "ssmtune cross_entropy", fns["torch fp32"], fns["ssmtune"], make(300, 1000, torch.float32, device), 1e-4
    )
    rows = []
    for b, seqlen in parse_sizes(args.sizes):
        t = make(b * seqlen, args.vocab, torch.bfloat16, device)
        logits = t["logits"].requires_grad_()
        losses = {}
        for impl, fn in fns.items():
            row = {"size": f"{b}x{seqlen}", "impl": impl}
            row |= measure_op(functools.partial(fn, logits, t["labels"]), [logits], device, args.rep_ms)
            with torch.no_grad():
                losses[impl] = row["loss"] = fn(logits, t["labels"]).item()
            rows.append(row)
        for row in rows[-len(fns) :]:
            row["loss_rel_diff_vs_fp32"] = abs(row["loss"] - losses["torch fp32"]) / abs(losses["torch fp32"])
        del t, logits
        free_memory(device)
    return {"vocab": args.vocab, "check_rel_err": err, "rows": rows, "table": op_table(rows, ("size",))}


register(Benchmark("cross_entropy", "LM-head cross-entropy kernels (fwd, fwd+bwd) against torch fp32 / bf16",
                   add_args, run, needs_cuda=True))  # fmt: skip
