"""The serve benchmark's correctness gate: a batched row that differs from the single-row reference counts as a
tie only when the reference's own logits could not tell the two tokens apart."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from ssmtune.bench import serve as bench_serve


class FakeModel:
    """Next-token logits: tokens 3 and 5 tied at the top (in bf16), 7 well below."""

    def __init__(self) -> None:
        self.adapters: list[str] = []

    def set_adapter(self, name: str) -> None:
        self.adapters.append(name)

    def __call__(self, ids: torch.Tensor) -> SimpleNamespace:
        logits = torch.zeros(ids.shape[0], ids.shape[1], 8, dtype=torch.bfloat16)
        logits[..., 3] = 4.0
        logits[..., 5] = 4.0 + 2**-7  # one bf16 ulp at 4.0 is 2**-5: rounds to 4.0
        logits[..., 7] = 1.0
        return SimpleNamespace(logits=logits)


def test_count_ties_counts_only_ties_at_the_first_difference() -> None:
    model = FakeModel()
    prompts = [torch.tensor([1, 2])] * 4
    names = ["a", "b", "c", "d"]
    reference = [[3, 3], [3, 3], [3, 3], [3, 3]]
    outs = [[3, 3], [5, 1], [7, 3], [3, 5]]  # same, tie then anything, clear loss, tie at the second token
    assert bench_serve.count_ties(model, prompts, names, outs, reference) == 2
    assert model.adapters == ["b", "c", "d"]  # each checked row under its own adapter
    assert bench_serve.count_ties(model, prompts, names, [[3], [3, 3], [3, 3], [3, 3]], reference) == 0  # a prefix
