"""ssmtune.utils.io: the one atomic-write helper every writer uses."""

import hashlib
import os
import time
from pathlib import Path

import pytest

from ssmtune.utils import io
from ssmtune.utils.io import (
    STAGING,
    atomic_write,
    atomic_write_files,
    atomic_write_text,
    file_sha256,
    remove_stale_staging,
    replace_dir,
)

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


def _stale(folder: Path, name: str, tag: str = "k3x9a0_q") -> Path:
    """A file staged for ``name`` by a writer killed before its rename."""
    path = folder / f".{name}.{tag}.tmp"
    path.write_bytes(b"half")
    return path


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "results.json"
    atomic_write_text(path, "old\n")

    def boom(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, boom)
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    atomic_write_text(path, "new ✓\n")
    assert path.read_text(encoding="utf-8") == "new ✓\n"


def test_files_written_together_change_together(tmp_path):
    a, b = tmp_path / "weights.bin", tmp_path / "config.json"
    atomic_write_files({a: lambda p: Path(p).write_bytes(b"old"), b: lambda p: Path(p).write_text("old")})
    staged = []

    def interrupted(tmp: str) -> None:
        staged.extend(p.name for p in tmp_path.glob(".weights.bin.*.tmp"))  # the first file is staged, not renamed
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write_files({a: lambda p: Path(p).write_bytes(b"new"), b: interrupted})
    assert len(staged) == 1 and a.read_bytes() == b"old" and b.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "weights.bin"]
    atomic_write_files({a: lambda p: Path(p).write_bytes(b"new"), b: lambda p: Path(p).write_text("new")})
    assert a.read_bytes() == b"new" and b.read_text() == "new"
    assert file_sha256(a) == hashlib.sha256(b"new").hexdigest()


def test_replace_dir_swaps_the_whole_folder(tmp_path):
    final, tmp = tmp_path / "final", tmp_path / ".tmp-final"
    final.mkdir()
    (final / "stale.bin").write_text("x")
    tmp.mkdir()
    (tmp / "adapter_model.safetensors").write_text("y")
    assert replace_dir(tmp, final) == final
    assert [p.name for p in final.iterdir()] == ["adapter_model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_written_files_get_the_umask_mode_or_keep_the_old_one(tmp_path):
    old = os.umask(0o022)
    try:
        path = tmp_path / "a.json"
        atomic_write_text(path, "{}")
        assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600: other users can read an adapter
        path.chmod(0o600)
        atomic_write_text(path, "[]")
        assert path.stat().st_mode & 0o777 == 0o600 and path.read_text() == "[]"
    finally:
        os.umask(old)


def test_a_later_process_first_write_removes_what_a_killed_writer_staged(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    atomic_write_text(path, "old")
    stale = [_stale(tmp_path, "config.json"), _stale(tmp_path, "config.json", "0_zz91ab")]
    # not named like our staged files, or staged for a name this write does not touch: left alone
    kept = [tmp_path / "config.json.tmp", tmp_path / ".config.json.notes.tmp", tmp_path / ".config.json.k3x9a0_q.bak"]
    for p in kept:
        p.write_text("the user's")
    kept.append(_stale(tmp_path, "other.json"))
    assert all(STAGING.match(p.name) for p in stale) and not any(STAGING.match(p.name) for p in kept[:3])
    atomic_write_text(path, "again")  # this process swept the name at its first write: no scan of the folder now
    assert path.read_text() == "again" and all(p.exists() for p in stale)
    monkeypatch.setattr(io, "_swept", set())  # as in a later process
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept)
    assert remove_stale_staging(tmp_path) == [kept[-1]]  # any name


@pytest.mark.skipif(fcntl is None, reason="flock")
def test_files_staged_by_live_writers_stay(tmp_path):
    path = tmp_path / "w.bin"
    other = _stale(tmp_path, "w.bin", "livewrit")  # another process's, locked as its live writer holds it
    fd = os.open(other, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    seen = []

    def write(tmp: str) -> None:
        # a second writer of the same name (another thread) while this one is staged: this one's file stays
        seen.append(remove_stale_staging(tmp_path, ["w.bin"]))
        Path(tmp).write_bytes(b"x")

    try:
        atomic_write(path, write)
    finally:
        os.close(fd)
    assert seen == [[]] and other.exists() and path.read_bytes() == b"x"
    assert remove_stale_staging(tmp_path) == [other]  # its writer is gone now


def test_without_locks_a_staged_file_is_stale_by_age(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "fcntl", None)  # as on Windows
    young, old = _stale(tmp_path, "a.json"), _stale(tmp_path, "a.json", "0ld0ld00")
    past = time.time() - io.STALE_AFTER_S - 60
    os.utime(old, (past, past))
    atomic_write_text(tmp_path / "a.json", "{}")
    assert young.exists() and not old.exists()
