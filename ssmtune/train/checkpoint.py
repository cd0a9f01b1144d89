"""Training checkpoints, written atomically.

A checkpoint is a folder ``<root>/step-00000040/`` holding

- ``trainable.safetensors``: every parameter with ``requires_grad`` (the adapter, or the whole model for full FT);
- ``state.pt``: optimizer, scheduler, RNG states (python, numpy, torch, cuda), sampler position, step, best metric.

It is first written to ``<root>/.tmp-step-00000040-<pid>/`` and then renamed with ``os.replace``, so a reader (or a run
killed with SIGKILL mid-write) sees either the whole folder or nothing. Only the last ``keep_last`` are kept.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ssmtune.utils.io import remove_stale_staging, replace_dir

_STEP_DIR = re.compile(r"^step-(\d{8})$")


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name, detached and contiguous (safetensors refuses views), plus the buffers of
    the modules that own them (e.g. SDLoRA's selected indices, which a resumed run must not recompute)."""
    out = {n: p.detach().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}
    for prefix, m in model.named_modules():
        if any(p.requires_grad for p in m.parameters(recurse=False)):
            for b, t in m.named_buffers(recurse=False):
                out[f"{prefix}.{b}" if prefix else b] = t.detach().contiguous().clone()
    return out


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": _numpy_state_to_plain(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_to_tuple(state["python"]))
    np.random.set_state(_plain_to_numpy_state(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state_to_plain(state: tuple) -> dict[str, Any]:
    # torch.load(weights_only=True) refuses numpy arrays, so the key array travels as a tensor.
    kind, keys, pos, has_gauss, gauss = state
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}  # fmt: skip


def _plain_to_numpy_state(d: dict[str, Any]) -> tuple:
    return d["kind"], d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"], d["gauss"]


def _to_tuple(x: Any) -> Any:
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def latest_readable_checkpoint(root: str | Path, *, warn: bool = True) -> Path | None:
    """The newest checkpoint whose files open; an unreadable newer one (a damaged disk, a copy cut short) is skipped
    with a warning that names it, so a rerun resumes from the previous complete one. A ``state.pt`` that holds
    anything but tensors and plain data is refused (ValueError), not skipped."""
    for path in reversed(list_checkpoints(root)):
        try:
            read_state(path, mmap=True)
            with safe_open(str(path / "trainable.safetensors"), "pt") as f:
                f.keys()
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001  (any failure to read is a damaged checkpoint)
            if not warn:
                continue
            warnings.warn(
                f"checkpoint {str(path)!r} cannot be read ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
                "resuming from the previous complete checkpoint",
                stacklevel=2,
            )
            continue
        return path
    return None


def read_state(path: str | Path, *, mmap: bool = False) -> dict[str, Any]:
    """``<checkpoint>/state.pt``, loaded with ``weights_only=True``: a file holding other objects (code that would
    run while unpickling) raises ValueError."""
    file = Path(path) / "state.pt"
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise
        raise ValueError(
            f"refusing to load {str(file)!r}: it holds objects other than tensors and plain data (an unsafe pickle, "
            "which could run code); delete the checkpoint folder if it is not yours"
        ) from None


def clean_interrupted_writes(folder: str | Path) -> None:
    """Remove the temporary files and folders (``.tmp-best-<pid>``, ``.tmp-results.json-<pid>``, files staged by
    ``atomic_write_files`` such as ``.results.json.k3x9a0_q.tmp``) that a run killed in the middle of an atomic write
    left in ``folder``; this process's own are kept, and so are those of a live writer."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    remove_stale_staging(folder)
    for p in folder.iterdir():
        if p.name.startswith(".tmp-") and not p.name.endswith(f"-{os.getpid()}"):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def save_checkpoint(
    root: str | Path,
    *,
    step: int,
    model: nn.Module,
    state: dict[str, Any],
    keep_last: int = 2,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically under ``root`` and prune all but the last ``keep_last``.

    ``state`` holds everything except the weights (optimizer, scheduler, trainer and sampler state); the RNG states
    are added here. ``tensors`` replaces ``trainable_state_dict(model)`` when the weights were gathered elsewhere
    (FSDP: the full trainable tensors on rank 0).
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(trainable_state_dict(model) if tensors is None else tensors, str(tmp / "trainable.safetensors"))
    torch.save({**state, "step": step, "rng": rng_state()}, tmp / "state.pt")
    # file contents reach the disk before the rename publishes them (a power loss must not leave empty files);
    # the same step again (a resumed run that re-saves) replaces the old folder as a whole
    replace_dir(tmp, final)
    for stale in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(stale, ignore_errors=True)
    # Leftovers of runs killed mid-write.
    for p in root.iterdir():
        if p.name.startswith((".tmp-step-", ".old-step-")) and not p.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(p, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, model: nn.Module) -> dict[str, Any]:
    """Load the trainable weights into ``model`` (in place) and return the saved state (RNG not yet applied)."""
    path = Path(path)
    tensors = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    missing = [n for n, p in params.items() if p.requires_grad and n not in tensors]
    unknown = [n for n in tensors if n not in params and n not in buffers]
    if missing or unknown:
        raise ValueError(
            f"checkpoint {str(path)!r} does not match the model: missing {missing[:5]}, unexpected {unknown[:5]} "
            "(was it written with another method or base model?)"
        )
    with torch.no_grad():
        for n, t in tensors.items():
            (params[n] if n in params else buffers[n]).copy_(t)
    return read_state(path)
