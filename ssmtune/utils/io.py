"""Atomic file and folder writes: a reader (or a run resumed after a crash) sees the old content or the new one whole.

Every writer of ssmtune goes through here: adapters, models, checkpoints, run logs, results JSON and plots. Files are
written next to their destination, flushed to disk, then renamed over it with ``os.replace`` (atomic on POSIX and
Windows when both paths are on one file system).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """``write(tmp_path)`` writes the content to a temporary file in the same folder, which then replaces ``path``.

    The temporary file is removed if ``write`` fails, and ``path`` keeps its old content."""
    atomic_write_files({path: write})


def atomic_write_files(writes: dict[str | os.PathLike, Callable[[str], object]]) -> None:
    """``atomic_write`` for files that belong together: every ``write(tmp_path)`` runs first, then the renames that
    publish them follow back to back, in order. If any write fails (or is interrupted), none of the files changes;
    only a crash between two renames can publish some of them (readers that must notice record a digest)."""
    staged: list[tuple[str, Path]] = []
    try:
        for path, write in writes.items():
            path = Path(path)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.close(fd)
            staged.append((tmp, path))
            write(tmp)
            fsync_file(tmp)
            # mkstemp makes the file private (0600): give it the mode a plain open() would (umask's), or the old file's
            os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask())
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise


def file_sha256(path: str | os.PathLike) -> str:
    """The hex sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Publish the fully written folder ``tmp`` as ``final``, replacing an existing ``final`` as a whole."""
    tmp, final = Path(tmp), Path(final)
    for f in tmp.rglob("*"):
        if f.is_file():
            fsync_file(f)
    fsync_dir(tmp)
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)
    return final


def finite_json(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that always writes valid JSON: a NaN or infinite float becomes ``null``, and a top-level
    ``non_finite`` mapping (for a dict) says where and what it was, e.g. ``{"loss": "nan"}``."""
    found: dict[str, str] = {}

    def clean(x: Any, where: str) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            found[where or "value"] = str(x)
            return None
        if isinstance(x, dict):
            return {k: clean(v, f"{where}.{k}" if where else str(k)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v, f"{where}[{i}]") for i, v in enumerate(x)]
        return x

    out = clean(obj, "")
    if found and isinstance(out, dict):
        out["non_finite"] = found
    return json.dumps(out, allow_nan=False, **kwargs)
