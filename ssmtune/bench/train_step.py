"""Training step: ssmtune's PEFT methods on a 130M-shaped Mamba / Mamba-2 against transformers + peft and mamba_ssm.

One step = forward + loss + backward + AdamW step (+ zero_grad), on a randomly initialised model of the mamba-130m
shape (d_model 768, 24 layers, vocab 50280; Mamba-2: headdim 64, d_state 128) with the frozen base in bf16 and the
trainable parameters in fp32 under bf16 autocast, as ``ssmtune.train.fit(precision="bf16")`` runs it. Methods:
``none`` (the bare frozen model, see below), State-offset h / y, Initial State, LoRA (r 8) and Prefix-Tuning (16
virtual tokens); sizes (B, L) = (4, 512) and (8, 2048).

``none`` has no trainable parameter: the (frozen) input embeddings are made to require grad, so its backward runs
through every block as an adapter's does. It has no optimizer step, and it computes block 0's input gradient, which an
adapter's step skips (about 1/24 of the backward); "x bare" (ms/step over the bare ms/step of the same model, backend
and size) carries both small biases, in opposite directions.

Peers on the same device: transformers' MambaForCausalLM / Mamba2ForCausalLM (same shape, random init, bf16) with peft
LoRA r 8 (Mamba-1: in_proj, x_proj, dt_proj, since peft refuses out_proj; Mamba-2: in_proj). Without mamba_ssm
transformers runs its torch path (a Python loop over L for Mamba-1), so the peer gets fewer timed steps and its
(8, 2048) row is skipped when the estimate from its (4, 512) row (time and memory scaled by tokens) is too large.
``--mamba-ssm`` also times the authors' stack (mamba_ssm ``MambaLMHeadModel``, unfused path, bare step) when its
compiled extension imports. ``--only-stack`` runs a subset of the stacks; ``--compare earlier.json`` merges the rows of
an earlier report, so that one table shows ours, the peers and mamba_ssm side by side.

``--backends auto+graph`` adds our steps replayed from a CUDA graph (``ssmtune.train.graphs.GraphedStep``, what
``fit(cuda_graph=True)`` runs): each graphed variant is built, timed and freed on its own (one live graph at a time).

Check: before any timing, each model's loss on the benchmark's batch (first row, 64 tokens, fp32) through the timed
backend must match the plain reference backend (``ref``).

Timing: the methods of one (model, backend, B, L) are built together and each gets ``--warmup`` untimed steps
(Triton compilation, allocator); then ``--iters`` interleaved rounds of one step per method, each step bracketed by a
device synchronisation, and the median is reported. Peak memory: ``torch.cuda.max_memory_allocated`` of a step minus
what was allocated before it, plus the variant's own resident bytes (weights, optimizer state); for a graphed variant
the growth of reserved bytes while it is built (its graph's pool included; a lower bound). Groups that would start
after ``--max-seconds`` are reported as skipped, and the rounds of a group are cut to fit.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from ssmtune.bench.common import check_close, fmt, sync
from ssmtune.bench.peers import mamba_ssm_missing, transformers_peft
from ssmtune.bench.registry import Benchmark, register
from ssmtune.models import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM
from ssmtune.train.loop import apply_precision

SHAPES = {
    "130m": {"d_model": 768, "n_layer": 24, "vocab_size": 50280},
    "tiny": {"d_model": 64, "n_layer": 2, "vocab_size": 256},
}
# Mamba-2 extras per shape: headdim P and d_state N (H = 2 * d_model / P)
MAMBA2_EXTRA = {"130m": {"headdim": 64, "d_state": 128}, "tiny": {"headdim": 16, "d_state": 16}}
SIZES = {"130m": [(4, 512), (8, 2048)], "tiny": [(2, 64), (4, 128)]}
METHODS = ("none", "state_offset_h", "state_offset_y", "initial_state", "lora", "prefix")
MODELS = ("mamba", "mamba2")
STACKS = ("ssmtune", "hf+peft", "mamba_ssm")
# ssmtune LoRA targets (the first that attach); peft's targets for the peer (peft refuses out_proj on Mamba)
LORA_TARGETS = {"mamba": ["in_proj", "x_proj", "dt_proj", "out_proj"], "mamba2": ["in_proj", "out_proj"]}
PEER_TARGETS = {"mamba": ["in_proj", "x_proj", "dt_proj"], "mamba2": ["in_proj"]}
PREFIX_TOKENS = 16
LR = 1e-4


@dataclass
class Variant:
    stack: str
    """"ssmtune", "hf+peft" or "mamba_ssm"."""
    model: str
    """"mamba" or "mamba2"."""
    method: str
    """One of METHODS ("lora" for the peft peer, "none" for mamba_ssm)."""
    backend: str
    """ssmtune scan backend ("auto+graph": "auto" with the whole step replayed from a CUDA graph); "torch-path" for
    HF, "unfused" for mamba_ssm."""
    batch: int
    seqlen: int


@dataclass
class Row:
    variant: Variant
    status: str = "ok"
    """"ok", "error: ...", "skipped (...)" or "unavailable: ..."."""
    ms_step: float | None = None
    ms_all: list[float] = field(default_factory=list)
    warmup_ms: list[float] = field(default_factory=list)
    tokens_per_s: float | None = None
    peak_gib: float | None = None
    trainable_params: int | None = None
    loss: float | None = None
    """Loss of the first warm-up step (finite, or the row is an error)."""
    dead_params: int | None = None
    """Trainable tensors with no gradient after the first backward (an adapter the forward never used)."""
    est_ms_step: float | None = None
    """Estimated ms/step of a skipped peer row (scaled by tokens from a measured smaller size)."""
    est_peak_gib: float | None = None
    detail: str = ""
    """LoRA targets actually attached, the resolved backend, or the traceback tail of an error."""

    def to_json(self) -> dict:
        d = asdict(self)
        d.update(d.pop("variant"))
        return d


# Once a CUDA graph has been captured in this process, torch.cuda.empty_cache() is never called again: emptying the
# cache after a graphed variant was freed faulted with an illegal memory access on an H200 (torch 2.11). So the graphed
# backend goes last (--backends auto auto+graph).
_GRAPH_CAPTURED = False


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda" and not _GRAPH_CAPTURED:
        torch.cuda.empty_cache()


def make_batch(batch: int, seqlen: int, vocab: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(1, vocab, (batch, seqlen), generator=g).to(device)  # [B, L]


def ssmtune_config(model: str, shape: str):
    if model == "mamba":
        return MambaConfig(**SHAPES[shape])
    return Mamba2Config(**SHAPES[shape], **MAMBA2_EXTRA[shape])


def method_config(method: str, model: str, targets: list[str] | None = None):
    from ssmtune.methods import InitialStateConfig, LoraConfig, PrefixTuningConfig, StateOffsetConfig

    if method == "state_offset_h":
        return StateOffsetConfig(variant="h")
    if method == "state_offset_y":
        return StateOffsetConfig(variant="y")
    if method == "initial_state":
        return InitialStateConfig()
    if method == "lora":
        return LoraConfig(r=8, lora_alpha=8, target_modules=targets or LORA_TARGETS[model])
    if method == "prefix":
        return PrefixTuningConfig(num_virtual_tokens=PREFIX_TOKENS)
    raise ValueError(f"unknown method {method!r}; known: {METHODS}")


def attach_lora(base_fn: Callable[[], torch.nn.Module], model: str):
    """ssmtune LoRA on LORA_TARGETS[model]; targets that fail to attach are dropped. Returns (model, targets)."""
    from ssmtune.core.peft_model import get_peft_model

    try:
        return get_peft_model(base_fn(), method_config("lora", model)), LORA_TARGETS[model]
    except Exception:
        ok = []
        for t in LORA_TARGETS[model]:
            with contextlib.suppress(Exception):
                get_peft_model(base_fn(), method_config("lora", model, [t]))
                ok.append(t)
        if not ok:
            raise
        return get_peft_model(base_fn(), method_config("lora", model, ok)), ok


def build_ssmtune(v: Variant, shape: str, device: torch.device) -> tuple[torch.nn.Module, str]:
    from ssmtune.core.peft_model import get_peft_model

    def base() -> torch.nn.Module:
        torch.manual_seed(0)
        klass = MambaForCausalLM if v.model == "mamba" else Mamba2ForCausalLM
        with torch.device(device):
            m = klass(ssmtune_config(v.model, shape))
        m.backend = v.backend.removesuffix("+graph")
        return m

    detail = ""
    if v.method == "none":
        model = base().requires_grad_(False)
    elif v.method == "lora":
        model, targets = attach_lora(base, v.model)
        detail = "targets " + "+".join(targets)
    else:
        model = get_peft_model(base(), method_config(v.method, v.model))
    # the trainer's bf16 recipe: frozen floating weights to bf16 (A_log, D stay fp32), trainables in fp32
    apply_precision(model, "bf16")
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model.train(), detail


def build_hf_peft(v: Variant, shape: str, device: torch.device) -> tuple[torch.nn.Module, str]:
    import transformers
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model as peft_get_peft_model

    s = SHAPES[shape]
    common = {"vocab_size": s["vocab_size"], "hidden_size": s["d_model"], "num_hidden_layers": s["n_layer"],
              "expand": 2, "conv_kernel": 4, "use_cache": False, "tie_word_embeddings": True}  # fmt: skip
    if v.model == "mamba":
        cfg = transformers.MambaConfig(state_size=16, **common)
        klass = transformers.MambaForCausalLM
    else:
        e = MAMBA2_EXTRA[shape]
        cfg = transformers.Mamba2Config(num_heads=2 * s["d_model"] // e["headdim"], head_dim=e["headdim"],
                                        state_size=e["d_state"], n_groups=1, chunk_size=256, **common)  # fmt: skip
        klass = transformers.Mamba2ForCausalLM
    torch.manual_seed(0)
    with torch.device(device):
        model = klass(cfg)
    model.to(dtype=torch.bfloat16)
    lcfg = PeftLoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=PEER_TARGETS[v.model])
    # peft keeps the adapter weights in fp32 on a bf16 base (autocast_adapter_dtype=True)
    model = peft_get_peft_model(model, lcfg)
    return model.train(), f"peft targets {'+'.join(PEER_TARGETS[v.model])}, transformers {transformers.__version__}"


def build_mamba_ssm(v: Variant, shape: str, device: torch.device) -> tuple[torch.nn.Module, str]:
    from mamba_ssm.models.config_mamba import MambaConfig as MSConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    s = SHAPES[shape]
    if v.model == "mamba":
        ssm_cfg = {"layer": "Mamba1", "use_fast_path": False}
    else:
        e = MAMBA2_EXTRA[shape]
        ssm_cfg = {"layer": "Mamba2", "headdim": e["headdim"], "d_state": e["d_state"], "use_mem_eff_path": False}
    cfg = MSConfig(d_model=s["d_model"], n_layer=s["n_layer"], vocab_size=s["vocab_size"], ssm_cfg=ssm_cfg,
                   rms_norm=True, residual_in_fp32=True, fused_add_norm=False, pad_vocab_size_multiple=8)  # fmt: skip
    torch.manual_seed(0)
    model = MambaLMHeadModel(cfg, device=device, dtype=torch.bfloat16).requires_grad_(False)
    # a bare step with backward through every block: the embedding output requires grad
    model.backbone.embedding.register_forward_hook(lambda mod, inp, out: out.detach().requires_grad_())
    return model.train(), f"mamba_ssm {ssm_cfg}"


def make_step(v: Variant, model: torch.nn.Module, ids: torch.Tensor) -> tuple[Callable[..., None], int]:
    """The step closure (``step(row)`` also records the loss and the dead parameters) and the trainable count."""
    device = ids.device
    params = [p for p in model.parameters() if p.requires_grad]
    graph = v.backend.endswith("+graph")
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, capturable=graph) if params else None

    def forward(x: torch.Tensor, cache_enabled: bool = True) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache_enabled):
            if v.stack == "ssmtune" and v.method == "none":
                embeds = model.backbone.embeddings(x).detach().requires_grad_()  # [B, L, d_model]
                return model(inputs_embeds=embeds, labels=x).loss
            if v.stack == "ssmtune":
                return model(x, labels=x).loss
            if v.stack == "hf+peft":
                return model(input_ids=x, labels=x, use_cache=False).loss
            logits = model(x).logits  # [B, L, V]
        return torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), x[:, 1:].flatten())

    if graph:
        return make_graphed_step(v, forward, params, ids, opt), sum(p.numel() for p in params)

    def step(row: Row | None = None) -> None:
        loss = forward(ids)
        loss.backward()
        if row is not None:
            row.loss = loss.item()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {row.loss!r}")
            row.dead_params = sum(p.grad is None for p in params)
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


def make_graphed_step(
    v: Variant, forward: Callable[..., torch.Tensor], params: list, ids: torch.Tensor, opt
) -> Callable[..., None]:
    """The step of an ssmtune variant captured in a CUDA graph (``ssmtune.train.graphs.GraphedStep``), 3 eager
    warm-up steps included in the build; each call replays it on the same batch (copied into the static input).
    ``forward(x, cache_enabled)`` is make_step's loss; the autocast cache is off (cached casts of the trainable
    weights would be baked into the graph)."""
    from ssmtune.train.graphs import GraphedStep

    if v.stack != "ssmtune":
        raise ValueError(f"CUDA-graph steps are built for ssmtune variants only, got {v.stack!r}")

    def step(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        loss = forward(batch["input_ids"], cache_enabled=False)
        loss.backward()
        if opt is not None:
            opt.step()
        return loss

    global _GRAPH_CAPTURED
    graphed = GraphedStep(step, {"input_ids": ids}, optimizers=[opt] if opt is not None else [])
    _GRAPH_CAPTURED = True

    def replay(row: Row | None = None) -> None:
        loss = graphed.run({"input_ids": ids})
        if row is not None:
            row.loss = loss.item()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {row.loss!r}")
            row.dead_params = sum(p.grad is None for p in params)

    return replay


def timed(step: Callable[..., None], device: torch.device, probe: Row | None = None) -> float:
    """Seconds of one step, bracketed by device synchronisation."""
    sync(device)
    t0 = time.perf_counter()
    step(probe)
    sync(device)
    return time.perf_counter() - t0


def _error(row: Row, e: BaseException) -> None:
    msg = str(e).splitlines()[0][:160] if str(e) else ""
    row.status = f"error: {type(e).__name__}: {msg}"
    row.detail = (row.detail + " | " if row.detail else "") + traceback.format_exc(limit=-3)[-1500:]
    row.ms_all.clear()


def run_group(vs: list[Variant], args: argparse.Namespace, device: torch.device, deadline: float) -> list[Row]:
    """Time variants of one (B, L) in interleaved rounds, so that slow drift of the device (clocks, temperature)
    does not bias the ratios between them. Every model of the group stays resident; each variant's peak is that of
    its own step above what was allocated before it, plus its own resident bytes (weights, optimizer state)."""
    builders = {"ssmtune": build_ssmtune, "hf+peft": build_hf_peft, "mamba_ssm": build_mamba_ssm}
    rows = [Row(v) for v in vs]
    # the HF torch path is slow: fewer steps; mamba_ssm's CUDA path is as fast as ours and gets as many
    peer = vs[0].stack == "hf+peft"
    warmup, iters = (args.peer_warmup, args.peer_iters) if peer else (args.warmup, args.iters)
    cuda = device.type == "cuda"
    live: list[list] = []  # [row, model, step, resident bytes]
    ids = make_batch(vs[0].batch, vs[0].seqlen, SHAPES[args.shape]["vocab_size"], device)  # [B, L]
    try:
        for row in rows:
            v = row.variant
            if v.stack == "mamba_ssm" and (missing := mamba_ssm_missing()):
                row.status = f"unavailable: {missing}"
                continue
            if v.stack == "hf+peft" and (peer := transformers_peft())[0] is None:
                row.status = f"unavailable: {peer[1]}"
                continue
            if time.perf_counter() > deadline:
                row.status = "skipped (budget: --max-seconds reached while building its group)"
                continue
            graph = v.backend.endswith("+graph")
            # a graph's activations live in its private pool, reserved but not "allocated" between replays: count
            # the growth of reserved bytes while it is built (its pool is new memory; the warm-up may reuse cached
            # blocks, since the cache is not emptied once a graph exists, so this is a lower bound)
            mem_now = torch.cuda.memory_reserved if graph else torch.cuda.memory_allocated
            mem0 = mem_now(device) if cuda else 0
            model = step = None
            try:
                model, row.detail = builders[v.stack](v, args.shape, device)
                if v.stack == "ssmtune" and v.backend == "auto":
                    row.detail = "; ".join(filter(None, [row.detail, "triton" if cuda else "torch"]))
                step, row.trainable_params = make_step(v, model, ids)
                for i in range(warmup):
                    if i > 0 and time.perf_counter() > deadline:
                        break
                    row.warmup_ms.append(1e3 * timed(step, device, row if i == 0 else None))
                resident = mem_now(device) - mem0 if cuda else 0
                live.append([row, model, step, resident])
            except Exception as e:  # noqa: BLE001 - one failing variant must not lose the others
                _error(row, e)
            finally:
                del model, step
                free_memory(device)
        if not live:
            return rows
        round_s = sum(item[0].warmup_ms[-1] for item in live) / 1e3
        n = max(1, min(iters, int((deadline - time.perf_counter()) / max(round_s, 1e-9))))
        for _ in range(n):
            for item in list(live):
                row, _, step, resident = item
                try:
                    if cuda:
                        torch.cuda.reset_peak_memory_stats(device)
                        before = torch.cuda.memory_allocated(device)
                    row.ms_all.append(1e3 * timed(step, device))
                    if cuda:
                        peak = (torch.cuda.max_memory_allocated(device) - before + resident) / 2**30
                        row.peak_gib = max(row.peak_gib or 0.0, peak)
                except Exception as e:  # noqa: BLE001
                    _error(row, e)
                    live = [x for x in live if x is not item]
                    del item[:]
                    step = None  # the closure holds the model: drop it before freeing
                    free_memory(device)
        for row in rows:
            if row.status == "ok" and row.ms_all:
                row.ms_step = statistics.median(row.ms_all)
                row.tokens_per_s = row.variant.batch * row.variant.seqlen / (row.ms_step / 1e3)
    finally:
        step = None
        live.clear()
        free_memory(device)
    return rows


def schedule(args: argparse.Namespace) -> list[list[Variant]]:
    """Groups, most important first: ssmtune (main backend) Mamba-1 then Mamba-2 at the small size, then the large
    size, then the peers (one variant per group), mamba_ssm, and last the other ssmtune backends."""
    sizes = [tuple(map(int, x.split("x"))) for x in args.sizes] if args.sizes else SIZES[args.shape]
    backends = list(dict.fromkeys(args.backends))
    main, rest = backends[0], backends[1:]
    out: list[list[Variant]] = []

    def ours(be: str, b: int, seqlen: int) -> list[list[Variant]]:
        groups = [[Variant("ssmtune", m, meth, be, b, seqlen) for meth in args.methods] for m in args.models]
        # a CUDA graph's variant runs alone (built, timed, freed): one live graph at a time, no interleaving
        return [[v] for g in groups for v in g] if be.endswith("+graph") else groups

    for b, seqlen in sizes:
        out += ours(main, b, seqlen)
    if not args.no_peers:
        out += [[Variant("hf+peft", m, "lora", "torch-path", b, seqlen)] for b, seqlen in sizes for m in args.models]
    if args.mamba_ssm:
        out += [[Variant("mamba_ssm", m, "none", "unfused", b, seqlen)] for b, seqlen in sizes for m in args.models]
    for be in rest:
        for b, seqlen in sizes:
            out += ours(be, b, seqlen)
    if args.only_stack:
        out = [g for g in out if g[0].stack in args.only_stack]
    return out


def peer_estimate(v: Variant, rows: list[Row], max_step_s: float, mem_gib: float | None) -> Row | None:
    """For a peer row larger than a measured one of the same stack/model: a skip row when its token-scaled
    estimate exceeds ``max_step_s`` or the device memory, else None (run it). Skips when no smaller size ran."""
    done = [r for r in rows if r.status == "ok" and r.variant.stack == v.stack and r.variant.model == v.model]
    tokens = v.batch * v.seqlen
    smaller = [r for r in done if r.variant.batch * r.variant.seqlen < tokens]
    if not smaller:
        if any(r.variant.stack == v.stack and r.variant.model == v.model for r in rows):
            return Row(v, status="skipped (no estimate: the smaller size did not run)")
        return None
    ref = max(smaller, key=lambda r: r.variant.batch * r.variant.seqlen)
    scale = tokens / (ref.variant.batch * ref.variant.seqlen)
    est_ms = ref.ms_step * scale
    est_mem = ref.peak_gib * scale if ref.peak_gib is not None else None
    row = Row(v, est_ms_step=est_ms, est_peak_gib=est_mem)
    if est_ms / 1e3 > max_step_s:
        row.status = "skipped (too slow)"
    elif est_mem is not None and mem_gib is not None and est_mem > 0.95 * mem_gib:
        row.status = "skipped (out of memory)"
    else:
        return None
    return row


def _key(r: Row) -> tuple:
    return r.variant.model, r.variant.batch, r.variant.seqlen


def add_ratios(rows: list[Row]) -> list[dict]:
    """JSON rows with vs_bare (ms / bare ms), vs_peer (tokens/s over the peer's), mem_vs_peer (peak / peer's), and
    vs_mamba_ssm / mem_vs_mamba_ssm (the same against mamba_ssm's bare step of the same model and size)."""
    bare = {(*_key(r), r.variant.backend): r for r in rows
            if r.status == "ok" and r.variant.stack == "ssmtune" and r.variant.method == "none"}  # fmt: skip
    peer = {_key(r): r for r in rows if r.variant.stack == "hf+peft"}
    msm = {_key(r): r for r in rows if r.variant.stack == "mamba_ssm" and r.status == "ok" and r.tokens_per_s}
    out = []
    for r in rows:
        d = r.to_json()
        m = msm.get(_key(r))
        d["vs_mamba_ssm"] = d["mem_vs_mamba_ssm"] = None
        if r.tokens_per_s and m is not None and r.variant.stack != "mamba_ssm":
            d["vs_mamba_ssm"] = r.tokens_per_s / m.tokens_per_s
            if r.peak_gib and m.peak_gib:
                d["mem_vs_mamba_ssm"] = r.peak_gib / m.peak_gib
        b = bare.get((*_key(r), r.variant.backend))
        d["vs_bare"] = r.ms_step / b.ms_step if r.ms_step and b and r.variant.stack == "ssmtune" else None
        p = peer.get(_key(r))
        d["vs_peer"] = d["mem_vs_peer"] = None
        d["vs_peer_estimated"] = False
        if r.tokens_per_s and p is not None and r.variant.stack != "hf+peft":
            if p.status == "ok":
                d["vs_peer"] = r.tokens_per_s / p.tokens_per_s
                if r.peak_gib and p.peak_gib:
                    d["mem_vs_peer"] = r.peak_gib / p.peak_gib
            elif p.est_ms_step:
                d["vs_peer"] = r.tokens_per_s / (r.variant.batch * r.variant.seqlen / (p.est_ms_step / 1e3))
                d["vs_peer_estimated"] = True
                if r.peak_gib and p.est_peak_gib:
                    d["mem_vs_peer"] = r.peak_gib / p.est_peak_gib
        out.append(d)
    return out


def markdown(rows: list[dict]) -> str:
    msm = any(d.get("vs_mamba_ssm") is not None for d in rows)  # the two mamba_ssm columns only when they have data
    lines = [("| model | stack | method | backend | B | L | ms/step | tokens/s | peak GiB | x bare | x HF+peft LoRA "
             "| mem / HF+peft |" + (" x mamba_ssm | mem / mamba_ssm |" if msm else "")),
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if msm else "")]  # fmt: skip
    for d in rows:
        method = d["method"] + (f" ({d['dead_params']} tensors without grad)" if d.get("dead_params") else "")
        head = f"| {d['model']} | {d['stack']} | {method} | {d['backend']} | {d['batch']} | {d['seqlen']} |"
        if d["status"] != "ok":
            note = d["status"]
            if d.get("est_ms_step"):
                note += f": est. {d['est_ms_step'] / 1e3:.1f} s/step"
                if d.get("est_peak_gib"):
                    note += f", {d['est_peak_gib']:.0f} GiB"
            lines.append(f"{head} {note[:140]} | | | | | |" + (" | |" if msm else ""))
            continue
        est = "~" if d["vs_peer_estimated"] else ""
        tail = f" {fmt(d.get('vs_mamba_ssm'), '.3f')} | {fmt(d.get('mem_vs_mamba_ssm'), '.3f')} |" if msm else ""
        lines.append(f"{head} {d['ms_step']:.2f} | {d['tokens_per_s']:,.0f} | {fmt(d['peak_gib'], '.2f')} | "
                     f"{fmt(d['vs_bare'], '.3f')} | {fmt(d['vs_peer'], '.1f', est)} | "
                     f"{fmt(d['mem_vs_peer'], '.3f', est)} |" + tail)  # fmt: skip
    return "\n".join(lines)


