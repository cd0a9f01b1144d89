"""Generation for evaluation and for `ssmtune generate`: greedy or beam search through ``model.generate``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def complete(
    model: nn.Module,
    tokenizer,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int = 64,
    num_beams: int = 1,
    min_new_tokens: int = 0,
    length_penalty: float = 1.0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    cuda_graph: bool | None = None,
) -> str:
    """Decode the continuation of one prompt (token ids) and return it as text, stopping at EOS. ``cuda_graph``
    (ssmtune's own models on CUDA): None = the library default (graphed where supported), True = graphed, False =
    eager steps."""
    if len(prompt_ids) == 0:
        raise ValueError("the prompt is empty")
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=_device(model))  # [1, L]
    kwargs = {"do_sample": do_sample, "temperature": temperature, "generator": generator} if do_sample else {}
    if top_p is not None:
        kwargs["top_p"] = top_p
    if hasattr(getattr(model, "base_model", model), "backbone"):
        # ssmtune's own models only: a transformers hybrid's generate has no such option
        kwargs["cuda_graph"] = cuda_graph if ids.is_cuda else False
    out = model.generate(
        ids,
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        min_new_tokens=min_new_tokens,
        length_penalty=length_penalty,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )
    new = out[0, ids.shape[1] :].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    return tokenizer.decode(new)


def generate_text(model: nn.Module, tokenizer, prompt: str, **kwargs) -> str:
    """The completion of a text prompt (see :func:`complete` for the options)."""
    return complete(model, tokenizer, tokenizer.encode(prompt), **kwargs)
