"""The method study on the built-in base models and tasks: every method, model and task, an LR sweep, seeds.

    PYTHONPATH=. python3 scripts/study.py --out runs/study --workers 12 --max-seconds 480 --hard-seconds 540

Two phases per cell (model, task, method): phase 1 trains the first seed at each LR of the sweep (the method's
default LR times --lr-scales); as soon as a cell's phase-1 runs are done, phase 2 trains the other seeds at the LR
with the best validation score. Runs are handed out by priority: tasks in --tasks order (wn-pos, wn-pos-long,
wn-category, wn-define), within a task the models in --models order, then phase, then method, so a truncated study
still has whole, seeded cells for the first tasks. --workers processes share the one GPU (the tiny models leave it
mostly idle: a single process is bound by Python overhead). --extend-edges K: a cell whose best phase-1 LR is the
largest (smallest) tried gets one more phase-1 run a grid step further (0.3, 1, 3 -> 9; -> 0.09), up to K times, and
its seeds run at the final best LR (a best LR at the sweep's edge means the method is likely under-tuned).

Each run goes through `ssmtune train` (validation score every epoch, best epoch kept), then the kept adapter is scored
on the test split. Run folders live in a temporary folder and are deleted after each run. Results: one JSON line per
finished run appended to <out>/study.jsonl (flushed at once, so a killed study keeps what finished; its first line is
the plan; an existing file is continued only through --resume), then the summary of scripts/summarize_study.py.
--max-seconds: no run starts later (nor one that the (model, task)'s slowest run so far says would end after
--hard-seconds); --hard-seconds: runs still going are abandoned, the summary is printed and the script exits.

GPU memory: the workers share one GPU, and 12 long-sequence runs at ~6 GiB each overrun an 80 GiB H100. So each worker
reports its run's peak (reserved) memory and returns
its cache after every run; a run starts only if the peaks of the running runs plus its own (the largest seen for its
(model, task), or --probe-gib until one of its runs has ended) fit in --gpu-mem-gib (default: the GPU's memory less
1 GiB per worker for the CUDA contexts). Until a (model, task) has a measured peak, one of its runs at a time is in
flight (its probe): Mamba-1 wn-pos-long runs need 10-14 GiB each, more than the 8-GiB default guess.
A run that still fails with an out-of-memory error is queued again (twice at most) instead of being recorded as a
failure; its kind's estimate grows by a quarter and the retry waits until another run has ended.
Tasks scored with a metric whose package is missing (wn-define: rouge-score) are refused before anything runs.

Continuing a study (e.g. after a time limit): --resume reads earlier study.jsonl files and does not repeat their
successful runs (same model, task, method, LR and seed; error rows are run again). Their rows are copied to the new
<out>/study.jsonl, whose plan covers their cells too, so that file alone is the whole study so far. Phase 1 runs only
the missing LRs; phase 2 uses the best LR over the earlier and new phase-1 results, and starts at once for a cell
whose phase 1 an earlier file completed. The settings that change results (--epochs, --batch-size, --max-examples,
--eval-examples, --fake, the TASKS entries) must match the earlier plan's, else the script refuses. --tasks /
--models / --methods select what runs now (the copied rows stay). Continuing the published study:

    PYTHONPATH=. python3 scripts/study.py --resume docs/results/study-gpu.jsonl --out runs/study --workers 12 \
        --threads 1 --max-seconds 440 --hard-seconds 490 > runs/study.log 2>&1
    python3 scripts/summarize_study.py runs/study/study.jsonl --plot runs/study.png --claims > runs/summary.md

(add e.g. --tasks wn-pos-long,wn-category to run those first; a further run resumes from its study.jsonl.)
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import multiprocessing as mp
import os
import queue
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import summarize_study  # (the summary table and the best-LR rule are shared with the summary script)

# method label -> (registered method, options, default learning rate). The pilot's LRs (docs/results.md): the papers'
# values scaled for a few-epoch run; the sweep multiplies them by --lr-scales.
METHODS: dict[str, tuple[str, dict, float]] = {
    "state_offset_h": ("state_offset_h", {}, 2e-3),
    "state_offset_y": ("state_offset_y", {}, 4e-3),
    "initial_state": ("initial_state", {}, 4e-3),
    "prefix": ("prefix", {"num_virtual_tokens": 16}, 1e-2),
    "prompt": ("prompt", {"num_virtual_tokens": 16}, 1e-2),
    "lora_s6": ("lora", {"r": 8, "target_modules": ["x_proj", "dt_proj"]}, 4e-3),
    "lora_in_out": ("lora", {"r": 8, "target_modules": ["in_proj", "out_proj"]}, 4e-3),
    "bitfit": ("bitfit", {}, 4e-3),
    "additional_scan": ("additional_scan", {"n_states": 8}, 4e-3),
    "sdlora": ("sdlora", {"warmup_steps": 40}, 2e-3),
    "full": ("full", {}, 5e-4),
}
# Mamba-2 has no x_proj / dt_proj, and its A is one scalar per head: these two methods do not exist there.
MAMBA1_ONLY = {"lora_s6", "additional_scan"}

# task -> epochs, evaluation examples (validation and test; None: all) and decoding options. Classification evaluation
# is one teacher-forced pass (cheap); wn-define decodes one prompt at a time, so it gets one epoch, 50 examples and
# greedy decoding (96 new bytes cover ~90% of its glosses, mean 54).
TASKS: dict[str, dict] = {
    "wn-pos": {"epochs": 3, "eval_examples": None},
    "wn-pos-long": {"epochs": 3, "eval_examples": None},
    "wn-category": {"epochs": 3, "eval_examples": None},
    "wn-define": {"epochs": 1, "eval_examples": 50, "num_beams": 1, "max_new_tokens": 96},
}


def is_mamba2(model: str) -> bool:
    from ssmtune.cli.commands import resolve_model_path

    config = Path(resolve_model_path(model)) / "config.json"
    if config.exists():
        return json.loads(config.read_text()).get("model_type") == "mamba2"
    return "mamba2" in model


def make_plan(models: list[str], tasks: list[str], methods: list[str], mamba2: dict[str, bool]) -> list[tuple]:
    """The cells (model, task, method) in priority order: task first, then model, then method."""
    return [(m, t, k) for t in tasks for m in models for k in methods if not (mamba2[m] and k in MAMBA1_ONLY)]


# The options that change what a run computes (with each task's TASKS entry): a resumed study must match them.
# Plans written before they were recorded (docs/results/study-gpu.jsonl) ran with these, the defaults of then.
SETTINGS = ("epochs", "batch_size", "max_examples", "eval_examples", "fake")
OLD_DEFAULTS = {"epochs": None, "batch_size": 16, "max_examples": None, "eval_examples": None, "fake": False}


def run_key(model: str, task: str, method: str, lr: float, seed: int) -> tuple:
    """A run's identity across files (the LR rounded: it is recomputed as default x scale)."""
    return (model, task, method, float(f"{lr:.9g}"), int(seed))


