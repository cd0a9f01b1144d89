"""Atomic file and folder writes: a reader (or a run resumed after a crash) sees the old content or the new one whole.

Every writer of ssmtune goes through here: adapters, models, checkpoints, run logs, results JSON and plots. Files are
written next to their destination, flushed to disk, then renamed over it with ``os.replace`` (atomic on POSIX and
Windows when both paths are on one file system).

A file is staged as ``.<name>.<8 random characters>.tmp`` (``STAGING``). A process killed before its renames leaves
those behind; the first write of the same name in a later process removes them (``remove_stale_staging``: a scan of
the folder, once per process and name rather than at every write), and so does a training run starting in its run
folder. A staged file is stale when no live writer holds it: the writer keeps an exclusive
``flock`` on it until its renames are done, so a staged file whose lock can be taken belongs to a dead process
(where locks cannot be taken, Windows or some network file systems, one older than ``STALE_AFTER_S`` counts as
stale). Readers open fixed names and never see staged files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

STAGING = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")
"""The name of a file ``atomic_write_files`` stages: ``.<final name>.<mkstemp's 8 random characters>.tmp``."""
STALE_AFTER_S = 3600.0
"""Where a staged file cannot be locked, the age past which it counts as left by a dead writer (no save stages a file
for an hour)."""
# staged files this process is writing now: never stale, even where a lock taken twice in one process does not conflict
_live: set[str] = set()
_live_lock = threading.Lock()
# (folder, final name) pairs this process has swept for stale staged files: later writes of the name skip the scan
_swept: set[tuple[str, str]] = set()


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
    only a crash between two renames can publish some of them (readers that must notice record a digest). Files that
    an interrupted write of the same names staged and left behind are removed first, at this process's first write of
    each name."""
    paths = [Path(p) for p in writes]
    fresh: dict[Path, set[str]] = {}
    with _live_lock:
        for path in paths:
            key = (os.path.abspath(path.parent), path.name)
            if key not in _swept:
                _swept.add(key)
                fresh.setdefault(path.parent, set()).add(path.name)
    for folder, names in fresh.items():
        remove_stale_staging(folder, names)
    staged: list[tuple[str, Path]] = []
    locks: list[int] = []
    try:
        for path, write in zip(paths, writes.values()):
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            with _live_lock:
                _live.add(os.path.abspath(tmp))
            staged.append((tmp, path))
            if _lock(fd):  # held until the renames are done: the mark of a live writer
                locks.append(fd)
            else:
                os.close(fd)
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
    finally:
        for fd in locks:
            os.close(fd)
        with _live_lock:
            _live.difference_update(os.path.abspath(tmp) for tmp, _ in staged)


def _lock(fd: int) -> bool | None:
    """Take an exclusive ``flock`` on ``fd`` without waiting: True; False when another holder has it; None where locks
    cannot be taken (Windows, some network file systems)."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


def remove_stale_staging(folder: str | os.PathLike, names: Iterable[str] | None = None) -> list[Path]:
    """Remove the files in ``folder`` that an interrupted ``atomic_write_files`` staged and left (``STAGING``), for
    the final ``names`` only (None: any). Files of live writers, and anything not named like a staged file, stay.
    Returns the removed paths."""
    folder = Path(folder)
    wanted = None if names is None else set(names)
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:  # no folder (yet), or not ours to list
        return removed
    for entry in entries:
        m = STAGING.match(entry.name)
        if m is None or (wanted is not None and m["name"] not in wanted):
            continue
        with _live_lock:
            if os.path.abspath(entry.path) in _live:
                continue
        if not entry.is_file(follow_symlinks=False):
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY)
        except OSError:  # removed meanwhile, or another user's
            continue
        try:
            got = _lock(fd)
            # locked here: its writer is gone; held: a live writer's; no locks on this file system: only age tells
            stale = got or (got is None and time.time() - os.fstat(fd).st_mtime > STALE_AFTER_S)
        except OSError:
            stale = False
        finally:
            os.close(fd)  # before the unlink, which Windows refuses on an open file (no writer reopens a staged file)
        if stale:
            try:
                os.unlink(entry.path)
            except OSError:  # removed meanwhile, or a folder we may not write to
                continue
            removed.append(Path(entry.path))
    return removed


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
