"""Raw records from local files (JSON lines, JSON, CSV, TSV, parquet) or, lazily, from the hub via `datasets`.

Records are plain dicts; the task classes in `tasks.py` turn them into prompt/target examples.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

# Tried in this order when a split is looked up by stem inside a data folder.
EXTENSIONS = (".jsonl", ".json", ".tsv", ".csv", ".parquet", ".txt")


def read_records(path: str | Path, *, fieldnames: list[str] | None = None) -> list[dict]:
    """Read every record of a local file.

    Formats by suffix: `.jsonl` (one object a line), `.json` (a list, a `{"data": [...]}` object, or JSON lines),
    `.csv`, `.tsv` / `.txt` (tab-separated, no quote handling, as GLUE's files need), `.parquet` (needs pyarrow).

    Args:
        path: the file.
        fieldnames: column names for headerless CSV/TSV files (CoLA's raw TSV has no header).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            return _read_jsonl(path)
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise ValueError(f"{str(path)!r}: expected a JSON list of records, got {type(data).__name__}")
        return data
    if suffix in (".csv", ".tsv", ".txt"):
        delimiter = "," if suffix == ".csv" else "\t"
        # GLUE TSVs contain unbalanced quotes, so quoting is off for tab-separated files.
        quoting = csv.QUOTE_MINIMAL if suffix == ".csv" else csv.QUOTE_NONE
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, fieldnames=fieldnames, delimiter=delimiter, quoting=quoting)
            return [dict(row) for row in reader]
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError(f"reading {str(path)!r} needs pyarrow: pip install 'ssmtune[data]'") from e
        return pq.read_table(path).to_pylist()
    raise ValueError(f"{str(path)!r}: unsupported file type {suffix!r}; use one of {list(EXTENSIONS)}")


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{str(path)!r} line {lineno}: invalid JSON ({e.msg})") from e
    return records


def jsonl_line(path: str | Path, index: int) -> int | None:
    """Line number (from 1) of record ``index`` of a JSON-lines file (blank lines hold no record)."""
    with Path(path).open(encoding="utf-8") as f:
        seen = -1
        for lineno, line in enumerate(f, 1):
            if line.strip():
                seen += 1
                if seen == index:
                    return lineno
    return None


def find_split_file(data_dir: str | Path, stems: list[str]) -> Path:
    """The first `<data_dir>/<stem><ext>` that exists, trying stems in order and `EXTENSIONS` for each."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data folder {str(data_dir)!r} does not exist")
    tried = []
    for stem in stems:
        for ext in EXTENSIONS:
            cand = data_dir / f"{stem}{ext}"
            tried.append(cand.name)
            if cand.is_file():
                return cand
    raise FileNotFoundError(f"no dataset file in {str(data_dir)!r}: tried {tried}")


def load_hub_split(hub_id: str, config: str | None, split: str) -> list[dict]:
    """Records of one split from the Hugging Face hub (needs `datasets` and a network connection)."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            f"loading {hub_id!r} from the hub needs the 'datasets' package (pip install 'ssmtune[data]'); "
            "offline, pass data_dir with local files instead"
        ) from e
    ds = datasets.load_dataset(hub_id, config, split=split)
    return [dict(r) for r in ds]
