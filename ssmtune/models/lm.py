"""Embeddings → blocks → norm_f → head, for Mamba-1 and Mamba-2.

The native state-dict layout is HF transformers' one: ``backbone.embeddings.weight``, ``backbone.layers.{i}.norm.weight``,
``backbone.layers.{i}.mixer.*``, ``backbone.norm_f.weight``, ``lm_head.weight`` (tied to the embedding by default).
Block: out = U + mixer(RMSNorm(U)), with the residual stream in fp32 when ``residual_in_fp32``. On the Triton backend
the backbone chains the blocks as mamba_ssm's fused add + norm does: each block hands (U, mixer output) on unadded,
and the next norm (finally ``norm_f``) adds them (``ops.add_rms_norm``), in its kernel when no gradient is taken: one
kernel less per layer, the same bits.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .cache import InferenceCache
from .config import Mamba2Config, MambaConfig, SSMConfig
from .hooks import check_rows
from .mamba import MambaMixer
from .mamba2 import Mamba2Mixer, RMSNormGated


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32; the result is ``weight * normed.to(input dtype)`` (as transformers; ``ops.rms_norm``)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.backend: str = "auto"  # ssmtune.ops.rms_norm's: the fused Triton kernels on CUDA

    def forward(
        self, x: torch.Tensor, input_dtype: torch.dtype | None = None, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``input_dtype``: normalise ``x.to(input_dtype)`` (``ops.rms_norm``: the cast inside the kernel).
        ``residual``: normalise ``residual + x`` and return (residual + x, the norm) (``ops.add_rms_norm``)."""
        if residual is not None:
            return ops.add_rms_norm(
                residual, x, self.weight, eps=self.eps, input_dtype=input_dtype, backend=self.backend
            )
        return ops.rms_norm(x, self.weight, eps=self.eps, input_dtype=input_dtype, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def make_mixer(config: SSMConfig, layer_idx: int) -> nn.Module:
    if isinstance(config, Mamba2Config):
        return Mamba2Mixer(config, layer_idx)
    if isinstance(config, MambaConfig):
        return MambaMixer(config, layer_idx)
    raise TypeError(f"config must be a MambaConfig or Mamba2Config, got {type(config).__name__}")


class Block(nn.Module):
    def __init__(self, config: SSMConfig, layer_idx: int) -> None:
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.d_model, eps=config.norm_epsilon)
        self.mixer = make_mixer(config, layer_idx)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache=None,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        *,
        resets: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
        defer_add: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """hidden_states → hidden_states + mixer(norm(hidden_states)). The fused chain of ``Backbone.forward``:
        ``residual`` given, the block's input is ``residual + hidden_states`` (the previous block's pair),
        added in this block's norm; ``defer_add``: return (the residual stream, the mixer output) unadded."""
        if residual is None:
            residual = hidden_states.float() if self.residual_in_fp32 else hidden_states
            normed = self.norm(hidden_states, input_dtype=self.norm.weight.dtype)
        else:
            residual, normed = self.norm(hidden_states, input_dtype=self.norm.weight.dtype, residual=residual)
        packed = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
        if resets is not None:
            packed["resets"] = resets
        out = self.mixer(normed, cache, attention_mask=attention_mask, **packed)
        return (residual, out) if defer_add else residual + out


class Backbone(nn.Module):
    def __init__(self, config: SSMConfig) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.layers = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.norm_f = RMSNorm(config.d_model, eps=config.norm_epsilon)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: InferenceCache | None = None,
        cu_seqlens: torch.Tensor | None = None,
        resets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """inputs_embeds [B, L, d_model] → final hidden states [B, L, d_model] (fp32 with residual_in_fp32);
        ``cu_seqlens``: a packed [1, total, d_model] batch; ``resets``: packed rows (see ``SSMForCausalLM.forward``)."""
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(f"cache has {len(cache)} layers, the model has {len(self.layers)}")
        h, residual = inputs_embeds, None
        fuse = self.fuses_add(inputs_embeds)
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache[i]
            if fuse:  # (stream, mixer output): the add happens in the next norm's kernel
                residual, h = layer(h, layer_cache, attention_mask, cu_seqlens, resets=resets, residual=residual,
                                    defer_add=True)  # fmt: skip
            else:
                h = layer(h, layer_cache, attention_mask=attention_mask, cu_seqlens=cu_seqlens, resets=resets)
        return self.norm_f(h) if residual is None else self.norm_f(h, residual=residual)[1]

    def fuses_add(self, inputs_embeds: torch.Tensor) -> bool:
        """Whether ``forward`` hands each block's residual add to the next norm (``ops.add_rms_norm``): when every norm
        runs on the Triton kernels and no block or norm has forward hooks (they would see the unadded pair rather than
        the block's usual input and output). With a gradient to take, the op itself keeps the add a torch op before
        the norm (its kernel has no backward): the same ops as the unfused chain."""
        norms = [layer.norm for layer in self.layers] + [self.norm_f]
        if not all(n.backend == "triton" or (n.backend == "auto" and inputs_embeds.is_cuda) for n in norms):
            return False
        return not any(m._forward_hooks or m._forward_pre_hooks for m in [*self.layers, *norms])


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    """[B, L, V] in fp32; positions added by input hooks are dropped."""
    loss: torch.Tensor | None = None
    """Shifted cross-entropy (ignore_index -100), when labels are given."""
    cache: InferenceCache | None = None
    """The cache passed in, advanced past the input."""


