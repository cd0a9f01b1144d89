"""Recurrent generation: prefill once with the cache, then one token per step (L = 1).

Greedy, sampling (temperature, top-k, top-p) and length-normalised beam search. Rows of different prompt lengths
(``attention_mask``, either padding side) are prefilled on their real tokens only, in one packed forward
(``cu_seqlens``; one by one under Prompt Tuning), and then decoded together, so every row gets what it would get alone:
no pad token ever enters a state, and initial states of state hooks act at each row's first real token
(docs/methods.md §4.3).

With ``cuda_graph=True`` decoding steps run through ``decode.GraphedDecoder``: on CUDA the one-token step is captured
once per batch-size bucket and replayed; prefill, sampling and beam bookkeeping stay eager. ``None`` (the default)
follows ``decode.GRAPHED_BY_DEFAULT``. When the
model cannot decode from a graph (``decode.unsupported_reason``) a one-line warning says why and decoding is eager.

``state_dtype`` sets the dtype the cache keeps the SSM states in while decoding (``cache.decode_state_dtype``): None,
the default, is the model's dtype where it is bf16 / fp16 (what mamba_ssm and transformers keep: half the states'
memory traffic per step, the step still computing in fp32), else fp32; torch.float32 is the exact continuation of the
training scan's fp32 states. For ssmtune's own Mamba models only: a transformers hybrid keeps transformers' cache.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from .cache import InferenceCache, decode_state_dtype
from .decode import GRAPHED_BY_DEFAULT, decoder_for, unsupported_reason


def _eos_list(eos_token_id: int | list[int] | None) -> list[int]:
    if eos_token_id is None:
        return []
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


def left_pad(prompts: list[list[int]], device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, longest] left-padded with 0, and their attention mask (1 on the real tokens): every row's last
    prompt token in the last column. ``generate`` never reads the pads (the prefill skips them, attention masks them)."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def prefill(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    state_dtype: torch.dtype | None = None,
) -> tuple[InferenceCache, torch.Tensor]:
    """Run the prompts through the model with a fresh cache (SSM states kept in ``state_dtype``, None: the model's
    dtype where 16-bit, else fp32, ``cache.decode_state_dtype``; the scans' fp32 final states are rounded into it).
    Returns the cache and the logits [B, V] at each row's last real token. Prompts of different lengths (a mask not
    all ones) are prefilled on their real tokens only: in one packed forward (``cu_seqlens``), per-row adapter routing
    included (each sequence with its row's adapter), or one by one where packing does not apply (an active input
    hook: Prompt Tuning)."""
    n_layer = len(model.backbone.layers)
    state_dtype = decode_state_dtype(model, state_dtype)
    if attention_mask is None or bool(attention_mask.bool().all()):
        cache = InferenceCache(n_layer, state_dtype)
        logits = model(input_ids, cache=cache).logits[:, -1]
        return cache, logits
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
    if _packable(model):
        mask = attention_mask.bool()
        lengths = mask.sum(1)
        if bool((lengths == 0).any()):
            raise ValueError("attention_mask has a row with no real token")
        with torch.inference_mode(False):  # a tensor with a version counter: the ops read its boundaries once
            cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        cache = InferenceCache(n_layer, state_dtype)
        logits = model(input_ids[mask][None], cache=cache, cu_seqlens=cu).logits[0, cu[1:].long() - 1]
        return cache, logits
    caches, logits = [], []
    for row, mask in zip(input_ids, attention_mask.bool()):
        ids = row[mask]
        if ids.numel() == 0:
            raise ValueError("attention_mask has a row with no real token")
        cache = InferenceCache(n_layer, state_dtype)
        logits.append(model(ids[None], cache=cache).logits[:, -1])
        caches.append(cache)
    return InferenceCache.cat(caches), torch.cat(logits, 0)


def _packable(model) -> bool:
    """Whether ``model`` can prefill a packed batch: no active input hook (Prompt Tuning edits each row's embeddings
    and mask, which a packed row of several sequences cannot take). Per-row routing packs: the state hooks give one
    state per sequence and LoRA/DoRA deltas route each token with its sequence (``core/routing.py``)."""
    return not any(getattr(h, "active", True) for h in getattr(model, "input_hooks", {}).values())


class EagerStep:
    """The decode step without a graph: the model's forward on one token per row, the cache reordered by copy."""

    def __init__(self, model, cache: InferenceCache) -> None:
        self.model, self.cache = model, cache

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens[:, None], cache=self.cache).logits[:, -1]

    def reorder(self, index: torch.Tensor) -> None:
        self.cache.reorder(index)


