"""The packing benchmark on the CPU: one padded stack, a pair of packed stacks per ``--bucket-tokens`` value and the
packed rows (resets) stack; the graphed one is skipped with a note."""

from __future__ import annotations

import json

from ssmtune.bench.run import main
from ssmtune.ops import varlen


def test_packing_bench_times_each_bucket_value(tmp_path) -> None:
    out = tmp_path / "packing.json"
    argv = ["packing", "--device", "cpu", "--small", "--examples", "8", "--batch-size", "4", "--steps", "1",
            "--warmup", "0", "--repeats", "1", "--bucket-tokens", "0", "1000000", "--out", str(out)]  # fmt: skip
    default = varlen.BUCKET_OVERHEAD_TOKENS
    assert main(argv) == 0
    assert varlen.BUCKET_OVERHEAD_TOKENS == default  # set per stack, then put back
    res = json.loads(out.read_text())["results"]
    rows = {r["stack"]: r for r in res["rows"]}
    assert list(rows) == ["padded", "packed (bucket 0)", "packed rows (bucket 0)", "packed (bucket 1000000)",
                          "packed rows (bucket 1000000)", "rows (resets)"]  # fmt: skip
    # packed rows (resets): --batch-size rows of 192 tokens (128 + 3 lead pads, rounded up to 64), eager on the CPU
    assert rows["rows (resets)"]["computed_tokens"] == 4 * 192 and rows["rows (resets)"]["bucket_tokens"] is None
    assert res["notes"] == ["rows (resets, graphed): skipped, CUDA graphs need a CUDA device"]
    assert set(res["over_padded"]) == set(rows) - {"padded"}
    assert res["check_rel_err"] < 1e-4
    # one bucket per length scans no padding; one bucket scans what the padded batch does
    assert rows["packed (bucket 0)"]["scanned_tokens"] == rows["packed (bucket 0)"]["real_tokens"]
    assert rows["packed (bucket 1000000)"]["scanned_tokens"] == rows["padded"]["scanned_tokens"]


def test_negative_bucket_tokens_refused(capsys) -> None:
    assert main(["packing", "--device", "cpu", "--small", "--bucket-tokens", "-1"]) != 0
    assert "--bucket-tokens must be >= 0, got -1" in capsys.readouterr().err
