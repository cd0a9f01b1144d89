"""scripts/study.py (scheduler, with --fake runs: no training) and scripts/summarize_study.py (table, plot, claims)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import study
import summarize_study as S


def _study(tmp_path: Path, *args: str) -> tuple[str, list[dict]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(ROOT / "scripts/study.py"), "--out", str(tmp_path), "--fake",
                          "--fake-seconds", "0.01", "--workers", "2", *args],
                         capture_output=True, text=True, env=env, timeout=120, check=True)  # fmt: skip
    lines = [json.loads(x) for x in (tmp_path / "study.jsonl").read_text().splitlines()]
    return out.stdout, lines


def test_study_two_phases_in_priority_order(tmp_path: Path) -> None:
    stdout, lines = _study(tmp_path, "--tasks", "wn-pos,wn-pos-long", "--max-seconds", "60")
    plan, rows = lines[0], lines[1:]
    assert plan["type"] == "plan" and plan["seeds"] == [0, 1, 2]
    cells = {tuple(c) for c in plan["cells"]}
    assert ("builtin:mamba2-tiny", "wn-pos", "lora_s6") not in cells  # Mamba-1 only methods skipped on Mamba-2
    assert ("builtin:mamba2-tiny", "wn-pos", "additional_scan") not in cells
    assert len(cells) == 2 * (11 + 9) and len(rows) == 5 * len(cells)  # 3 LRs on seed 0, then seeds 1 and 2
    for cell in cells:
        rs = [r for r in rows if (r["model"], r["task"], r["method"]) == cell]
        p1, p2 = [r for r in rs if r["phase"] == 1], [r for r in rs if r["phase"] == 2]
        assert sorted(r["scale"] for r in p1) == [0.3, 1.0, 3.0] and {r["seed"] for r in p2} == {1, 2}
        assert {r["lr"] for r in p2} == {S.best_lr(p1)["lr"]}  # phase 2 at the best validation LR
        assert max(rows.index(r) for r in p1) < min(rows.index(r) for r in p2)
    # the first task goes first (both models, both phases). Rows are written as runs end, and with 2 workers one
    # wn-pos-long run can start while the last wn-pos run is still going and end before it; that run's ending can
    # then queue its cell's 2 phase-2 seeds, which still outrank wn-pos-long. So up to 3 wn-pos rows may come after
    # the first wn-pos-long one (a CI run saw 1); a broken priority order interleaves far more.
    first_long = next(i for i, r in enumerate(rows) if r["task"] == "wn-pos-long")
    assert all(r["task"] == "wn-pos" for r in rows[:first_long])
    assert first_long >= 5 * 20 - 3
    assert any("error" in r for r in rows)  # --fake makes bitfit at 3x LR fail; the study goes on
    assert "| mamba2-tiny | wn-pos-long | full |" in stdout


def test_study_truncated_says_what_was_not_run(tmp_path: Path) -> None:
    stdout, lines = _study(tmp_path, "--tasks", "wn-pos", "--models", "builtin:mamba-tiny", "--max-seconds", "0")
    assert len(lines) == 1  # the plan only
    assert "0 of 55 planned runs finished" in stdout and "No result for 11 of 11 cells" in stdout


def test_study_refuses_to_append_to_an_earlier_study(tmp_path: Path) -> None:
    """Without --resume, an existing study.jsonl is neither appended to (two plans, each run counted twice by the
    summary, since the rows differ in their times) nor replaced."""
    sel = ("--tasks", "wn-pos", "--models", "builtin:mamba-tiny", "--methods", "state_offset_h")
    _study(tmp_path, *sel)
    before = (tmp_path / "study.jsonl").read_text()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    again = subprocess.run([sys.executable, str(ROOT / "scripts/study.py"), "--out", str(tmp_path), "--fake", *sel],
                           capture_output=True, text=True, env=env, timeout=60, check=False)  # fmt: skip
    assert again.returncode != 0 and "holds an earlier study" in again.stderr and "--resume" in again.stderr
    assert (tmp_path / "study.jsonl").read_text() == before
    _, lines = _study(tmp_path, *sel, "--resume", str(tmp_path / "study.jsonl"))  # the way to continue it
    assert [r["type"] for r in lines].count("plan") == 1 and len(lines) == 1 + 5


def test_study_fits_runs_in_gpu_memory_and_retries_out_of_memory(tmp_path: Path) -> None:
    """Runs start only while their peaks (--probe-gib until a run of the kind has ended) fit in --gpu-mem-gib; a run
    that fails with out-of-memory is queued again, not recorded as a failure."""
    sel = ("--tasks", "wn-pos", "--models", "builtin:mamba-tiny", "--methods", "prompt,full", "--seeds", "0",
           "--workers", "3", "--fake-peak-gib", "3", "--fake-oom", "prompt")  # fmt: skip
    stdout, lines = _study(tmp_path / "a", *sel, "--gpu-mem-gib", "5")
    rows = lines[1:]
    assert len(rows) == 6 and not any("error" in r for r in rows) and {r["peak_gib"] for r in rows} == {3.0}
    assert "most GPU memory planned at once: 8.0 GiB of 5.0" in stdout  # the probe alone, then one at a time
    assert stdout.count("out of memory: builtin:mamba-tiny wn-pos prompt") == 1 and "queued again" in stdout
    # the out-of-memory error raised the kind's estimate from 3 to 3.75 GiB: two runs at once fit in 8 GiB
    stdout, _ = _study(tmp_path / "b", *sel, "--gpu-mem-gib", "8", "--probe-gib", "1")
    assert "most GPU memory planned at once: 7.5 GiB of 8.0" in stdout
    # one probe per kind: three 2.5-GiB probes would fit in 7.5 GiB, but the first runs alone, then two known 3-GiB runs
    no_oom = [a for a in sel if a not in ("--fake-oom", "prompt")]
    stdout, _ = _study(tmp_path / "c", *no_oom, "--gpu-mem-gib", "7.5", "--probe-gib", "2.5")
    assert "most GPU memory planned at once: 6.0 GiB of 7.5" in stdout and "out of memory" not in stdout


def _key(r: dict) -> tuple:
    return r["model"], r["task"], r["method"], r["lr"], r["seed"]


def test_study_resume_continues_without_repeating(tmp_path: Path) -> None:
    sel = ("--tasks", "wn-pos,wn-pos-long", "--models", "builtin:mamba-tiny")
    _, a = _study(tmp_path / "a", *sel, "--max-runs", "40")  # wn-pos phase 1 (33 runs) and a few phase-2 runs
    ok_a = [r for r in a[1:] if "error" not in r]
    assert len(a) == 41 and any("error" in r for r in a) and not any(r["task"] == "wn-pos-long" for r in a[1:])
    # Make another LR the best of a cell whose phase 1 file a completed: phase 2 must follow file a's results.
    full = [r for r in ok_a if r["method"] == "full"]
    assert len(full) == 3
    target = next(r for r in full if r["lr"] != S.best_lr(full)["lr"])
    target["val"] = 2.0
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [a[0], *a[1:]]))

    # b: only wn-pos-long now; c: the rest. Each file starts with the plan and the earlier successful rows.
    _, b = _study(tmp_path / "b", *sel, "--tasks", "wn-pos-long", "--resume", str(tmp_path / "a.jsonl"))
    assert b[1 : 1 + len(ok_a)] == ok_a and b[0]["settings"]["batch_size"] == 16
    assert {tuple(c) for c in b[0]["cells"]} == {tuple(c) for c in a[0]["cells"]}  # the wn-pos cells stay planned
    new_b = b[1 + len(ok_a) :]
    assert new_b and all(r["task"] == "wn-pos-long" for r in new_b)
    ok_b = [r for r in b[1:] if "error" not in r]
    stdout, c = _study(tmp_path / "c", *sel, "--resume", str(tmp_path / "b/study.jsonl"))
    new_c = c[1 + len(ok_b) :]
    assert c[1 : 1 + len(ok_b)] == ok_b and new_c and all(r["task"] == "wn-pos" for r in new_c if "error" not in r)
    ok = [r for r in c[1:] if "error" not in r]
    assert len({_key(r) for r in ok}) == len(ok)  # no successful run was repeated
    # --fake fails bitfit at 3x LR each time: error rows are not copied but run again, once per call
    errors = [(r["task"], r["method"], r["scale"]) for r in a[1:] + new_b + new_c if "error" in r]
    assert sorted(errors) == [("wn-pos", "bitfit", 3.0)] * 2 + [("wn-pos-long", "bitfit", 3.0)] * 2
    # every cell complete: 3 LRs on seed 0, seeds 1 and 2 at the best LR
    summary = S.summarize(ok)
    assert len(summary) == 22 and all(e["n"] == 3 and len(e["sweep"]) in (2, 3) for e in summary.values())
    phase2 = {r["lr"] for r in ok if r["method"] == "full" and r["task"] == "wn-pos" and r["seed"] > 0}
    assert phase2 == {target["lr"]}  # the best LR per file a (its tampered row), not a rerun
    assert "110 of 110 planned runs finished" in stdout and "No result" not in stdout
    both = S.load([tmp_path / "a.jsonl", tmp_path / "c/study.jsonl"])[1]
    assert len([r for r in both if "error" not in r]) == len(ok)  # rows copied from a, passed twice, count once

    # other settings: refused, nothing run
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    bad = subprocess.run([sys.executable, str(ROOT / "scripts/study.py"), "--out", str(tmp_path / "d"), "--fake",
                          "--epochs", "2", "--resume", str(tmp_path / "a.jsonl")],
                         capture_output=True, text=True, env=env, timeout=60, check=False)  # fmt: skip
    assert bad.returncode != 0 and "epochs=None, this study epochs=2" in bad.stderr
    assert not (tmp_path / "d/study.jsonl").exists()


def test_extend_edges_sweeps_past_the_edge_before_the_seeds(tmp_path: Path) -> None:
    """--extend-edges K: a cell whose best LR is the largest tried gets one grid step more (3 -> 9 -> 27), up to K,
    and its seeds run at the final best LR; a cell whose largest LR failed is not extended."""
    sel = ("--tasks", "wn-pos", "--models", "builtin:mamba-tiny", "--methods", "prompt,bitfit", "--fake-best-scale",
           "10")  # fmt: skip
    _, lines = _study(tmp_path / "a", *sel, "--extend-edges", "2")
    rows = lines[1:]
    prompt = [r for r in rows if r["method"] == "prompt"]
    p1, p2 = [r for r in prompt if r["phase"] == 1], [r for r in prompt if r["phase"] == 2]
    scales = [r["scale"] for r in p1]  # the sweep's three in any order (two workers), then 3 was best, then 9
    assert sorted(scales[:3]) == [0.3, 1.0, 3.0] and scales[3:] == [9.0, 27.0]
    assert {r["lr"] for r in p2} == {S.best_lr(p1)["lr"]} and {r["seed"] for r in p2} == {1, 2}
    assert max(rows.index(r) for r in p1) < min(rows.index(r) for r in p2)
    bitfit = [r for r in rows if r["method"] == "bitfit"]  # 3x fails (--fake), so 1x is best and not an edge
    assert sorted(r["scale"] for r in bitfit if r["phase"] == 1) == [0.3, 1.0, 3.0]
    assert {r["scale"] for r in bitfit if r["phase"] == 2} == {1.0}
    # resumed with the same options: the extension rows are found, nothing runs again but the failed bitfit run
    _, again = _study(tmp_path / "b", *sel, "--extend-edges", "2", "--resume", str(tmp_path / "a/study.jsonl"))
    new = again[1 + len([r for r in rows if "error" not in r]) :]
    assert [(r["method"], r["scale"]) for r in new] == [("bitfit", 3.0)]
    # the lower edge, one step allowed: 0.3 best -> 0.09, and no further
    low = ("--tasks", "wn-pos", "--models", "builtin:mamba-tiny", "--methods", "prompt", "--fake-best-scale", "0.05")
    _, down = _study(tmp_path / "d", *low, "--extend-edges", "1")
    assert [r["scale"] for r in down[1:] if r["phase"] == 1][3:] == [0.09]
    # without the option the sweep stays 0.3, 1, 3 and the seeds run at 3
    _, plain = _study(tmp_path / "c", *sel)
    assert {r["scale"] for r in plain[1:] if r["method"] == "prompt" and r["phase"] == 2} == {3.0}


def test_earlier_run_times_count_only_on_the_same_device(tmp_path: Path) -> None:
    """A (model, task)'s slowest earlier run keeps its next runs from starting near the deadline, but only a run on
    this machine's device says how long one takes here (the GPU study resumes files with CPU rows)."""
    sel = ("--tasks", "wn-pos", "--models", "builtin:mamba-tiny", "--methods", "prompt", "--seeds", "0")
    _, a = _study(tmp_path / "a", *sel, "--max-runs", "1")
    assert len(a) == 2 and "error" not in a[1]
    for device, started in (("NVIDIA H200", 2), ("cpu", 0)):  # --fake runs record device "cpu"
        row = {**a[1], "seconds": 1e6, "device": device}
        (tmp_path / f"{device}.jsonl").write_text(json.dumps(a[0]) + "\n" + json.dumps(row) + "\n")
        _, b = _study(tmp_path / device, *sel, "--resume", str(tmp_path / f"{device}.jsonl"), "--hard-seconds", "100")
        assert len(b) == 2 + started, device


