"""Token cross-entropy of a language-model head: ssmtune's Triton kernels against torch, forward and forward+backward.

Rows = batch × seqlen of the training-step benchmark (4 × 512 and 8 × 2048), vocabulary 50280 (mamba-130m's padded
head), bf16 logits. Peers in the same run: ``F.cross_entropy(logits.float())`` (what transformers' Mamba and the
authors' stack compute) and ``F.cross_entropy`` on the bf16 logits directly (no fp32 copy; its log-softmax is rounded
to bf16). Reported: median ms, the fraction of the copy bandwidth measured in the same run for the minimum bytes
(forward: the logits read once; forward+backward: read twice and the gradient written once), the peak memory above the
logits, and the loss's relative difference to the fp32 path.

    python3 benchmarks/bench_cross_entropy.py --out $OUT/bench_cross_entropy.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from ssmtune import ops

PEERS = {
    "ssmtune": lambda x, y: ops.cross_entropy(x, y, backend="triton"),
    "torch fp32": lambda x, y: F.cross_entropy(x.float(), y),
    "torch bf16": lambda x, y: F.cross_entropy(x, y).float(),
}


def copy_bandwidth() -> float:
    x = torch.empty(2**28, device="cuda", dtype=torch.float32)
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / (do_bench(lambda: y.copy_(x), return_mode="median") * 1e-3)


def measure(fn, logits, labels) -> dict:
    with torch.no_grad():
        fwd = do_bench(lambda: fn(logits, labels), return_mode="median")

    def step():
        fn(logits, labels).backward()

    fb = do_bench(step, grad_to_none=[logits], return_mode="median")
    torch.cuda.synchronize()
    logits.grad = None
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    logits.grad = None
    return {"fwd_ms": fwd, "fwd_bwd_ms": fb, "peak_gib": peak, "loss": fn(logits, labels).item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["4x512", "8x2048"])
    ap.add_argument("--vocab", type=int, default=50280)
    ap.add_argument("--out", default="bench_cross_entropy.json")
    args = ap.parse_args()
    bw = copy_bandwidth()
    rows = []
    for size in args.sizes:
        b, seqlen = (int(v) for v in size.split("x"))
        r = b * seqlen
        torch.manual_seed(0)
        logits = (2 * torch.randn(r, args.vocab, device="cuda")).to(torch.bfloat16).requires_grad_()
        labels = torch.randint(0, args.vocab, (r,), device="cuda")
        labels[::17] = -100
        nbytes = r * args.vocab * logits.element_size()
        for name, fn in PEERS.items():
            m = measure(fn, logits, labels)
            m.update(size=size, rows=r, vocab=args.vocab, impl=name,
                     fwd_bw_frac=nbytes / (m["fwd_ms"] * 1e-3) / bw,
                     fwd_bwd_bw_frac=3 * nbytes / (m["fwd_bwd_ms"] * 1e-3) / bw)  # fmt: skip
            rows.append(m)
            print(f"{size} {name:10s} fwd {m['fwd_ms']:.3f} ms fwd+bwd {m['fwd_bwd_ms']:.3f} ms peak {m['peak_gib']:.2f} "
                  f"GiB loss {m['loss']:.6f}", flush=True)  # fmt: skip
        fp32 = next(x["loss"] for x in rows if x["size"] == size and x["impl"] == "torch fp32")
        for x in rows:
            if x["size"] == size:
                x["loss_rel_diff_vs_fp32"] = abs(x["loss"] - fp32) / abs(fp32)
        del logits
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_bw_gbs": bw / 1e9}
    Path(args.out).write_text(json.dumps({**meta, "rows": rows}, indent=1))
    print(f"\ncopy bandwidth {bw / 1e9:.0f} GB/s; {meta['device']}, torch {meta['torch']}")
    print("| size | impl | fwd ms | fwd+bwd ms | fwd % BW | f+b % BW | peak GiB | vs ssmtune f+b | loss rel diff |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for x in rows:
        ours = next(o for o in rows if o["size"] == x["size"] and o["impl"] == "ssmtune")
        print(f"| {x['size']} | {x['impl']} | {x['fwd_ms']:.3f} | {x['fwd_bwd_ms']:.3f} | {100 * x['fwd_bw_frac']:.0f} | "
              f"{100 * x['fwd_bwd_bw_frac']:.0f} | {x['peak_gib']:.2f} | {x['fwd_bwd_ms'] / ours['fwd_bwd_ms']:.2f}x | "
              f"{x['loss_rel_diff_vs_fp32']:.1e} |")  # fmt: skip


if __name__ == "__main__":
    main()
