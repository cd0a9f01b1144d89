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
    # the first task is finished (both models, both phases) before the second one starts
    first_long = next(i for i, r in enumerate(rows) if r["task"] == "wn-pos-long")
    assert all(r["task"] == "wn-pos" for r in rows[:first_long]) and first_long == 5 * 20
    assert any("error" in r for r in rows)  # --fake makes bitfit at 3x LR fail; the study goes on
    assert "| mamba2-tiny | wn-pos-long | full |" in stdout


def test_study_truncated_says_what_was_not_run(tmp_path: Path) -> None:
    stdout, lines = _study(tmp_path, "--tasks", "wn-pos", "--models", "builtin:mamba-tiny", "--max-seconds", "0")
    assert len(lines) == 1  # the plan only
    assert "0 of 55 planned runs finished" in stdout and "No result for 11 of 11 cells" in stdout


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
    plan, rows = S.load([ROOT / "docs/img" / name])
    assert plan is None and "| - | wn-pos | state_offset_h |" in S.table(S.summarize(rows), plan)