def test_resume_reads_the_gpu_study_file(monkeypatch: pytest.MonkeyPatch) -> None:
    # the GPU study's result file (later runs copied the earlier rows into it); its settings are
    # the defaults of then, and its rows say how many epochs they ran
    gpu = [ROOT / "docs/results/study-gpu.jsonl"]
    plans, done = study.read_resume(gpu, dict(study.OLD_DEFAULTS), {})
    assert len(plans) == 1 and len(done) == 403
    with pytest.raises(SystemExit, match="fake=False, this study fake=True"):
        study.read_resume(gpu, {**study.OLD_DEFAULTS, "fake": True}, {})
    monkeypatch.setitem(study.TASKS, "wn-pos", {"epochs": 2, "eval_examples": None})
    with pytest.raises(SystemExit, match="a wn-pos run has epochs=3, this study 2"):
        study.read_resume(gpu, dict(study.OLD_DEFAULTS), {})


def _rows(method: str, task: str, tests: list[float], model: str = "m", lr: float = 1e-3) -> list[dict]:
    return [{"model": model, "task": task, "method": method, "lr": lr, "scale": 1.0, "seed": s, "val": t,
             "test": t, "trainable": 10} for s, t in enumerate(tests)]  # fmt: skip


def test_best_lr_uses_the_seeds_every_lr_has() -> None:
    rows = _rows("a", "t", [0.5, 0.9, 0.9], lr=1e-3) + _rows("a", "t", [0.6], lr=2e-3)
    assert S.best_lr(rows)["lr"] == 2e-3  # seed 0: 0.6 > 0.5 (seeds 1, 2 of 1e-3 do not count)
    rows += [{**rows[0], "lr": 4e-3, "error": "nan"}]
    assert S.best_lr(rows)["lr"] == 2e-3 and S.best_lr([rows[-1]]) is None