def read_resume(paths: list[str], settings: dict, task_specs: dict) -> tuple[list[dict], list[dict]]:
    """(the plan lines, the successful run rows, first of each identity) of earlier study.jsonl files; SystemExit
    when a file has no plan or was run with other settings (its results would not be comparable)."""
    plans, done = [], {}
    for path in paths:
        lines = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
        if not lines or lines[0].get("type") != "plan":
            raise SystemExit(f"--resume {path}: the first line is not a study plan")
        plan = lines[0]
        theirs = plan.get("settings", OLD_DEFAULTS)
        for k in SETTINGS:
            if theirs.get(k, OLD_DEFAULTS[k]) != settings[k]:
                raise SystemExit(f"--resume {path}: its runs used {k}={theirs.get(k, OLD_DEFAULTS[k])!r}, this study "
                                 f"{k}={settings[k]!r}; pass the same value or start a new study")  # fmt: skip
        for task, spec in plan.get("task_specs", {}).items():
            if task in task_specs and spec != task_specs[task]:
                raise SystemExit(f"--resume {path}: task {task} was run with {spec}, TASKS now says "
                                 f"{task_specs[task]}; start a new study")  # fmt: skip
        plans.append(plan)
        for r in lines[1:]:
            if r.get("type") != "run" or not summarize_study._ok(r):
                continue  # error rows: run again
            epochs = settings["epochs"] or TASKS.get(r["task"], {}).get("epochs", 3)
            if r.get("epochs", epochs) != epochs:  # catches a changed epoch count even in plans without settings
                raise SystemExit(f"--resume {path}: a {r['task']} run has epochs={r['epochs']}, this study {epochs}")
            done.setdefault(run_key(r["model"], r["task"], r["method"], r["lr"], r["seed"]), r)
    return plans, list(done.values())


