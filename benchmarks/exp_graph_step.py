"""Experiment (session 7): eager vs CUDA-graph training step of a 130m-shaped model, one case per process.

Each case runs in its own process: the eager step (``bench_train_step.make_step``, backend ``auto``), then the same
step replayed from a CUDA graph (``auto+graph``, ``ssmtune.train.graphs.GraphedStep``); median ms of 10 steps each
after 3 untimed ones. Extras: ``gc`` empties the allocator's cache before timing, ``twice`` builds a second graphed
model first (both faulted in the session-7 run, which predates GraphedStep clearing cuBLAS's workspaces around the
capture; not rerun since, docs/training.md).
Raw results of the session-7 run: docs/img/graph_step_s7.json. ``bench_train_step.py --backends auto auto+graph`` is
the benchmark proper; this script is the record of how the first figures were taken.

GPU:  BUDGET=200 OUT=. python3 benchmarks/exp_graph_step.py
"""

import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

CASES = [("mamba", "state_offset_h", 4, 512, "-"), ("mamba", "none", 4, 512, "-"),
         ("mamba", "initial_state", 4, 512, "-"), ("mamba", "state_offset_h", 4, 512, "gc"),
         ("mamba", "state_offset_h", 4, 512, "twice"), ("mamba2", "state_offset_h", 4, 512, "-"),
         ("mamba2", "none", 4, 512, "-"), ("mamba", "lora", 4, 512, "-"), ("mamba2", "initial_state", 4, 512, "-"),
         ("mamba", "state_offset_h", 8, 2048, "-"), ("mamba2", "state_offset_h", 8, 2048, "-")]  # fmt: skip


def one(model: str, method: str, b: int, seqlen: int, extra: str) -> dict:
    import bench_train_step as bt

    dev = torch.device("cuda")
    out = {"model": model, "method": method, "B": b, "L": seqlen, "extra": extra}
    for backend in ("auto", "auto+graph"):
        v = bt.Variant("ssmtune", model, method, backend, b, seqlen)
        m, _ = bt.build_ssmtune(v, "130m", dev)
        ids = bt.make_batch(b, seqlen, bt.SHAPES["130m"]["vocab_size"], dev)
        step, _ = bt.make_step(v, m, ids)
        for _ in range(3):
            step()
            torch.cuda.synchronize()
        if "twice" in extra and backend == "auto+graph":
            step2, _ = bt.make_step(v, bt.build_ssmtune(v, "130m", dev)[0], ids)
            step2()
            step()
            torch.cuda.synchronize()
        if "gc" in extra:
            gc.collect()
            torch.cuda.empty_cache()
            step()
            torch.cuda.synchronize()
        ts = []
        for _ in range(10):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            ts.append(1e3 * (time.perf_counter() - t0))
        out[backend] = sorted(ts)[len(ts) // 2]
        del step, m
    return out


def main() -> None:
    if len(sys.argv) > 1:
        a = sys.argv[1:]
        print("RESULT " + json.dumps(one(a[0], a[1], int(a[2]), int(a[3]), a[4])))
        return
    res, t0 = [], time.time()
    for c in CASES:
        if time.time() - t0 > float(os.environ.get("BUDGET", "200")):
            break
        p = subprocess.run([sys.executable, __file__, *map(str, c)], capture_output=True, text=True, timeout=120,
                           check=False)  # fmt: skip
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        r = json.loads(line[0][7:]) if line else {"case": c, "rc": p.returncode, "err": p.stderr[-1500:]}
        res.append(r)
        print(json.dumps(r)[:2000], flush=True)
    Path(os.environ.get("OUT", "."), "graph_check.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