def test_verdicts_and_claims_with_missing_cells(tmp_path: Path) -> None:
    q = lambda m, sd, n=3: {"mean": m, "sd": sd, "n": n}
    assert S.verdict(q(0.6, 0.02), q(0.5, 0.03)) == "supports"
    assert S.verdict(q(0.4, 0.02), q(0.5, 0.03)) == "contradicts"
    assert S.verdict(q(0.52, 0.05), q(0.5, 0.05)) == "cannot tell"
    assert S.verdict(q(0.9, 0.0, 1), q(0.5, 0.0)) == "cannot tell (1 seed)"
    rows = (_rows("state_offset_h", "wn-pos", [0.60, 0.62, 0.61]) + _rows("prefix", "wn-pos", [0.40, 0.42, 0.41])
            + _rows("initial_state", "wn-pos", [0.61, 0.60, 0.62]) + _rows("state_offset_h", "wn-pos-long", [0.58, 0.6])
            + _rows("initial_state", "wn-pos-long", [0.30, 0.32, 0.31]))  # fmt: skip
    summary = S.summarize(rows)
    text = S.claims(summary)
    assert "| state-based (best of SO-h, SO-y) beats prompt-based (best of prefix, prompt) | m / wn-pos |" in text
    assert "supports |" in text.splitlines()[2]
    assert "Initial State loses more than SO-h from wn-pos to wn-pos-long | m |" in text
    assert "LoRA" not in text.split("\n\n")[0]  # no LoRA run: no LoRA row
    cells = [("m", "wn-pos", "state_offset_h"), ("m", "wn-pos", "lora_s6")]
    plan = {"cells": cells, "lr_scales": [1], "seeds": [0, 1, 2]}
    table = S.table(summary, plan)
    assert "| m | wn-pos | lora_s6 | | | | | | | not run |" in table and "2/3 seeds" in table
    S.plot(summary, str(tmp_path / "p.png"))
    S.plot({}, str(tmp_path / "empty.png"))
    assert (tmp_path / "p.png").stat().st_size > 0 and (tmp_path / "empty.png").exists()