def priority(cell_rank: dict, cell: tuple, phase: int, index: int) -> tuple:
    """Lower runs first: phase 2 of a cell goes before phase 1 of the next (model, task), so truncation keeps seeds."""
    task_rank, model_rank, method_rank = cell_rank[cell]
    return (task_rank, model_rank, phase, method_rank, index)


# ---------------------------------------------------------------------------------------------------------------- worker


def run_one(job: dict, opts: dict, tokenizers: dict) -> dict:
    """Train one run and score its kept adapter on the test split; returns the result row."""
    import torch

    from ssmtune.cli.args import TrainArgs, build
    from ssmtune.cli.commands import load_base_model, load_tokenizer_for, train
    from ssmtune.core.io import load_adapter
    from ssmtune.data import TaskConfig
    from ssmtune.eval.evaluate import EvalConfig, evaluate

    model, task, label = job["model"], job["task"], job["method"]
    method, margs, _ = METHODS[label]
    spec = TASKS.get(task, {})
    epochs = opts["epochs"] or spec.get("epochs", 3)
    if method == "sdlora" and opts["max_examples"]:  # smoke runs are shorter than SDLoRA's 40 warm-up steps
        steps = math.ceil(opts["max_examples"] / opts["batch_size"]) * epochs
        margs = {**margs, "warmup_steps": min(margs["warmup_steps"], max(1, steps // 2))}
    n_eval = opts["eval_examples"] or spec.get("eval_examples")
    decode = {f"eval.{k}": spec[k] for k in ("num_beams", "max_new_tokens") if k in spec}
    name = f"{model.split(':')[-1]}-{task}-{label}-x{job['scale']:g}-s{job['seed']}"
    run_dir = Path(opts["run_dir"]) / name
    values = {
        "model": model, "method": method, "method_args": margs, "data.task": task,
        "data.max_examples": opts["max_examples"], "eval.max_examples": n_eval, **decode,
        "train.lr": job["lr"], "train.epochs": epochs, "train.batch_size": opts["batch_size"],
        "train.seed": job["seed"], "train.save_steps": 0, "train.progress": False, "train.resume": False,
        "train.best_metric": "score", "eval.split": "validation", "eval.batch_size": 32,
        "out_dir": opts["run_dir"], "name": name,
    }  # fmt: skip
    try:
        summary = train(build(TrainArgs, values))
        kept = run_dir / "best" if (run_dir / "best").exists() else run_dir / "final"
        if method == "full":
            from ssmtune.models import load_model

            tuned = load_model(kept)
        else:
            tuned = load_adapter(load_base_model(model), kept)
        if model not in tokenizers:
            tokenizers[model] = load_tokenizer_for(None, model)
        config = EvalConfig(split="test", batch_size=32, max_examples=n_eval, **{k[5:]: v for k, v in decode.items()})
        device = "cuda" if torch.cuda.is_available() else "cpu"
        test = evaluate(tuned.to(device), tokenizers[model], TaskConfig(task=task), config)
        return {"trainable": summary["trainable_params"], "total": summary["total_params"], "epochs": epochs,
                "steps": summary["steps"], "val": summary["best_value"], "test": test["score"]}  # fmt: skip
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)  # only the JSON line is kept


def fake_one(job: dict, opts: dict) -> dict:
    """--fake: a deterministic made-up result after a short sleep (tests the scheduler without torch)."""
    import zlib

    time.sleep(opts["fake_seconds"])
    h = zlib.crc32(f"{job['model']}{job['task']}{job['method']}".encode()) % 1000 / 1000
    noise = zlib.crc32(f"{job['seed']}{job['scale']}".encode()) % 100 / 2000
    val = 0.3 + 0.4 * h - 0.05 * abs(math.log(job["scale"] / opts["fake_best_scale"])) + noise
    if job["method"] == "bitfit" and job["scale"] > 1:
        raise FloatingPointError("made-up divergence")  # exercises error rows
    if job["method"] == opts["fake_oom"] and job["scale"] < 1 and not job.get("tries"):
        raise RuntimeError("CUDA out of memory (made up)")  # exercises the retry of out-of-memory runs
    epochs = opts["epochs"] or TASKS.get(job["task"], {}).get("epochs", 3)
    return {"trainable": 1000 + int(h * 1e5), "total": 10**6, "epochs": epochs, "steps": 1, "val": val,
            "test": val - 0.01}  # fmt: skip


def _die_with_parent(parent: int) -> None:
    """A worker must not outlive the study (a killed study would leave workers training and loading the machine):
    SIGKILL on the parent's death, however it dies (Linux prctl PR_SET_PDEATHSIG; elsewhere daemon=True only)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL) != 0:  # PR_SET_PDEATHSIG
            print(f"study worker: prctl(PR_SET_PDEATHSIG) failed (errno {ctypes.get_errno()}); it may outlive the "
                  "study if that is killed", file=sys.stderr, flush=True)  # fmt: skip
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def worker(wid: int, jobs: mp.Queue, results: mp.Queue, opts: dict) -> None:
    _die_with_parent(opts["parent"])
    # 1-2 threads each: N workers must not oversubscribe the cores (the GPU work is tiny; Python is the bottleneck).
    os.environ["OMP_NUM_THREADS"] = str(opts["threads"])
    tokenizers: dict = {}
    if not opts["fake"]:
        import torch

        torch.set_num_threads(opts["threads"])
        cuda = torch.cuda.is_available()
        import ssmtune.train.plots

        # train() draws two PNGs per run with matplotlib; the study never looks at them, and they cost ~1 s a run.
        ssmtune.train.plots.plot_run = lambda run_dir: []
    while (job := jobs.get()) is not None:
        t0 = time.perf_counter()
        if not opts["fake"] and cuda:
            torch.cuda.reset_peak_memory_stats()
        try:
            row = fake_one(job, opts) if opts["fake"] else run_one(job, opts, tokenizers)
        except Exception as e:  # noqa: BLE001 - one failed run must not lose the others
            row = {"error": repr(e)[:300]}
        row["seconds"] = round(time.perf_counter() - t0, 2)
        if opts["fake"]:
            row["peak_gib"] = opts["fake_peak_gib"]
        else:  # which machine ran it: a study may be continued on another GPU, or on the CPU
            row["device"] = _device_name(fake=False)
            if cuda:
                row["peak_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
                gc.collect()
                torch.cuda.empty_cache()  # the next run may be smaller: give the cache back to the other workers
        results.put((wid, job["id"], row))


# ---------------------------------------------------------------------------------------------------------------- main


class Study:
    """The scheduler: holds the ready runs by priority, hands one to each idle worker, queues phase 2 when ready."""

    def __init__(self, opts: argparse.Namespace, cells: list[tuple], done: list[dict]) -> None:
        self.opts = opts
        self.scales = [float(s) for s in opts.lr_scales.split(",")]
        self.seeds = [int(s) for s in opts.seeds.split(",")]
        models, tasks, methods = ([c[i] for c in cells] for i in range(3))
        self.rank = {c: (tasks.index(c[1]), models.index(c[0]), methods.index(c[2])) for c in cells}
        self.ready: list[dict] = []
        self.done = {run_key(r["model"], r["task"], r["method"], r["lr"], r["seed"]): r for r in done}  # --resume
        self.phase1: dict[tuple, list[dict]] = {c: [] for c in cells}  # the cell's phase-1 rows, earlier or new
        self.tried: dict[tuple, list[float]] = {c: list(self.scales) for c in cells}  # its sweep, extensions included
        self.rows: list[dict] = []
        self.reused = 0  # runs of this plan found done in the --resume files
        self.next_id = 0
        self.peak_gib: dict[tuple, float] = {}  # (model, task) -> the largest peak GPU memory of its runs so far
        for r in done:
            self.note_peak(r)
        self.most_gib = 0.0  # the most memory the running runs were planned to take at once (printed at the end)
        self.ended = 0  # runs recorded so far (an out-of-memory retry waits for the next one)
        for cell in cells:
            lr0 = METHODS[cell[2]][2]
            for i, s in enumerate(self.scales):
                if (row := self.done.get(run_key(*cell, lr0 * s, self.seeds[0]))) is not None:
                    self.phase1[cell].append(row)
                    self.reused += 1
                else:
                    self.add(cell, 1, i, lr0 * s, s, self.seeds[0])
            if len(self.phase1[cell]) == len(self.scales):  # phase 1 done in an earlier file: phase 2 can start
                self.phase1_done(cell)

    def note_peak(self, row: dict) -> None:
        if (gib := row.get("peak_gib")) is not None:
            key = (row["model"], row["task"])
            self.peak_gib[key] = max(self.peak_gib.get(key, 0.0), gib)

    def requeue(self, job: dict) -> None:
        """An out-of-memory run goes back to the ready list (it lost a race for memory; it is not a failure).

        Its kind's memory estimate grows by a quarter (the peaks it was planned with were too small), and it waits
        until another run has ended: started again at once, it would meet the same full GPU."""
        key = (job["model"], job["task"])
        self.peak_gib[key] = 1.25 * self.peak_gib.get(key, self.opts.probe_gib)
        self.ready.append({**job, "tries": job.get("tries", 0) + 1, "after": self.ended})
        self.ready.sort(key=lambda j: j["prio"])

    def add(self, cell: tuple, phase: int, index: int, lr: float, scale: float, seed: int) -> None:
        model, task, method = cell
        self.ready.append({"id": self.next_id, "model": model, "task": task, "method": method, "phase": phase,
                           "lr": lr, "scale": scale, "seed": seed, "prio": priority(self.rank, cell, phase, index)})  # fmt: skip
        self.next_id += 1
        self.ready.sort(key=lambda j: j["prio"])

    def phase1_done(self, cell: tuple) -> None:
        """Phase 1 of a cell has all its runs: extend the sweep past an edge that holds the best LR (--extend-edges
        steps at most, each the grid's step at that edge: 0.3, 1, 3 -> 9 or 0.09), else queue phase 2."""
        best = summarize_study.best_lr(self.phase1[cell])
        tried = sorted(self.tried[cell])
        extended = len(tried) - len(self.scales)
        at_edge = best is not None and len(tried) > 2 and best["scale"] in (tried[0], tried[-1])
        if at_edge and extended < self.opts.extend_edges:
            edge, inner = (tried[-1], tried[-2]) if best["scale"] == tried[-1] else (tried[0], tried[1])
            scale = float(f"{edge * edge / inner:.3g}")
            self.tried[cell].append(scale)
            lr = METHODS[cell[2]][2] * scale
            if (row := self.done.get(run_key(*cell, lr, self.seeds[0]))) is not None:  # an earlier study ran it
                self.reused += 1
                self.phase1[cell].append(row)
                return self.phase1_done(cell)
            return self.add(cell, 1, len(self.tried[cell]) - 1, lr, scale, self.seeds[0])
        self.queue_phase2(cell)

    def queue_phase2(self, cell: tuple) -> None:
        """The other seeds at the best validation LR of the cell's phase 1, less those an earlier file has."""
        best = summarize_study.best_lr(self.phase1[cell])
        if best is None:
            return
        for i, seed in enumerate(self.seeds[1:]):
            if run_key(*cell, best["lr"], seed) in self.done:
                self.reused += 1
            else:
                self.add(cell, 2, i, best["lr"], best["scale"], seed)

    def finished(self, job: dict, row: dict) -> None:
        """Record a result; when it completes a cell's phase 1, queue phase 2 at the best validation LR."""
        self.rows.append(row)
        self.ended += 1
        cell = (job["model"], job["task"], job["method"])
        if job["phase"] != 1:
            return
        self.phase1[cell].append(row)
        if len(self.phase1[cell]) == len(self.tried[cell]):
            self.phase1_done(cell)

    def take(self, elapsed: float, slowest: dict, running: list[dict]) -> dict | None:
        """The first ready run that is expected to end before the hard deadline (slowest finished run of its kind)
        and to fit in GPU memory beside the running ones (see the module docstring)."""

        def need(key: tuple) -> float:  # a (model, task) not seen yet is assumed to need --probe-gib
            return self.peak_gib.get(key, self.opts.probe_gib)

        used = sum(need((j["model"], j["task"])) for j in running)
        for job in self.ready:
            key = (job["model"], job["task"])
            if elapsed + 1.1 * slowest.get(key, 0.0) >= self.opts.hard_seconds:
                continue
            # one probe per kind: until a run of it reports its peak, --probe-gib is a guess (runs of a kind may need
            # more than it: starting them all on the guess overruns the GPU)
            probing = key not in self.peak_gib and self.opts.gpu_mem_gib != float("inf")
            if probing and any((j["model"], j["task"]) == key for j in running):
                continue
            if running and job.get("after", -1) >= self.ended:
                continue
            if running and used + need(key) > self.opts.gpu_mem_gib:  # (alone, a run always starts)
                continue
            self.ready.remove(job)
            self.most_gib = max(self.most_gib, used + need(key))
            return job
        return None


def _device_name(fake: bool) -> str:
    """The name a worker records in its rows' "device" field, for this machine."""
    if fake:
        return "cpu"
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/study", help="folder of study.jsonl (run folders go to --run-dir)")
    ap.add_argument("--run-dir", default=None, help="where run folders live while they run (default: a temp folder)")
    ap.add_argument("--models", default="builtin:mamba-tiny,builtin:mamba2-tiny")
    ap.add_argument("--tasks", default=",".join(TASKS), help="in priority order")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", default="0,1,2", help="the first in phase 1 (LR sweep), the others in phase 2")
    ap.add_argument("--lr-scales", default="0.3,1,3", help="each method's default LR times these (phase 1)")
    ap.add_argument("--extend-edges", type=int, default=0, metavar="K",
                    help="when a cell's best LR is the largest (smallest) tried, try one grid step further, up to K "
                    "times, before its seeds run at the final best LR")  # fmt: skip
    ap.add_argument("--epochs", type=int, default=None, help="default: per task (TASKS)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-examples", type=int, default=None, help="training examples per task (smoke tests)")
    ap.add_argument("--eval-examples", type=int, default=None, help="validation and test examples (default: per task)")
    ap.add_argument("--workers", type=int, default=1, help="worker processes sharing the GPU")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--resume", nargs="+", default=[], metavar="FILE",
                    help="earlier study.jsonl files: their successful runs are copied to <out>/study.jsonl and not run "
                    "again (their settings must match)")  # fmt: skip
    ap.add_argument("--max-seconds", type=float, default=1e9, help="start no run after this many seconds")
    ap.add_argument("--max-runs", type=int, default=None, help="start at most this many runs (tests, short calls)")
    ap.add_argument("--hard-seconds", type=float, default=None, help="abandon running runs (default: max + 60)")
    ap.add_argument("--fake", action="store_true", help="made-up results, no training (tests the scheduler)")
    ap.add_argument("--fake-seconds", type=float, default=0.05)
    ap.add_argument(
        "--fake-best-scale", type=float, default=1.0, help="--fake: the LR scale the made-up scores peak at"
    )
    ap.add_argument("--fake-peak-gib", type=float, default=1.0, help="--fake: the peak GPU memory each run reports")
    ap.add_argument("--fake-oom", default=None, metavar="METHOD", help="--fake: its first run at a scale < 1 runs out "
                    "of memory")  # fmt: skip
    ap.add_argument(
        "--probe-gib",
        type=float,
        default=8.0,
        help="the GPU memory assumed for a (model, task) until one of its runs reports its peak",
    )
    ap.add_argument("--gpu-mem-gib", type=float, default=None,
                    help="GPU memory the running runs' peaks may add up to (default: the GPU's less 1 GiB per worker; "
                    "unlimited without a GPU)")  # fmt: skip
    opts = ap.parse_args()
    if opts.gpu_mem_gib is None:
        opts.gpu_mem_gib = float("inf")
        if not opts.fake:
            import torch

            if torch.cuda.is_available():
                opts.gpu_mem_gib = torch.cuda.get_device_properties(0).total_memory / 2**30 - opts.workers
    start = time.perf_counter()
    if opts.hard_seconds is None:
        opts.hard_seconds = opts.max_seconds + 60
    models, tasks, methods = (s.split(",") for s in (opts.models, opts.tasks, opts.methods))
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r}; known: {', '.join(METHODS)}")
    if not opts.fake:  # fail now, not after each run has trained
        from ssmtune.data import get_task
        from ssmtune.eval.metrics import require_metric_packages

        for t in tasks:
            try:
                require_metric_packages(get_task(t).metrics, t)
            except ImportError as e:
                ap.error(str(e))
    settings = {k: getattr(opts, k) for k in SETTINGS}
    task_specs = {t: TASKS.get(t, {}) for t in tasks}
    old_plans, done = read_resume(opts.resume, settings, task_specs)
    # --fake goes by the name: reading a model's config imports torch (2 s, most of a fake study's time)
    cells = make_plan(models, tasks, methods, {m: "mamba2" in m if opts.fake else is_mamba2(m) for m in models})
    study = Study(opts, cells, done)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    run_dir = opts.run_dir or tempfile.mkdtemp(prefix="ssmtune-study-")
    # The file's plan covers the earlier files' cells too (the summary lists what is still missing), then this one's.
    all_cells = list(dict.fromkeys([tuple(c) for p in old_plans for c in p["cells"]] + cells))
    for p in old_plans:
        task_specs = p.get("task_specs", {}) | task_specs
    plan = {"type": "plan", "cells": all_cells, "seeds": study.seeds, "lr_scales": study.scales,
            "runs": len(all_cells) * (len(study.scales) + len(study.seeds) - 1), "settings": settings,
            "task_specs": task_specs, "resumed_from": opts.resume, "resumed_runs": len(done)}  # fmt: skip
    path = out / "study.jsonl"
    if opts.resume and path.exists() and not any(path.samefile(f) for f in opts.resume):
        raise SystemExit(f"{path} exists and is not one of the --resume files: it would be replaced; add it to them")
    if not opts.resume and path.exists() and path.stat().st_size > 0:
        # appending would mix two studies in one file (a second plan line, every run counted twice in the summary)
        raise SystemExit(f"{path} holds an earlier study: continue it with --resume {path}, or choose another --out")
    if opts.resume:  # a new file, complete on its own (it may replace one of the --resume files: write, then rename)
        from ssmtune.utils.io import atomic_write_text

        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in [plan, *done]))
    jsonl = open(path, "a")  # noqa: SIM115 - open for the whole study, one flushed line per run

    def write(row: dict) -> None:
        jsonl.write(json.dumps(row) + "\n")
        jsonl.flush()
        os.fsync(jsonl.fileno())

    if not opts.resume:
        write(plan)
    planned = len(cells) * (len(study.scales) + len(study.seeds) - 1)
    n_p2 = sum(j["phase"] == 2 for j in study.ready)
    print(f"plan: {len(cells)} cells, {planned} runs: {study.reused} done in --resume files ({len(done)} rows copied), "
          f"{len(study.ready) - n_p2} phase-1 + {n_p2} phase-2 runs ready, more phase-2 runs as phase 1 ends; "
          f"{opts.workers} workers", flush=True)  # fmt: skip

    wopts = {k: getattr(opts, k) for k in ("epochs", "eval_examples", "max_examples", "batch_size", "threads", "fake",
                                           "fake_seconds", "fake_peak_gib", "fake_oom", "fake_best_scale")} | {"run_dir": run_dir, "parent": os.getpid()}  # fmt: skip
    os.environ["OMP_NUM_THREADS"] = str(opts.threads)  # inherited by the workers before they import torch
    ctx = mp.get_context("spawn")  # CUDA cannot be forked
    results: mp.Queue = ctx.Queue()
    workers: dict[int, tuple] = {}  # id -> (process, its job queue)

    def spawn(wid: int) -> None:
        jobs = ctx.Queue()
        p = ctx.Process(target=worker, args=(wid, jobs, results, wopts), daemon=True)
        p.start()
        workers[wid] = (p, jobs)

    for wid in range(opts.workers):
        spawn(wid)
    busy: dict[int, tuple[dict, float]] = {}  # worker id -> (job, time handed out)
    slowest: dict[tuple, float] = {}  # (model, task) -> the longest run so far, to not start one that cannot end
    here = _device_name(opts.fake)
    for r in done:  # the earlier calls' times: a first run that cannot end before the deadline is not started
        if r.get("device", here) != here:  # a CPU run's time says nothing about a GPU run's (rows record their device)
            continue
        key = (r["model"], r["task"])
        slowest[key] = max(slowest.get(key, 0.0), r.get("seconds", 0.0))
    started = 0

    def finish(job: dict, row: dict) -> None:
        row = {"type": "run"} | {k: job[k] for k in ("model", "task", "method", "phase", "scale", "lr", "seed")} | row
        write(row)
        print(json.dumps(row), flush=True)
        study.finished(job, row)

    while True:
        elapsed = time.perf_counter() - start
        if elapsed > opts.hard_seconds:
            while busy:  # results already sent are kept: only runs still going are abandoned
                try:
                    wid, _, row = results.get(timeout=0.2)
                except queue.Empty:
                    break
                if wid in busy:
                    finish(busy.pop(wid)[0], row)
            for wid, (job, _) in busy.items():
                print(f"hard deadline: abandoning {job['model']} {job['task']} {job['method']} "
                      f"lr={job['lr']:g} seed={job['seed']}", flush=True)  # fmt: skip
                workers[wid][0].terminate()
            busy.clear()
            break
        if elapsed < opts.max_seconds:
            for wid in [w for w in workers if w not in busy]:
                running = [j for j, _ in busy.values()]
                if started == opts.max_runs or (job := study.take(elapsed, slowest, running)) is None:
                    break
                workers[wid][1].put({k: v for k, v in job.items() if k != "prio"})
                busy[wid] = (job, time.perf_counter())
                started += 1
        if not busy:
            break
        try:
            wid, _, row = results.get(timeout=0.5)
        except queue.Empty:
            for wid in list(busy):  # a worker that died (e.g. killed for memory) fails its run; a new one replaces it
                if not workers[wid][0].is_alive():
                    job, _ = busy.pop(wid)
                    finish(job, {"error": f"worker died (exit code {workers[wid][0].exitcode})"})
                    spawn(wid)
            continue
        job, _ = busy.pop(wid)
        study.note_peak(job | row)
        if "out of memory" in row.get("error", "").lower() and job.get("tries", 0) < 2:
            print(f"out of memory: {job['model']} {job['task']} {job['method']} lr={job['lr']:g} seed={job['seed']} "
                  "queued again", flush=True)  # fmt: skip
            study.requeue(job)
            started -= 1
            continue
        if "error" not in row:  # the run's own time (a worker's start-up is paid once, not per run)
            key = (job["model"], job["task"])
            slowest[key] = max(slowest.get(key, 0.0), row["seconds"])
        finish(job, row)

    for wid, (p, jobs) in workers.items():
        if p.is_alive():
            jobs.put(None)
    stop = time.perf_counter() + 10  # one shared wait: idle workers exit at once; a stuck one must not hold the exit
    for p, _ in workers.values():
        p.join(timeout=max(0.1, stop - time.perf_counter()))
        if p.is_alive():
            p.terminate()
    jsonl.close()
    if not opts.run_dir:
        shutil.rmtree(run_dir, ignore_errors=True)
    print(f"\n{study.reused + len(study.rows)} of {planned} planned runs finished ({len(study.rows)} in "
          f"{time.perf_counter() - start:.0f} s, {study.reused} earlier); most GPU memory planned at once: "
          f"{study.most_gib:.1f} GiB of {opts.gpu_mem_gib:.1f}\n", flush=True)  # fmt: skip
    plan, rows = summarize_study.load([out / "study.jsonl"])
    print(summarize_study.table(summarize_study.summarize(rows), plan), flush=True)


if __name__ == "__main__":
    main()