def check_backends(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Each model's fp32 logits through every timed ssmtune backend against the ``ref`` backend, on the first row
    and 64 tokens of the batch; raises CheckFailed on a mismatch. Returns the errors."""
    errs = {}
    backends = sorted({b.removesuffix("+graph") for b in args.backends} - {"ref"})
    # on CUDA the SSD kernels' fp32 dots run in tf32, through every layer; a wrong kernel is off by far more
    tol = 1e-2 if device.type == "cuda" else 1e-3
    for name in args.models:
        torch.manual_seed(0)
        klass = MambaForCausalLM if name == "mamba" else Mamba2ForCausalLM
        with torch.device(device):
            model = klass(ssmtune_config(name, args.shape)).eval()
        ids = make_batch(1, 64, SHAPES[args.shape]["vocab_size"], device)
        with torch.no_grad():
            model.backend = "ref"
            ref = model(ids).logits
            for be in backends:
                model.backend = be
                out = model(ids).logits
                errs[f"{name} {be}"] = check_close(f"{name} logits, backend {be}", [ref], [out], tol)
        del model
        free_memory(device)
    return errs


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--small", action="store_true", help="tiny shape (d_model 64, 2 layers, vocab 256): a CPU test")
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--backends", nargs="+", choices=["auto", "torch", "triton", "ref", "auto+graph"],
                    default=["auto", "torch"],
                    help="ssmtune scan backends; the first is the main one, the others run after the peers; "
                    "auto+graph: auto with the whole step captured in a CUDA graph (CUDA only)")  # fmt: skip
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per ssmtune variant (Triton compilation)")
    ap.add_argument("--iters", type=int, default=10, help="timed steps per ssmtune variant (median reported)")
    ap.add_argument("--peer-warmup", type=int, default=1, help="untimed steps per peer variant")
    ap.add_argument(
        "--peer-iters", type=int, default=2, help="timed steps per peer variant (the HF torch path is slow)"
    )
    ap.add_argument("--peer-max-step-s", type=float, default=60.0,
                    help="skip a larger peer size whose estimated step exceeds this many seconds")  # fmt: skip
    ap.add_argument("--no-peers", action="store_true", help="skip the transformers + peft peer")
    ap.add_argument("--mamba-ssm", action="store_true", help="also time mamba_ssm's MambaLMHeadModel (unfused path)")
    ap.add_argument("--only-stack", nargs="+", choices=STACKS, default=None,
                    help="run only these stacks' rows (mamba_ssm implies --mamba-ssm, hf+peft ignores --no-peers)")  # fmt: skip
    ap.add_argument("--compare", type=Path, default=None,
                    help="merge the rows of an earlier train_step report into this run's table and ratios")  # fmt: skip
    ap.add_argument(
        "--sizes", nargs="+", default=None, help="(B, L) sizes as BxL, e.g. 4x512 (default: the shape's two)"
    )
    ap.add_argument("--max-seconds", type=float, default=270.0, help="start no variant after this many seconds")


def run(args: argparse.Namespace) -> dict:
    from ssmtune.bench.common import parse_sizes

    if args.only_stack:
        args.mamba_ssm = args.mamba_ssm or "mamba_ssm" in args.only_stack
        args.no_peers = args.no_peers and "hf+peft" not in args.only_stack
    if args.sizes:
        parse_sizes(args.sizes)
    for name in ("warmup", "iters", "peer_warmup", "peer_iters"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)!r}")
    t_start = time.perf_counter()
    deadline = t_start + args.max_seconds
    device = torch.device(args.device)
    args.shape = "tiny" if args.small else "130m"
    if device.type != "cuda":
        # off CUDA "auto" resolves to "torch": keep one of them
        args.backends = list(dict.fromkeys("auto" if b == "torch" else b for b in args.backends))
        if "auto+graph" in args.backends:
            raise ValueError(f"--backends auto+graph needs a CUDA device, got --device {args.device}")
        if args.small:
            # a smoke test: one thread is faster than oversubscribed OpenMP on a shared small machine
            torch.set_num_threads(1)
            args.warmup, args.iters = min(args.warmup, 1), min(args.iters, 2)
            args.peer_iters = min(args.peer_iters, 1)
    mem_gib = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None
    groups = schedule(args)
    check = check_backends(args, device) if any(g[0].stack == "ssmtune" for g in groups) else {}

    rows: list[Row] = []
    merged: list[Row] = []
    if args.compare is not None:
        merged = load_rows(args.compare, skip_stacks=set(args.only_stack or STACKS))
        print(f"merged {len(merged)} rows of {args.compare} (stacks not run here)", flush=True)
    for group in groups:
        elapsed = time.perf_counter() - t_start
        v = group[0]
        if elapsed > args.max_seconds:
            note = f"skipped (budget: {elapsed:.0f} s > --max-seconds {args.max_seconds:.0f})"
            new = [Row(x, status=note) for x in group]
        elif v.stack == "hf+peft" and (skip := peer_estimate(v, rows, args.peer_max_step_s, mem_gib)) is not None:
            new = [skip]
        else:
            new = run_group(group, args, device, deadline)
        rows += new
        for r in new:
            x = r.variant
            print(f"[{time.perf_counter() - t_start:6.1f} s] {x.stack} {x.model} {x.method} {x.backend} "
                  f"B{x.batch} L{x.seqlen}: {r.status} {fmt(r.ms_step, '.2f')} ms {fmt(r.peak_gib, '.2f')} GiB",
                  flush=True)  # fmt: skip
    table = add_ratios(merged + rows)
    for d in table[: len(merged)]:
        d["source"] = str(args.compare)
    return {"check_rel_err": check, "rows": table, "table": markdown(table)}


def load_rows(path: Path, skip_stacks: set[str]) -> list[Row]:
    """Rows of an earlier report (merged rows of its own included), less the stacks this run measures again."""
    names = {f.name for f in fields(Variant)}
    row_names = {f.name for f in fields(Row)} - {"variant"}
    data = json.loads(path.read_text())
    out = []
    for d in data.get("results", data)["rows"]:
        if d.get("stack") in skip_stacks:
            continue
        out.append(Row(Variant(**{k: d[k] for k in names}), **{k: d[k] for k in row_names if k in d}))
    return out


register(Benchmark("train_step", "training step of every method on Mamba / Mamba-2 against transformers + peft "
                   "and mamba_ssm", add_args, run))  # fmt: skip