@pytest.mark.parametrize("name", ["study-pilot.jsonl", "study-cpu-mamba2.jsonl"])
def test_summarize_reads_old_files(name: str) -> None:
    plan, rows = S.load([ROOT / "docs/results" / name])
    assert plan is None and "| - | wn-pos | state_offset_h |" in S.table(S.summarize(rows), plan)


def test_out_of_memory_retry_waits_for_another_run_to_end() -> None:
    """A requeued out-of-memory run is not handed out again while the runs that filled the GPU still run (it would
    meet the same full GPU), its kind's estimate grows, and alone it starts at once."""
    import argparse

    opts = argparse.Namespace(lr_scales="1", seeds="0", probe_gib=8.0, gpu_mem_gib=40.0, hard_seconds=1e9)
    cells = [("m", "t", "state_offset_h"), ("m", "t", "prompt")]
    s = study.Study(opts, cells, [])
    s.peak_gib[("m", "t")] = 10.0
    a = s.take(0, {}, [])
    b = s.take(0, {}, [a])
    assert a["method"] == "state_offset_h" and b["method"] == "prompt"
    s.requeue(b)  # b ran out of memory beside a
    assert s.peak_gib[("m", "t")] == 12.5
    assert s.take(0, {}, [a]) is None  # a still runs: b waits
    s.finished(a, {**a, "val": 0.5, "test": 0.5})
    assert s.take(0, {}, [])["method"] == "prompt"
    s.requeue(b)
    assert s.take(0, {}, [])["method"] == "prompt"  # nothing runs: alone, it starts