def decode_step(model, cache: InferenceCache, cuda_graph: bool | None = None, rows: torch.Tensor | None = None):
    """The step object for decoding from a prefilled ``cache``: ``step(tokens [B]) -> logits [B, V]`` and
    ``reorder(index)``. ``cuda_graph``: None = a graphed decoder on CUDA when ``GRAPHED_BY_DEFAULT`` is on and the
    model supports it, else eager;
    False = eager; True = the static decoder (captured on CUDA, run eagerly on other devices; ValueError when the
    model does not support it). ``rows``: the routed row of each cache row (beams), for a routed model."""
    if cuda_graph is False or (cuda_graph is None and not GRAPHED_BY_DEFAULT):
        return EagerStep(model, cache)
    first = cache.layers[0] if len(cache.layers) else None
    on_cuda = first is not None and first.conv_state is not None and first.conv_state.is_cuda
    if cuda_graph is None and not on_cuda:
        return EagerStep(model, cache)
    reason = unsupported_reason(model, capture=on_cuda)
    if reason is not None:
        if cuda_graph:
            raise ValueError(f"cuda_graph=True is not supported here: {reason}")
        warnings.warn(f"graphed decoding off, decoding eagerly: {reason}", stacklevel=3)
        return EagerStep(model, cache)
    decoder = decoder_for(model, cache, capture=on_cuda)
    decoder.start(cache, getattr(model, "routing", None), rows)
    return decoder


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest set with probability >= top_p."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens before it already reach top_p; the first one always stays
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    min_new_tokens: int = 0,
    generator: torch.Generator | None = None,
    cuda_graph: bool | None = None,
    state_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` after ``input_ids`` [B, L]. Returns [B, L + new] (the prompts as given,
    then the new tokens; rows that stopped early are filled with ``pad_token_id``, or the first EOS id).
    Generation stops early when every row has produced an EOS. ``cuda_graph``: see ``decode_step`` (None: the
    library default, ``decode.GRAPHED_BY_DEFAULT``; True: graphed; False: eager). ``state_dtype``: the dtype of the
    decode states (None: the model's dtype where 16-bit, else fp32; see the module docstring)."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if do_sample and num_beams > 1:
        raise ValueError(f"sampling with beam search is not supported (do_sample=True, num_beams={num_beams})")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    state_dtype = decode_state_dtype(model, state_dtype)
    eos = _eos_list(eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    if max_new_tokens == 0:
        return input_ids
    cache, logits = prefill(model, input_ids, attention_mask, state_dtype)
    if num_beams > 1:
        new = beam_search(
            model, cache, logits, max_new_tokens, num_beams, length_penalty, eos, pad, min_new_tokens, cuda_graph
        )
        return torch.cat([input_ids, new.to(input_ids.device)], dim=1)

    batch = input_ids.shape[0]
    eos_t = torch.tensor(eos, dtype=torch.long, device=logits.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=logits.device)
    stepper = decode_step(model, cache, cuda_graph) if max_new_tokens > 1 else None
    tokens = []
    for step in range(max_new_tokens):
        logits = logits.float()
        if step < min_new_tokens and eos:
            logits[:, eos] = float("-inf")
        if do_sample:
            probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=generator)[:, 0]
        else:
            nxt = logits.argmax(-1)
        if eos:
            nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
            finished |= torch.isin(nxt, eos_t)
        tokens.append(nxt)
        # without EOS ids no row finishes: no host sync per token
        if step == max_new_tokens - 1 or (eos and bool(finished.all())):
            break
        logits = stepper.step(nxt)
    return torch.cat([input_ids, torch.stack(tokens, 1).to(input_ids.device)], dim=1)


def beam_search(
    model,
    cache: InferenceCache,
    logits: torch.Tensor,
    max_new_tokens: int,
    num_beams: int,
    length_penalty: float = 1.0,
    eos: list[int] | None = None,
    pad: int = 0,
    min_new_tokens: int = 0,
    cuda_graph: bool | None = None,
) -> torch.Tensor:
    """Beam search from a prefilled cache and the next-token logits [B, V]. Returns the new tokens [B, T].

    Hypothesis score = sum of log-probabilities / (number of new tokens, EOS included) ** length_penalty. A row stops
    when it holds ``num_beams`` finished hypotheses and no running beam can beat the worst of them (HF's
    ``early_stopping=False`` rule). ``cuda_graph``: see ``decode_step``."""
    eos = eos or []
    batch, vocab = logits.shape
    k = num_beams
    device = logits.device
    expand = torch.arange(batch, device=device).repeat_interleave(k)
    cache.reorder(expand)
    stepper = decode_step(model, cache, cuda_graph, rows=expand) if max_new_tokens > 1 else None
    beam_scores = torch.zeros(batch, k, device=device)
    beam_scores[:, 1:] = float("-inf")  # the first step expands one beam per row
    logprobs = logits.float().log_softmax(-1).repeat_interleave(k, 0)  # [B*K, V]
    seqs = torch.zeros(batch * k, 0, dtype=torch.long, device=device)
    hyps: list[list[tuple[float, torch.Tensor]]] = [[] for _ in range(batch)]
    done = [False] * batch

    def add(b: int, score: float, tokens: torch.Tensor) -> None:
        hyps[b].append((score, tokens))
        hyps[b].sort(key=lambda h: -h[0])
        del hyps[b][k:]

    for step in range(max_new_tokens):
        if step < min_new_tokens and eos:
            logprobs[:, eos] = float("-inf")
        cand = (beam_scores.view(-1, 1) + logprobs).view(batch, k * vocab)
        # enough candidates that K of them are not EOS even if every EOS id ranks first
        top_scores, top_idx = cand.topk(min((len(eos) + 1) * k, k * vocab), dim=1)  # sorted
        # slots left unfilled (too few finite candidates) must never win: -inf, not 0
        next_scores = torch.full((batch, k), float("-inf"), device=device)
        next_tokens = torch.full((batch, k), pad, dtype=torch.long, device=device)
        next_src = torch.arange(batch * k, device=device).view(batch, k).clone()
        top_scores_l, top_idx_l = top_scores.tolist(), top_idx.tolist()
        for b in range(batch):
            if done[b]:
                continue
            j = 0
            for rank, (score, idx) in enumerate(zip(top_scores_l[b], top_idx_l[b])):
                src, tok = b * k + idx // vocab, idx % vocab
                if tok in eos:
                    if rank < k:
                        tokens = torch.cat([seqs[src], seqs.new_tensor([tok])])
                        add(b, score / (step + 1) ** length_penalty, tokens)
                else:
                    next_scores[b, j], next_tokens[b, j], next_src[b, j] = score, tok, src
                    j += 1
                if j == k:
                    break
            if len(hyps[b]) >= k:
                best_running = next_scores[b].max().item() / (step + 1) ** length_penalty
                done[b] = best_running <= hyps[b][-1][0]
        src_flat = next_src.view(-1)
        seqs = torch.cat([seqs[src_flat], next_tokens.view(-1, 1)], dim=1)
        beam_scores = next_scores
        if all(done) or step == max_new_tokens - 1:
            break
        stepper.reorder(src_flat)
        logprobs = stepper.step(next_tokens.view(-1)).float().log_softmax(-1)

    for b in range(batch):
        if not done[b]:
            for j in range(k):
                if beam_scores[b, j].item() > float("-inf") or not hyps[b]:
                    add(b, beam_scores[b, j].item() / seqs.shape[1] ** length_penalty, seqs[b * k + j])
    best = [hyps[b][0][1] for b in range(batch)]
    width = max(t.numel() for t in best)
    out = torch.full((batch, width), pad, dtype=torch.long, device=device)
    for b, t in enumerate(best):
        out[b, : t.numel()] = t
    return out