@dataclass
class SequenceClassifierOutput:
    logits: torch.Tensor
    """[B, num_labels] in fp32, pooled at the last non-pad position."""
    loss: torch.Tensor | None = None
    """Cross-entropy (MSE when num_labels == 1), when labels are given."""
    cache: InferenceCache | None = None


class SSMPreTrainedModel(nn.Module):
    """Shared plumbing: config, backbone, input hooks, mixers(), backend, cache allocation, init, save."""

    def __init__(self, config: SSMConfig) -> None:
        super().__init__()
        if not isinstance(config, (MambaConfig, Mamba2Config)):
            raise TypeError(f"config must be a MambaConfig or Mamba2Config, got {type(config).__name__}")
        self.config = config
        self.backbone = Backbone(config)
        self.input_hooks = nn.ModuleDict()
        self.tokenizer = None

    def mixers(self) -> Iterator[tuple[int, nn.Module]]:
        """Yields (layer_idx, mixer) for every block."""
        for i, layer in enumerate(self.backbone.layers):
            yield i, layer.mixer

    def rows_lead(self) -> int:
        """The pads packed rows need before each sequence (``PackedRowsCollator``'s ``lead``): the mixers' longest conv
        window minus one, at least 1."""
        return max([1] + [m.conv1d.weight.shape[-1] - 1 for _, m in self.mixers() if hasattr(m, "conv1d")])

    @property
    def backend(self) -> str:
        backends = {m.backend for _, m in self.mixers()}
        return backends.pop() if len(backends) == 1 else "mixed"

    @backend.setter
    def backend(self, value: str) -> None:
        from ..ops import BACKENDS

        if value not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {value!r}")
        for _, mixer in self.mixers():
            mixer.backend = value
        for module in self.modules():
            if isinstance(module, (RMSNorm, RMSNormGated)):
                module.backend = value

    def allocate_cache(
        self,
        batch_size: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        state_dtype: torch.dtype | None = None,
    ) -> InferenceCache:
        """Zero cache for ``batch_size`` rows, shaped from the mixers' current parameters; SSM states in
        ``state_dtype`` (None: fp32, ``cache.state_dtype_of``)."""
        return InferenceCache.allocate((m for _, m in self.mixers()), batch_size, dtype, device, state_dtype)

    @torch.no_grad()
    def init_weights(self) -> None:
        """mamba_ssm's from-scratch init: embeddings N(0, initializer_range), Linear biases 0 (except b_dt),
        mixer parameters as in ``reset_parameters``, and out_proj divided by sqrt(n_layer) when asked."""
        cfg = self.config
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None and not getattr(module.bias, "_no_reinit", 0):
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.backbone.embeddings.weight, std=cfg.initializer_range)
        for _, mixer in self.mixers():
            if cfg.rescale_prenorm_residual:
                nn.init.kaiming_uniform_(mixer.out_proj.weight, a=math.sqrt(5))
                mixer.out_proj.weight /= math.sqrt(cfg.n_layer)

    def _embed(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None,
        cache: InferenceCache | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, int]:
        """Embedding lookup, then the input hooks (fresh cache only). Returns embeds, mask, labels, #added."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
            inputs_embeds = self.backbone.embeddings(input_ids)  # [B, L, d_model]
        added = 0
        if cache is None or cache.seqlen_offset == 0:
            for hook in self.input_hooks.values():
                if not getattr(hook, "active", True):
                    continue
                inputs_embeds, attention_mask, labels = hook(inputs_embeds, attention_mask, labels)
                added += hook.num_added
        return inputs_embeds, attention_mask, labels, added

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write config.json (HF transformers style) and model.safetensors, readable by transformers."""
        from .loading import save_pretrained

        save_pretrained(self, save_directory)


