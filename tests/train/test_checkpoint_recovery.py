"""Resuming past damaged checkpoints: an unreadable newest one is skipped with a warning, an unsafe pickle is refused,
and the leftovers of interrupted writes are removed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from ssmtune.train.checkpoint import (
    clean_interrupted_writes,
    latest_readable_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)


def _two(tmp_path: Path) -> tuple[Path, Path]:
    model = nn.Linear(3, 2)
    a = save_checkpoint(tmp_path, step=1, model=model, state={"best_value": None})
    b = save_checkpoint(tmp_path, step=2, model=model, state={"best_value": None})
    return a, b


@pytest.mark.parametrize("damage", ["truncated_state", "truncated_weights", "missing_state"])
def test_an_unreadable_newest_checkpoint_is_skipped_with_a_warning(tmp_path, damage):
    older, newest = _two(tmp_path)
    if damage == "truncated_state":
        data = (newest / "state.pt").read_bytes()
        (newest / "state.pt").write_bytes(data[: len(data) // 3])
    elif damage == "truncated_weights":
        (newest / "trainable.safetensors").write_bytes(b"\x08\x00")
    else:
        (newest / "state.pt").unlink()
    with pytest.warns(UserWarning, match=rf"checkpoint '{newest}' cannot be read .*previous complete checkpoint"):
        assert latest_readable_checkpoint(tmp_path) == older
    assert latest_readable_checkpoint(tmp_path, warn=False) == older
    assert load_checkpoint(older, nn.Linear(3, 2))["step"] == 1


def test_an_unsafe_pickle_is_refused_not_skipped(tmp_path):
    _, newest = _two(tmp_path)
    torch.save({"step": 2, "where": Path("x")}, newest / "state.pt")  # a class weights_only does not allow
    with pytest.raises(ValueError, match=r"refusing to load .*state\.pt.*unsafe pickle"):
        latest_readable_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="unsafe pickle"):
        load_checkpoint(newest, nn.Linear(3, 2))


def test_a_checkpoint_interrupted_between_its_two_files_is_never_listed(tmp_path, monkeypatch):
    import ssmtune.train.checkpoint as ckpt

    older, _ = _two(tmp_path)

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.torch, "save", ctrl_c)  # trainable.safetensors is written, state.pt is not
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, step=3, model=nn.Linear(3, 2), state={"best_value": None})
    monkeypatch.undo()
    assert (tmp_path / f".tmp-step-00000003-{os.getpid()}" / "trainable.safetensors").is_file()
    assert latest_readable_checkpoint(tmp_path).name == "step-00000002"
    assert load_checkpoint(older, nn.Linear(3, 2))["step"] == 1


def test_leftovers_of_interrupted_writes_are_removed(tmp_path):
    (tmp_path / ".tmp-best-123").mkdir()
    (tmp_path / ".tmp-best-123" / "adapter_model.safetensors").write_bytes(b"half")
    (tmp_path / ".tmp-results.json-123").write_text("{")
    mine = tmp_path / f".tmp-final-{os.getpid()}"
    mine.mkdir()
    (tmp_path / "results.json").write_text("{}")
    clean_interrupted_writes(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, "results.json"])


def test_files_staged_by_a_killed_atomic_write_are_removed_and_never_listed(tmp_path):
    """``atomic_write_files`` stages ``.<name>.<random>.tmp``: a run killed before the rename leaves them in the run
    folder (results, logs) or the checkpoint root; the next run removes them, and listing never takes one for a
    checkpoint."""
    older, newest = _two(tmp_path)
    staged = [tmp_path / ".results.json.k3x9a0_q.tmp", tmp_path / ".step-00000009.0_zz91ab.tmp"]
    for p in staged:
        p.write_text("{")
    (tmp_path / ".tmp-step-00000009-123").mkdir()
    (tmp_path / "notes.tmp").write_text("the user's")
    assert list_checkpoints(tmp_path) == [older, newest]
    assert latest_readable_checkpoint(tmp_path) == newest
    clean_interrupted_writes(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.tmp", older.name, newest.name]
