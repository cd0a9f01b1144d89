"""Generation for evaluation and for `ssmtune generate`: greedy or beam search through ``model.generate``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ssmtune.models.generate import left_pad
from ssmtune.models.hybrid_decode import GenerateWithGraph


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def complete(model: nn.Module, tokenizer, prompt_ids: Sequence[int], **options) -> str:
    """Decode the continuation of one prompt (token ids) and return it as text, stopping at EOS. The options are
    those of :func:`complete_batch`."""
    return complete_batch(model, tokenizer, [prompt_ids], **options)[0]


@torch.no_grad()
def complete_batch(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    batch_size: int = 1,
    max_new_tokens: int = 64,
    num_beams: int = 1,
    min_new_tokens: int = 0,
    length_penalty: float = 1.0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    cuda_graph: bool | None = None,
) -> list[str]:
    """The continuations of ``prompts`` (token ids each) as text, in order, each stopped at its first EOS.

    ``batch_size`` prompts go through one ``generate`` call, left-padded with an attention mask (prompts of similar
    lengths together); ``generate`` gives every row what it would get alone (its prefill skips the pads, its beams
    are the row's own), so batching changes the speed, not the method (float rounding aside: GEMMs of another batch
    size may round differently). ``cuda_graph`` (ssmtune's own models on CUDA): None = the library default (graphed
    where supported), True = graphed, False = eager steps."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty")
    kwargs = {"do_sample": do_sample, "temperature": temperature, "generator": generator} if do_sample else {}
    if top_p is not None:
        kwargs["top_p"] = top_p
    device = _device(model)
    base = getattr(model, "base_model", model)
    if hasattr(base, "backbone") or isinstance(base.__dict__.get("generate"), GenerateWithGraph):
        # ssmtune's Mamba models and the swapped hybrids; another model's generate has no such option
        kwargs["cuda_graph"] = cuda_graph if device.type == "cuda" else False
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        ids, mask = left_pad([prompts[i] for i in rows], device)
        width = ids.shape[1]
        masked = {"attention_mask": mask} if len(rows) > 1 else {}
        out = model.generate(
            ids,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            min_new_tokens=min_new_tokens,
            length_penalty=length_penalty,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **kwargs,
            **masked,
        )
        for r, i in enumerate(rows):
            new = out[r, width:].tolist()
            if tokenizer.eos_token_id in new:
                new = new[: new.index(tokenizer.eos_token_id)]
            texts[i] = tokenizer.decode(new)
    return texts


def generate_text(model: nn.Module, tokenizer, prompt: str, **kwargs) -> str:
    """The completion of a text prompt (see :func:`complete` for the options)."""
    return complete(model, tokenizer, tokenizer.encode(prompt), **kwargs)
