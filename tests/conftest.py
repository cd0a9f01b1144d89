"""Shared test fixtures: a fixed seed, and NaN-poisoned ``torch.empty`` for allocations made inside ``ssmtune.ops``."""

from __future__ import annotations

import functools
import random
import sys

import pytest
import torch
import torch.utils._device


def _nan_poisoned(alloc):
    """Wrap torch.empty/empty_like so that floating tensors allocated from ``ssmtune.ops.*`` start as NaN."""

    @functools.wraps(alloc)
    def wrapper(*args, **kwargs):
        t = alloc(*args, **kwargs)
        # only the caller's module name is inspected, so calls from elsewhere stay cheap and untouched
        if sys._getframe(1).f_globals.get("__name__", "").startswith("ssmtune.ops") and t.is_floating_point():
            t.fill_(float("nan"))
        return t

    return wrapper


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    torch.manual_seed(0)


# torch.device("meta") recognises factory functions by identity from a set built on first use: build it now, from the
# real torch.empty, so that the wrapper below does not defeat meta-device model construction.
torch.utils._device._device_constructors()


@pytest.fixture(autouse=True)
def _poison_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "empty", _nan_poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", _nan_poisoned(torch.empty_like))
