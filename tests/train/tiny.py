"""A tiny stand-in LM for the trainer tests: the trainer only needs ``model(input_ids, attention_mask=...).logits``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

VOCAB = 12


@dataclass
class Out:
    logits: torch.Tensor


class TinyLM(nn.Module):
    """Embedding → causal running mean → linear head, frozen; a trainable adapter adds a bias to the hidden states."""

    def __init__(self, d: int = 8, *, full: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, VOCAB, bias=False)
        self.adapter = nn.Parameter(torch.zeros(d))
        self.adapter_scale = nn.Parameter(torch.ones(d))
        if not full:
            for name, p in self.named_parameters():
                p.requires_grad_(name.startswith("adapter"))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, labels=None) -> Out:
        h = self.embed(input_ids)  # [B, L, d]
        counts = torch.arange(1, h.shape[1] + 1, device=h.device, dtype=h.dtype)[None, :, None]
        h = torch.cumsum(h, dim=1) / counts
        h = torch.tanh(self.mix(h)) * self.adapter_scale + self.adapter
        return Out(logits=self.head(h))

    def save_adapter(self, path: str | Path) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        tensors = {n: p.detach().contiguous() for n, p in self.named_parameters() if p.requires_grad}
        save_file(tensors, str(Path(path) / "adapter_model.safetensors"))


def make_dataset(n: int = 24, seed: int = 0) -> list[dict[str, list[int]]]:
    """Sequences of varying length whose last 1-3 tokens are targets: the target repeats the first token."""
    g = torch.Generator().manual_seed(seed)
    data = []
    for i in range(n):
        length = 4 + i % 4
        prompt = torch.randint(1, VOCAB, (length,), generator=g).tolist()
        n_target = 1 + i % 3
        target = [prompt[0]] * n_target
        data.append({"input_ids": prompt + target, "n_target": n_target})
    return data


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    mask = torch.zeros(len(examples), width, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        mask[i, :n] = 1
        labels[i, n - e["n_target"] : n] = ids[i, n - e["n_target"] : n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
