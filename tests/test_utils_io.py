"""ssmtune.utils.io: the one atomic-write helper every writer uses."""

import hashlib
import os
from pathlib import Path

import pytest

from ssmtune.utils.io import atomic_write, atomic_write_files, atomic_write_text, file_sha256, replace_dir


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
