from __future__ import annotations

import torch
from torch import nn

from ...core.inject import adapter_key, add_input_hook
from ...models.hooks import InputHook
from .config import PromptTuningConfig


class PromptEmbedding(InputHook):
    """k trainable embeddings [k, d_model] (fp32) prepended to every row."""

    def __init__(self, init: torch.Tensor) -> None:
        super().__init__()
        self.prompt = nn.Parameter(init.detach().float().clone())  # [k, d_model]

    @property
    def num_added(self) -> int:
        return self.prompt.shape[0] if getattr(self, "active", True) else 0

    def forward(
        self, embeds: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        if not getattr(self, "active", True):
            return embeds, attention_mask, labels
        batch, k = embeds.shape[0], self.prompt.shape[0]
        prompt = self.prompt.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)  # [B, k, d_model]
        embeds = torch.cat([prompt, embeds], dim=1)  # [B, k+L, d_model]
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(batch, k), attention_mask], dim=1)
        if labels is not None:
            labels = torch.cat([labels.new_full((batch, k), -100), labels], dim=1)
        return embeds, attention_mask, labels


def inject(model: nn.Module, config: PromptTuningConfig, *, adapter_name: str) -> dict[str, nn.Module]:
    if not hasattr(model, "input_hooks"):
        raise ValueError(
            f"PromptTuningConfig needs an ssmtune Mamba / Mamba-2 model (its input hooks); {type(model).__name__} "
            "takes the state methods, prefix, LoRA / DoRA, BitFit and partial / full fine-tuning"
        )
    emb = model.backbone.embeddings.weight  # [V, d_model]
    k = config.num_virtual_tokens
    if config.init == "vocab":
        vocab = getattr(model.config, "vocab_size", emb.shape[0])
        ids = torch.randint(0, vocab, (k,))
        init = emb.detach()[ids.to(emb.device)]
    else:
        init = torch.randn(k, emb.shape[1], device=emb.device) * config.init_std
    hook = PromptEmbedding(init)
    return {"prompt": add_input_hook(model, adapter_key(adapter_name, "prompt"), hook)}