class SSMForCausalLM(SSMPreTrainedModel):
    """Causal LM for either architecture (the config's class picks the mixer)."""

    def __init__(self, config: SSMConfig, *, init: bool = True) -> None:
        super().__init__(config)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        if init:
            self.init_weights()
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache: InferenceCache | None = None,
        cu_seqlens: torch.Tensor | None = None,
        resets: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """input_ids [B, L] (or inputs_embeds [B, L, d_model]) → logits [B, L, V]; loss when labels [B, L].

        ``cu_seqlens`` (int32 [n_seq + 1]): input_ids is a packed [1, total] batch of n_seq sequences, each run from
        its own initial states as if alone (``ssmtune.ops.varlen``); no position predicts the next sequence's first
        token, so the loss equals the token-weighted loss of the separate sequences.
        ``resets`` (bool [B, ceil(L / 64)]): packed rows (``ssmtune.data.PackedRowsCollator``): each sequence in a slot
        starting at a multiple of 64 after at least d_conv - 1 pads (``attention_mask`` 0), run from its own initial
        states as if alone; a label right after a pad is ignored (no position predicts a sequence's first token).
        """
        if cu_seqlens is not None:
            labels = packed_labels(labels, cu_seqlens, self.input_hooks)
        if resets is not None:
            check_rows(resets, cache, cu_seqlens, attention_mask)
            labels = row_labels(labels, attention_mask, self.input_hooks)
        embeds, mask, hook_labels, added = self._embed(input_ids, inputs_embeds, attention_mask, labels, cache)
        packed = {} if resets is None else {"resets": resets}
        hidden = self.backbone(embeds, mask, cache, cu_seqlens=cu_seqlens, **packed)  # [B, L', d_model]
        # [B, L', V] in the head's dtype, as transformers' recent LMs: an fp32 copy of bf16 logits is 3.3 GB at 8 x 2048
        # with a 50k vocabulary, and the loss reads them in their own dtype and computes in fp32 anyway
        logits = self.lm_head(hidden.to(self.lm_head.weight.dtype))
        loss = None
        if labels is not None:
            backend = self.backend  # the mixers' (one walk over them); "mixed" leaves the loss to "auto"
            backend = "auto" if backend == "mixed" else backend
            if hook_labels is not None and hook_labels.shape[1] == logits.shape[1]:
                loss = causal_lm_loss(logits, hook_labels, backend=backend)
            else:
                loss = causal_lm_loss(logits[:, added:], labels, backend=backend)
        return CausalLMOutput(logits=logits[:, added:], loss=loss, cache=cache)

    def generate(
        self,
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
        """Greedy / sampling / beam search with the recurrent cache; returns [B, prompt + new] token ids.
        See ``ssmtune.models.generate.generate`` (``cuda_graph``: graphed decoding; ``state_dtype``: the decode
        states' dtype, see there)."""
        from .generate import generate

        return generate(
            self, input_ids, max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
            num_beams=num_beams, length_penalty=length_penalty, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
            attention_mask=attention_mask, min_new_tokens=min_new_tokens, generator=generator, cuda_graph=cuda_graph,
            state_dtype=state_dtype,
        )  # fmt: skip


class MambaForCausalLM(SSMForCausalLM):
    """Mamba-1 causal LM."""

    def __init__(self, config: MambaConfig, *, init: bool = True) -> None:
        if not isinstance(config, MambaConfig):
            raise TypeError(f"MambaForCausalLM needs a MambaConfig, got {type(config).__name__}")
        super().__init__(config, init=init)


class Mamba2ForCausalLM(SSMForCausalLM):
    """Mamba-2 causal LM."""

    def __init__(self, config: Mamba2Config, *, init: bool = True) -> None:
        if not isinstance(config, Mamba2Config):
            raise TypeError(f"Mamba2ForCausalLM needs a Mamba2Config, got {type(config).__name__}")
        super().__init__(config, init=init)


def causal_lm_for(config: SSMConfig, *, init: bool = True) -> SSMForCausalLM:
    """The LM class matching the config."""
    cls = Mamba2ForCausalLM if isinstance(config, Mamba2Config) else MambaForCausalLM
    return cls(config, init=init)


IGNORE_INDEX = -100  # the label of positions without a target (the HF convention)


def packed_labels(
    labels: torch.Tensor | None, cu_seqlens: torch.Tensor, input_hooks: nn.ModuleDict
) -> torch.Tensor | None:
    """The labels of a packed batch with each sequence's first label ignored: its unpacked run has no position that
    predicts it. Input hooks (Prompt Tuning) add positions per row, which a packed row cannot place."""
    if any(getattr(h, "active", True) for h in input_hooks.values()):
        raise ValueError("cu_seqlens: input hooks (Prompt Tuning) cannot run on a packed batch")
    if labels is None:
        return None
    labels = labels.clone()
    labels[:, cu_seqlens[1:-1].long().to(labels.device)] = IGNORE_INDEX
    return labels


def row_labels(
    labels: torch.Tensor | None, attention_mask: torch.Tensor, input_hooks: nn.ModuleDict
) -> torch.Tensor | None:
    """The labels of packed rows (``resets``) with every label right after a pad ignored: a sequence's first token,
    which its separate run has no position to predict. Input hooks (Prompt Tuning) add positions per row, which a
    row of several sequences cannot place."""
    if any(getattr(h, "active", True) for h in input_hooks.values()):
        raise ValueError("resets: input hooks (Prompt Tuning) cannot run on packed rows (their virtual tokens are "
                         "added once per row, not per sequence)")  # fmt: skip
    if labels is None:
        return None
    after_pad = torch.zeros_like(labels, dtype=torch.bool)
    after_pad[:, 1:] = attention_mask[:, :-1].to(labels.device) == 0
    return labels.masked_fill(after_pad, IGNORE_INDEX)


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, backend: str = "auto", reduction: str = "mean"
) -> torch.Tensor:
    """HF-style: position t predicts label t+1; -100 is ignored; mean (or ``reduction``) over the counted tokens, in
    fp32. ``ops.cross_entropy``: on CUDA a Triton kernel that reads the logits in their dtype (no fp32 copy).
    """
    # The labels are shifted, not the logits: a [B, L-1, V] slice of the logits would be copied forward and
    # zero-padded backward (6.6 GB each way in fp32 for a 50k vocabulary at 8 x 2048). The last position gets -100.
    shift_labels = F.pad(labels[:, 1:].to(logits.device), (0, 1), value=-100)
    return ops.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), shift_labels.reshape(-1), reduction=reduction, backend=backend
    )


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of cross-entropy over target positions and their count; position t predicts labels[t + 1].

    logits: [B, L, V]; labels: [B, L] with IGNORE_INDEX where there is no target (the HF convention).
    """
    return token_loss_sum(logits, labels), count_targets(labels)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The summed cross-entropy of ``token_loss`` alone: no host synchronisation (CUDA-graph safe)."""
    # the models' own loss (labels shifted, not logits sliced; fp32 from the logits' dtype), summed
    return causal_lm_loss(logits, labels, reduction="sum")


