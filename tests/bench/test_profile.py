"""The profile benchmark: a CPU run groups ops into categories and measures the idle gaps; idle_gaps' arithmetic."""

from __future__ import annotations

import json

from ssmtune.bench.profile_step import idle_gaps
from ssmtune.bench.run import main


def test_profile_runs_on_cpu(tmp_path, capsys) -> None:
    out = tmp_path / "profile.json"
    argv = ["profile", "--small", "--device", "cpu", "--warmup", "1", "--steps", "1", "--out", str(out), "--variants"]
    assert main([*argv, "ssmtune:mamba:state_offset_h:2x16", "bad:entry:x:1x1"]) == 2
    assert "bad --variants entry 'bad:entry:x:1x1'" in capsys.readouterr().err
    assert main([*argv, "ssmtune:mamba:state_offset_h:2x16"]) == 0
    (r,) = json.loads(out.read_text())["results"]["rows"]
    assert r["variant"] == "ssmtune:mamba:state_offset_h:2x16"
    assert r["busy_ms"] > 0 and r["categories"] and r["top"]
    assert r["timeline"]["kernels"] > 0 and r["timeline"]["span_ms"] > 0


def test_idle_gaps_buckets_and_largest() -> None:
    """Overlapping intervals merge; each gap lands in its bucket once per step; the largest gap names its neighbours."""
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
