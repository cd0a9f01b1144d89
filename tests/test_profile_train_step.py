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
    assert r["timeline"]["kernels"] > 0 and r["timeline"]["span_ms"] > 0


def test_idle_gaps_buckets_and_largest():
    """Overlapping intervals merge; each gap lands in its bucket once per step; the largest gap names its neighbours."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from profile_train_step import idle_gaps

    # two steps; times in µs. Gaps: 3 (a→b), 50 (c→d), 2000 (d→e); b and c overlap (no gap between them)
    iv = [(0, 10, "a"), (13, 40, "b"), (30, 45, "c"), (95, 100, "d"), (2100, 2110, "e")]
    r = idle_gaps(list(reversed(iv)), steps=2)
    assert r["kernels"] == 2.5
    assert r["span_ms"] == 2110 / 1e3 / 2
    assert r["busy_ms"] == (10 + 32 + 5 + 10) / 1e3 / 2
    assert abs(r["idle_ms"] - (3 + 50 + 2000) / 1e3 / 2) < 1e-12
    b = r["buckets"]
    assert b["0-5 us"] == {"gaps": 0.5, "ms": 3 / 1e3 / 2}
    assert b["20-100 us"] == {"gaps": 0.5, "ms": 50 / 1e3 / 2}
    assert b[">1000 us"] == {"gaps": 0.5, "ms": 2000 / 1e3 / 2}
    assert b["5-20 us"]["gaps"] == b["100-1000 us"]["gaps"] == 0
    assert r["largest"][0] == {"us": 2000, "before": "d", "after": "e"}
    assert r["largest"][1] == {"us": 50, "before": "c", "after": "d"}
    assert idle_gaps([], steps=1)["kernels"] == 0
