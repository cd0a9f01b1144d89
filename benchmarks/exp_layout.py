"""Experiment: the Mamba-1 mixer's layout copies, torch's strided ``contiguous()`` against ``ssmtune.ops.layout``.

The scan reads [B, D, L] rows; Δ (dt_proj's output) and z (half of in_proj's) are [B, L, D] and the output gradient
comes back from out_proj as [B, L, D], so each is transposed once per layer and direction. Times (median of
triton.testing.do_bench) at a 130m-shaped layer, bf16, with a plain copy of the same bytes as the bandwidth bar.

    PYTHONPATH=. python3 benchmarks/exp_layout.py --out /tmp/layout.json
"""

from __future__ import annotations

import argparse
import json

import torch
import triton

from ssmtune.ops import layout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["8x2048x1536", "4x512x1536", "8x2048x5120"], help="BxLxD")
    ap.add_argument("--out", default="layout.json")
    args = ap.parse_args()
    rows = []
    for shape in args.shapes:
        b, seqlen, d = map(int, shape.split("x"))
        x = torch.randn(b, seqlen, d, device="cuda", dtype=torch.bfloat16)
        xz = torch.randn(b, seqlen, 2 * d, device="cuda", dtype=torch.bfloat16)
        cases = {
            "copy (bandwidth bar)": lambda x=x: x.clone(),
            "torch: delta.transpose(1, 2).contiguous()": lambda x=x: x.transpose(1, 2).contiguous(),
            "ours: delta -> [B, D, L]": lambda x=x: layout.transpose_last2(x),
            "torch: z (slice of xz) -> [B, D, L]": lambda xz=xz, d=d: xz[..., d:].transpose(1, 2).contiguous(),
            "ours: z (slice of xz) -> [B, D, L]": lambda xz=xz, d=d: layout.transpose_last2(xz[..., d:]),
        }
        du = torch.randn(b, d, seqlen, device="cuda", dtype=torch.bfloat16)  # the scan's du, [B, D, L]
        # the conv output's two gradients (x_proj's [B, L, D] and the scan's [B, D, L]) summed by autograd
        cases["torch: du (channel-major) + dx (time-major)"] = lambda du=du, x=x: du + x.transpose(1, 2)
        cases["ours: du -> time-major, then + dx"] = lambda du=du, x=x: (
            layout.transpose_last2(du).transpose(1, 2) + x.transpose(1, 2)
        )
        names = list(cases)
        assert torch.equal(cases[names[1]](), cases[names[2]]()) and torch.equal(cases[names[3]](), cases[names[4]]())
        assert torch.equal(cases[names[5]](), cases[names[6]]())
        for name, fn in cases.items():
            ms = triton.testing.do_bench(fn, warmup=25, rep=200)
            gbs = 2 * x.numel() * x.element_size() / ms / 1e6
            rows.append({"shape": shape, "case": name, "ms": ms, "GB/s": gbs})
    bar = {r["shape"]: r["GB/s"] for r in rows if r["case"].startswith("copy")}
    for r in rows:
        r["of copy bw"] = r["GB/s"] / bar[r["shape"]]
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(meta)
    print(f"{'shape':<13} {'case':<45} {'ms':>7} {'GB/s':>7} {'x copy':>6}")
    for r in rows:
        print(f"{r['shape']:<13} {r['case']:<45} {r['ms']:7.3f} {r['GB/s']:7.0f} {r['of copy bw']:6.2f}")


if __name__ == "__main__":
    main()
