"""CPU smoke test of benchmarks/profile_train_step.py: it runs, writes its JSON and groups ops into categories."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_profile_train_step_runs_on_cpu(tmp_path):
    out = tmp_path / "profile.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "profile_train_step.py"), "--tiny", "--device", "cpu",
           "--warmup", "1", "--steps", "1", "--variants", "ssmtune:mamba:state_offset_h:2x16", "bad:entry:x:1x1",
           "--out", str(out)]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert p.returncode != 0 and "bad --variants entry 'bad:entry:x:1x1'" in p.stderr + p.stdout
    cmd.remove("bad:entry:x:1x1")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    (r,) = json.loads(out.read_text())["results"]
    assert r["variant"] == "ssmtune:mamba:state_offset_h:2x16"
    assert r["busy_ms"] > 0 and r["categories"] and r["top"]