def count_targets(labels: torch.Tensor) -> int:
    """Target positions of ``labels`` (those that some position predicts, i.e. not ``IGNORE_INDEX``)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def last_token_index(attention_mask: torch.Tensor | None, batch: int, seqlen: int, device) -> torch.Tensor:
    """Index of the last non-pad position per row (either padding side); the last position without a mask."""
    if attention_mask is None:
        return torch.full((batch,), seqlen - 1, dtype=torch.long, device=device)
    pos = torch.arange(seqlen, device=attention_mask.device)
    return (attention_mask.bool() * (pos + 1)).argmax(-1).to(device)


class SSMForSequenceClassification(SSMPreTrainedModel):
    """Backbone + ``score`` Linear pooled at the last non-pad token."""

    def __init__(self, config: SSMConfig, num_labels: int, *, init: bool = True) -> None:
        super().__init__(config)
        if not isinstance(num_labels, int) or num_labels < 1:
            raise ValueError(f"num_labels must be a positive integer, got {num_labels!r}")
        self.num_labels = num_labels
        self.score = nn.Linear(config.d_model, num_labels, bias=False)
        if init:
            self.init_weights()

    @classmethod
    def from_causal_lm(cls, lm: SSMForCausalLM, num_labels: int) -> SSMForSequenceClassification:
        """A classifier sharing ``lm``'s backbone (weights, hooks) with a fresh ``score`` head."""
        model = cls(lm.config, num_labels, init=False)
        model.backbone = lm.backbone
        model.input_hooks = lm.input_hooks
        model.tokenizer = lm.tokenizer
        nn.init.normal_(model.score.weight, std=lm.config.initializer_range)
        return model.to(device=lm.lm_head.weight.device, dtype=lm.lm_head.weight.dtype)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache: InferenceCache | None = None,
    ) -> SequenceClassifierOutput:
        """input_ids [B, L] → logits [B, num_labels]; labels [B] (long, or float when num_labels == 1)."""
        embeds, mask, _, _ = self._embed(input_ids, inputs_embeds, attention_mask, None, cache)
        hidden = self.backbone(embeds, mask, cache)  # [B, L', d_model]
        batch, seqlen, _ = hidden.shape
        idx = last_token_index(mask, batch, seqlen, hidden.device)
        pooled = hidden[torch.arange(batch, device=hidden.device), idx]  # [B, d_model]
        logits = self.score(pooled.to(self.score.weight.dtype)).float()  # [B, num_labels]
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1), labels.float())
            else:
                loss = F.cross_entropy(logits, labels.long())
        return SequenceClassifierOutput(logits=logits, loss=loss, cache=cache)
