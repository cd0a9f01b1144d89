"""Which part of a CUDA-graphed step makes ``del graph`` + ``torch.cuda.empty_cache()`` fault (experiment).

``bench_train_step.py --backends auto+graph`` died with "an illegal memory access" in ``empty_cache()`` right after a
graphed variant was freed (2026-12-02, H200, torch 2.11), although every replay before it had synchronised cleanly and
``tests/train/test_graphs.py`` (which never empties the cache) passed. Each case below runs in its own process (the
error is sticky): build a step, capture it with ``GraphedStep``, replay it 3 times, then tear down in the case's order
and empty the cache, then run one eager step. A line per case says where it faulted, if it did.

GPU:  PYTHONPATH=. python3 benchmarks/exp_graph_teardown.py --out $OUT/graph_teardown.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TORCH_CONV_NORM = {"SSMTUNE_EXP_TORCH_CONV_NORM": "1"}
CASES = {
    # name: (model, backend, extra env, teardown order)
    "mlp-linear-only": ("mlp", "auto", {}, "graph-first"),
    "mlp-with-triton-norm": ("mlp-norm", "auto", {}, "graph-first"),
    "mamba-auto": ("mamba", "auto", {}, "graph-first"),
    "mamba-torch-backend": ("mamba", "torch", {}, "graph-first"),
    "mamba-auto-model-first": ("mamba", "auto", {}, "model-first"),
    "mamba-auto-no-cublas-clear": ("mamba", "auto", {"SSMTUNE_EXP_NO_CUBLAS_CLEAR": "1"}, "graph-first"),
    "mamba-auto-launch-blocking": ("mamba", "auto", {"CUDA_LAUNCH_BLOCKING": "1"}, "graph-first"),
    "mamba2-auto": ("mamba2", "auto", {}, "graph-first"),
    # the benchmark's faulting variant: 130m shape, bf16 base, no adapter and no optimizer, grads into the embeddings
    "mamba130-none": ("mamba130-none", "auto", {}, "graph-first"),
    "mamba130-none-launch-blocking": ("mamba130-none", "auto", {"CUDA_LAUNCH_BLOCKING": "1"}, "graph-first"),
    # as bench_train_step.py did: the cache emptied while the graph is alive (after the capture), then replays
    "mamba130-none-empty-while-alive": ("mamba130-none", "auto", {}, "empty-while-alive"),
    "mamba-auto-empty-while-alive": ("mamba", "auto", {}, "empty-while-alive"),
    # the path that faulted on 2026-12-02: the Triton scan with torch's conv and norm (before the fused conv / norm
    # kernels existed); model.backend would move the scan too, so SSMTUNE_EXP_TORCH_CONV_NORM re-points the ops' Triton
    # entries at their torch implementations
    "mamba130-none-torch-conv-norm": ("mamba130-none", "auto", TORCH_CONV_NORM, "graph-first"),
    "mamba130-none-torch-conv-norm-empty-while-alive": ("mamba130-none", "auto", TORCH_CONV_NORM, "empty-while-alive"),
    "mamba-torch-conv-norm": ("mamba", "auto", TORCH_CONV_NORM, "graph-first"),
}


def child(model_kind: str, backend: str, order: str) -> None:
    import torch

    from ssmtune import StateOffsetConfig, get_peft_model, ops
    from ssmtune.models import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM
    from ssmtune.train import graphs

    if os.environ.get("SSMTUNE_EXP_NO_CUBLAS_CLEAR") == "1":
        graphs._clear_cublas_workspaces = torch.cuda.synchronize
    if os.environ.get("SSMTUNE_EXP_TORCH_CONV_NORM") == "1":
        for op in ("causal_conv1d", "rms_norm"):
            ops._IMPLS[op]["triton"] = ops._IMPLS[op]["torch"]
        ops._cache.clear()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    if model_kind.startswith("mlp"):
        norm_w = torch.ones(256, device=dev)

        class MLP(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b = torch.nn.Linear(256, 1024), torch.nn.Linear(1024, 256)

            def forward(self, x):
                h = self.a(x)
                h = self.b(torch.nn.functional.silu(h))
                if model_kind == "mlp-norm":
                    h = ops.rms_norm(h, norm_w, backend="triton")
                return h.float().pow(2).mean()

        model = MLP().to(dev)

        def loss_fn(b):
            return model(b["x"])

        batch = {"x": torch.randn(64, 256, device=dev)}
    elif model_kind == "mamba130-none":
        from ssmtune.train.loop import apply_precision

        with torch.device(dev):
            model = MambaForCausalLM(MambaConfig(d_model=768, n_layer=24, vocab_size=50280))
        model.requires_grad_(False)
        apply_precision(model, "bf16")

        def loss_fn(b):
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                embeds = model.backbone.embeddings(b["x"]).detach().requires_grad_()
                return model(inputs_embeds=embeds, labels=b["x"]).loss

        batch = {"x": torch.randint(0, 50280, (4, 512), device=dev)}
    else:
        klass, cfg = (
            (MambaForCausalLM, MambaConfig(d_model=256, n_layer=2, vocab_size=512))
            if model_kind == "mamba"
            else (Mamba2ForCausalLM, Mamba2Config(d_model=256, n_layer=2, vocab_size=512, headdim=64, d_state=64))
        )
        with torch.device(dev):
            model = get_peft_model(klass(cfg), StateOffsetConfig(variant="h"))
        model.backend = backend

        def loss_fn(b):
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                return model(b["x"], labels=b["x"]).loss

        batch = {"x": torch.randint(0, 512, (2, 128), device=dev)}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, capturable=True) if params else None

    def step(b):
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        loss = loss_fn(b)
        loss.backward()
        if opt is not None:
            opt.step()
        return loss

    where = "capture"
    g = graphs.GraphedStep(step, batch, optimizers=[opt] if opt is not None else [])
    if order == "empty-while-alive":
        where = "empty_cache with the graph alive"
        torch.cuda.empty_cache()
        order = "graph-first"
    where = "replay"
    for _ in range(3):
        g.run(batch)
    torch.cuda.synchronize()
    where = "teardown"
    if order == "graph-first":
        del g
        gc.collect()
        torch.cuda.synchronize()
        where = "empty_cache after del graph"
        torch.cuda.empty_cache()
        where = "eager step after"
        step(batch)
        torch.cuda.synchronize()
        where = "del model + empty_cache"
        del model, opt, params
        gc.collect()
        torch.cuda.empty_cache()
    else:
        del model, opt, params
        gc.collect()
        where = "empty_cache after del model"
        torch.cuda.empty_cache()
        where = "del graph + empty_cache"  # noqa: F841 - read from the frame by main() on a fault
        del g
        gc.collect()
        torch.cuda.empty_cache()
    torch.cuda.synchronize()
    print("RESULT ok", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", nargs=3, metavar=("MODEL", "BACKEND", "ORDER"))
    ap.add_argument("--cases", nargs="+", default=list(CASES))
    ap.add_argument("--out", type=Path, default=Path("graph_teardown.json"))
    args = ap.parse_args()
    if args.child:
        try:
            child(*args.child)
        except Exception as e:  # noqa: BLE001 - report where, then fail
            tb = e.__traceback__
            while tb.tb_next is not None and "exp_graph_teardown" in tb.tb_next.tb_frame.f_code.co_filename:
                tb = tb.tb_next
            where = tb.tb_frame.f_locals.get("where", "?")
            print(f"RESULT fault at '{where}': {type(e).__name__}: {str(e).splitlines()[0][:150]}", flush=True)
            sys.exit(1)
        return
    results = []
    for name in args.cases:
        model, backend, env, order = CASES[name]
        t0 = time.time()
        try:
            p = subprocess.run([sys.executable, __file__, "--child", model, backend, order], capture_output=True,
                               text=True, timeout=120, check=False, env={**os.environ, **env})  # fmt: skip
            lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT")]
            res = lines[-1][7:] if lines else f"no result (rc {p.returncode}): {p.stderr.strip().splitlines()[-1:]}"
        except subprocess.TimeoutExpired:
            res = "timed out"
        results.append({"case": name, "result": res, "seconds": round(time.time() - t0, 1)})
        print(f"{name:32s} {res}", flush=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
