"""One training step and generation on hybrid transformers models: ssmtune's swapped mixers against transformers + peft.

Models: a Falcon-H1-0.5B-shaped and a Granite-4.0-H-1B-shaped transformers model (``AutoConfig.for_model`` +
``AutoModelForCausalLM.from_config``: random weights, nothing downloaded), sizes (B, L) = (4, 1024) and (8, 2048);
on request (``--models qwen3_5_0.8b``) a Qwen3.5-0.8B-shaped text model, the Gated DeltaNet family: our mixers are
``HostedGDNMixer`` around ``ops.gated_delta_rule`` (backend auto: fla on CUDA when its backward works there, else
the chunked torch path; recorded per row), LoRA on ``in_proj_qkv`` / ``in_proj_z`` / ``out_proj`` and attention's
``q/k/v/o_proj`` for both stacks, and the peer's default path is fla's kernels where fla imports (``kernels``
reports ``fla_importable`` and what transformers bound), else its torch path.

Stacks, one configuration at a time, each in a fresh model, memory freed in between:

* ``ssmtune``: ``ssmtune.from_transformers(model)`` (our SSD mixers in place of transformers', sharing its parameters)
  then ``ssmtune.get_peft_model`` with ``bare`` (no adapter, see below), State-offset (h), Initial State, or LoRA r 8
  on the mixers' ``in_proj`` / ``out_proj`` and attention's ``q/k/v/o_proj`` (the targets that attach; recorded).
* ``hf+peft``: transformers' own model on its default path (mamba_ssm's Triton kernels and causal_conv1d where they
  import; which implementation transformers bound is recorded under ``kernels``) with ``peft`` LoRA r 8 on the same
  targets where peft accepts them (peft refuses ``out_proj`` on Falcon-H1; recorded per row). When mamba_ssm is
  installed without its CUDA extension (``MAMBA_SKIP_CUDA_BUILD=TRUE``), its ``__init__`` fails and transformers would
  fall back to torch; ``mamba_ssm_shell`` makes the Triton submodules importable first (see ``kernels``). Its fused
  training path also needs causal_conv1d built.
* ``hf+peft:torch``: the same peer with mamba_ssm, causal_conv1d and fla blocked, in a child process (``--no-kernels``),
  so that transformers binds its PyTorch fallbacks. On by default on a GPU only.

``bare`` is the bare step of ``ssmtune/bench/train_step.py``: the frozen model with no trainable parameter, whose
input-embedding output is made to require grad so that the backward runs through every block as an adapter's does;
no optimizer step. "x bare" (ms/step over our bare ms/step, same model and size) carries its two small biases
(no AdamW step; the gradient of block 0's input), in opposite directions.

One step = forward under bf16 autocast + LM cross-entropy + backward + AdamW step + zero_grad, each stack's loss as
its users get it: the peers' from transformers (``labels=input_ids``: fp32 logits), ours as ``ssmtune train`` computes
it (``models.lm.causal_lm_loss`` on the bf16 logits: ``ops.cross_entropy``, the same mean), with the base in bf16 and
the trainable parameters in fp32. ``--warmup`` untimed steps, then ``--steps`` timed ones (CUDA events on a GPU),
median reported; peak = ``torch.cuda.max_memory_allocated`` over the timed steps (weights, optimizer state and
activations of this configuration only). Out-of-memory is caught per configuration.

Generation: batch 1 and 16, a 128-token prompt, 128 new tokens greedy through transformers' ``generate``, on our
swapped model with a State-offset (h) adapter against the untouched transformers model; tokens/s and their ratio. A
third row, ``ssmtune:graph``, decodes ours with ``cuda_graph=True`` (the captured step on transformers' StaticCache,
opt-in for hybrids; on the CPU nothing is captured; a family that falls back to eager decoding says why in
``detail``).

A correctness gate runs first: on the small shapes, our swapped model's fp32 logits must match transformers'; if not,
no timing is reported. The JSON (``--out``) is rewritten after every row; ``--budget-s`` stops before the deadline.

GPU:  python -m ssmtune.bench.hybrid_step --out hybrid_step.json --budget-s 1500
      python -m ssmtune.bench.hybrid_step --models qwen3_5_0.8b --out hybrid_step_qwen3_5.json --budget-s 1500
CPU smoke test (seconds):  python -m ssmtune.bench.hybrid_step --small --device cpu --steps 1
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import types
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from ssmtune.bench.registry import Benchmark, register

NAME = "hybrid_step"
DESCRIPTION = "hybrid models (Falcon-H1 / Granite-4.0-H shapes): training step and generate against transformers + peft"

# tiiuae/Falcon-H1-0.5B-Instruct config.json (same architecture as -Base; transformers' FalconH1 docs table:
# 36 layers, d 1024, 8 attention / 2 KV heads, 24 Mamba heads of 64, d_state 128), the µP multipliers included.
FALCON_H1_05B = {
    "hidden_size": 1024, "num_hidden_layers": 36, "intermediate_size": 2048, "vocab_size": 32784,
    "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64,
    "mamba_d_ssm": 1536, "mamba_n_heads": 24, "mamba_d_head": 64, "mamba_d_state": 128, "mamba_n_groups": 1,
    "mamba_d_conv": 4, "mamba_expand": 2, "mamba_chunk_size": 128, "mamba_conv_bias": True, "mamba_proj_bias": False,
    "mamba_rms_norm": False, "mamba_norm_before_gate": False, "mamba_use_mlp": True,
    "attention_bias": False, "mlp_bias": False, "projectors_bias": False, "tie_word_embeddings": False,
    "rms_norm_eps": 1e-5, "max_position_embeddings": 16384,
    "embedding_multiplier": 5.656854249492381, "lm_head_multiplier": 0.0390625, "key_multiplier": 0.39062499999999994,
    "attention_in_multiplier": 1.0, "attention_out_multiplier": 0.9375, "ssm_in_multiplier": 1.25,
    "ssm_out_multiplier": 0.23570226039551587, "mlp_multipliers": [0.8838834764831844, 0.5859375],
    "ssm_multipliers": [0.3535533905932738, 0.25, 0.3535533905932738, 0.5, 0.3535533905932738],
}  # fmt: skip
# ibm-granite/granite-4.0-h-1b config.json: 40 layers (attention at 5, 15, 25, 35, Mamba-2 elsewhere), d 1536, 12 / 4
# heads, 48 Mamba heads of 64, d_state 128, dense MLP (no experts), tied embeddings, no positional encoding. The four
# scalar multipliers are those of the dense granite-4.0-1b twin; they scale activations and do not change the timings.
GRANITE_4_H_1B = {
    "hidden_size": 1536, "num_hidden_layers": 40, "intermediate_size": 4096, "shared_intermediate_size": 4096,
    "num_local_experts": 0, "num_experts_per_tok": 0, "vocab_size": 100352, "tie_word_embeddings": True,
    "num_attention_heads": 12, "num_key_value_heads": 4, "position_embedding_type": "nope",
    "mamba_n_heads": 48, "mamba_d_head": 64, "mamba_d_state": 128, "mamba_n_groups": 1, "mamba_d_conv": 4,
    "mamba_expand": 2, "mamba_chunk_size": 256, "mamba_conv_bias": True, "mamba_proj_bias": False,
    "max_position_embeddings": 131072,
    "layer_types": ["mamba"] * 5 + ["attention"] + (["mamba"] * 9 + ["attention"]) * 3 + ["mamba"] * 4,
    "embedding_multiplier": 12.0, "attention_multiplier": 0.0078125, "residual_multiplier": 0.22,
    "logits_scaling": 8.0,
}  # fmt: skip
# Qwen/Qwen3.5-0.8B config.json, its text_config (the language model of the released vision-language checkpoint; same
# values as transformers' Qwen3_5TextConfig takes them): 24 layers of three Gated DeltaNet then one gated attention,
# d 1024, 16 key / 16 value GDN heads of 128, 8 attention / 2 KV heads of 256, partial (0.25) interleaved M-RoPE,
# tied embeddings.
QWEN3_5_08B = {
    "hidden_size": 1024, "num_hidden_layers": 24, "intermediate_size": 3584, "vocab_size": 248320,
    "tie_word_embeddings": True, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 256,
    "linear_num_key_heads": 16, "linear_num_value_heads": 16, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
    "linear_conv_kernel_dim": 4, "layer_types": (["linear_attention"] * 3 + ["full_attention"]) * 6,
    "hidden_act": "silu", "rms_norm_eps": 1e-6, "attention_bias": False, "max_position_embeddings": 262144,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                        "mrope_section": [11, 11, 10], "mrope_interleaved": True},
}  # fmt: skip
# model key -> (transformers model_type, config)
SHAPES = {
    "falcon_h1_0.5b": ("falcon_h1", FALCON_H1_05B),
    "granite_4.0_h_1b": ("granitemoehybrid", GRANITE_4_H_1B),
    "qwen3_5_0.8b": ("qwen3_5_text", QWEN3_5_08B),
}
DEFAULT_MODELS = ["falcon_h1_0.5b", "granite_4.0_h_1b"]  # the Gated DeltaNet model runs on request
# tiny shapes of the same families, for the CPU smoke test and the correctness gate
SMALL_SHAPES = {
    "falcon_h1_0.5b": ("falcon_h1", {
        "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 256,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "mamba_d_ssm": 128, "mamba_n_heads": 8,
        "mamba_d_head": 16, "mamba_d_state": 16, "mamba_n_groups": 1, "mamba_chunk_size": 16,
        "tie_word_embeddings": False,
    }),
    "granite_4.0_h_1b": ("granitemoehybrid", {
        "hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 128, "shared_intermediate_size": 128,
        "num_local_experts": 0, "num_experts_per_tok": 0, "vocab_size": 256, "tie_word_embeddings": True,
        "num_attention_heads": 4, "num_key_value_heads": 2, "position_embedding_type": "nope",
        "layer_types": ["mamba", "attention", "mamba", "mamba"], "mamba_n_heads": 8, "mamba_d_head": 16,
        "mamba_d_state": 16, "mamba_n_groups": 1, "mamba_chunk_size": 16,
    }),
    "qwen3_5_0.8b": ("qwen3_5_text", {
        "hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 128, "vocab_size": 256,
        "tie_word_embeddings": True, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
        "linear_num_key_heads": 4, "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
        "linear_conv_kernel_dim": 4, "layer_types": ["linear_attention"] * 3 + ["full_attention"],
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                            "mrope_section": [2, 1, 1], "mrope_interleaved": True},
    }),
}  # fmt: skip
SIZES = [(4, 1024), (8, 2048)]
SMALL_SIZES = [(1, 16), (2, 32)]
METHODS = ("bare", "state_offset_h", "initial_state", "lora")
STACKS = ("ssmtune", "hf+peft", "hf+peft:torch")
LORA_TARGETS = ["in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj"]
# Gated DeltaNet: its q|k|v and gate projections and its output (the 16-wide beta / decay inputs are left out)
GDN_LORA_TARGETS = ["in_proj_qkv", "in_proj_z", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj"]
MODEL_LORA_TARGETS = {"qwen3_5_0.8b": GDN_LORA_TARGETS}
KERNEL_PACKAGES = ("mamba_ssm", "causal_conv1d", "fla")
# kernel-report key -> transformers modeling module of each hybrid family
HYBRID_MODULES = {
    "falcon_h1": "falcon_h1.modeling_falcon_h1",
    "granitemoehybrid": "granitemoehybrid.modeling_granitemoehybrid",
    "qwen3_5_text": "qwen3_5.modeling_qwen3_5",
}
LR = 1e-4
# targets of the issue: State-offset (h) over our bare step; tokens/s over the peer's with / without mamba_ssm, at no
# more memory; generation with a state adapter over transformers' generate
TARGET_VS_BARE = 1.10
TARGET_VS_PEER = 1.5
TARGET_VS_PEER_TORCH = 10.0
# the Gated DeltaNet family's (tokens/s over the peer with fla, over its torch path)
MODEL_PEER_TARGETS = {"qwen3_5_0.8b": (1.3, 5.0)}
TARGET_GENERATE = 1.0
GATE_TOL = {"cpu": 1e-4, "cuda": 1e-2}
"""Largest |ours - transformers| of the fp32 mixer outputs and logits, relative to their max |transformers|. On a GPU
both sides run Triton kernels whose fp32 dots may use TF32 (~1e-3 relative)."""


def add_args(parser: argparse.ArgumentParser, *, standalone: bool = False) -> None:
    """The options; ``standalone``: also ``--device`` and ``--out``, which ``ssmtune bench`` adds itself."""
    parser.add_argument("--small", action="store_true", help="tiny shapes and sizes (CPU smoke test)")
    if standalone:
        parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
        parser.add_argument("--out", default="hybrid_step.json")
    parser.add_argument("--models", nargs="+", choices=list(SHAPES), default=DEFAULT_MODELS,
                        help=f"default: {' '.join(DEFAULT_MODELS)}")  # fmt: skip
    parser.add_argument("--sizes", nargs="+", default=None, help="BxL, e.g. 4x1024 8x2048")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--stacks", nargs="+", choices=STACKS, default=None,
                        help="default: all three on a GPU, ssmtune and hf+peft on the CPU")  # fmt: skip
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration (median reported)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="time every configuration this many times, in turn (each time built and warmed again), and report the "
        "median over all their steps: a machine whose speed drifts during the run then moves every row alike (the "
        "hf+peft:torch rows run once)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed steps first (Triton compilation, allocator); default 3, small 1",
    )
    parser.add_argument("--torch-steps", type=int, default=3, help="timed steps of the hf+peft:torch peer")
    parser.add_argument("--torch-warmup", type=int, default=1)
    parser.add_argument(
        "--max-step-s",
        type=float,
        default=60.0,
        help="skip a larger size whose step, scaled by tokens from a smaller one, would take longer",
    )
    parser.add_argument("--budget-s", type=float, default=None, help="stop cleanly before this many seconds")
    parser.add_argument("--no-generate", action="store_true")
    parser.add_argument("--gen-batches", nargs="+", type=int, default=None, help="default 1 16 (small: 1 2)")
    parser.add_argument("--gen-prompt", type=int, default=None, help="prompt tokens (default 128, small 8)")
    parser.add_argument("--gen-new", type=int, default=None, help="new tokens (default 128, small 4)")
    parser.add_argument("--gen-reps", type=int, default=None, help="timed generate calls, median reported (2, small 1)")
    parser.add_argument(
        "--no-kernels",
        action="store_true",
        help="block mamba_ssm, causal_conv1d and fla before transformers is imported (its torch path)",
    )
    parser.add_argument("--skip-gate", action="store_true", help=argparse.SUPPRESS)


# ----------------------------------------------------------------------------------------------------- environment


def block_kernels() -> bool:
    """Make ``import mamba_ssm`` / ``causal_conv1d`` / ``fla`` fail, so transformers binds its torch fallbacks. Returns
    False when a transformers hybrid modeling module was imported already (then it has bound its kernels)."""
    for pkg in KERNEL_PACKAGES:
        sys.modules[pkg] = None  # type: ignore[assignment]
    return not any(f"transformers.models.{m}" in sys.modules for m in HYBRID_MODULES.values())


def mamba_ssm_shell() -> str:
    """Make ``import mamba_ssm`` work when only its pure-Python part is installed (``MAMBA_SKIP_CUDA_BUILD=TRUE``).

    ``mamba_ssm/__init__.py`` imports the CUDA selective-scan extension (Mamba-1's) unconditionally, so without it
    transformers finds no mamba_ssm and binds its torch fallbacks. A bare package module whose ``__path__`` is the
    installed directory lets transformers import the Triton SSD submodules it binds, the same code a full install
    runs. Must run before transformers' hybrid modeling modules are imported. Returns what it did."""
    if "mamba_ssm" in sys.modules:
        return "already imported"
    try:
        importlib.import_module("mamba_ssm")
        return "full package"
    except ImportError as e:
        spec = importlib.util.find_spec("mamba_ssm")
        if spec is None or not spec.submodule_search_locations:
            return f"missing: {type(e).__name__}: {str(e)[:160]}"
        for name in [n for n in sys.modules if n == "mamba_ssm" or n.startswith("mamba_ssm.")]:
            del sys.modules[name]  # the half-imported package
        shell = types.ModuleType("mamba_ssm")
        shell.__path__ = list(spec.submodule_search_locations)
        shell.__file__, shell.__spec__ = spec.origin, spec
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            shell.__version__ = importlib.metadata.version("mamba_ssm")
        sys.modules["mamba_ssm"] = shell
        return f"shell package (its __init__ failed: {type(e).__name__}: {str(e)[:120]})"


def _version(pkg: str) -> str:
    try:
        mod = importlib.import_module(pkg)
    except Exception as e:  # noqa: BLE001 - ImportError, or a CUDA extension that fails to load
        return f"missing: {type(e).__name__}: {str(e)[:160]}"
    if hasattr(mod, "__version__"):
        return str(mod.__version__)
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        return importlib.metadata.version(pkg)
    return "unknown"


def versions() -> dict:
    return {p: _version(p) for p in ("torch", "triton", "transformers", "peft", *KERNEL_PACKAGES)} | {
        "python": platform.python_version()
    }


def _bound(fn) -> str:
    """The implementation a transformers kernel wrapper calls: the fallback decorator keeps it in a closure cell
    named ``implementation`` (transformers >= 5.2x); older releases bind the package's function or None directly."""
    if fn is None:
        return "unavailable"
    seen, todo = set(), [fn]
    while todo:
        f = todo.pop()
        if id(f) in seen or not callable(f):
            continue
        seen.add(id(f))
        code, cells = getattr(f, "__code__", None), getattr(f, "__closure__", None)
        if code is not None and cells:
            free = dict(zip(code.co_freevars, cells, strict=False))
            if "implementation" in free:
                impl = free["implementation"].cell_contents
                return f"{impl.__module__}.{impl.__qualname__}"
            todo += [c.cell_contents for c in cells if callable(getattr(c, "cell_contents", None))]
        if hasattr(f, "__wrapped__"):
            todo.append(f.__wrapped__)
        if isinstance(f, torch.nn.Module):  # a hub-kernel wrapper module: the function is its class's forward
            fwd = type(f).__dict__.get("forward")
            todo.append(getattr(fwd, "__func__", fwd))
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', '?')}"


def kernel_report() -> dict:
    """Which SSD / gated-delta / conv implementation transformers bound in each hybrid modeling module (fla's where
    it imports, else transformers' torch functions), and the packages."""
    out: dict = {pkg: _version(pkg) for pkg in KERNEL_PACKAGES}
    out["fla_importable"] = not out["fla"].startswith("missing")
    # the module-level names differ between transformers releases
    names = ("mamba_chunk_scan_combined", "mamba2_chunk_scan", "mamba_split_conv1d_scan_combined",
             "mamba2_split_conv1d_scan_combined", "selective_state_update", "mamba2_selective_state_update",
             "causal_conv1d_fn", "causal_conv1d_update", "torch_chunk_gated_delta_rule",
             "torch_recurrent_gated_delta_rule")  # fmt: skip
    for mt, mod in HYBRID_MODULES.items():
        try:
            m = importlib.import_module(f"transformers.models.{mod}")
        except Exception as e:  # noqa: BLE001
            out[mt] = f"missing: {type(e).__name__}: {str(e)[:160]}"
            continue
        bound = {n: _bound(getattr(m, n)) for n in names if hasattr(m, n)}
        if hasattr(m, "is_fast_path_available"):
            bound["is_fast_path_available"] = bool(m.is_fast_path_available)
        out[mt] = bound
        # whether the peer's training step runs the kernels (the torch fallbacks live in transformers' modules)
        out[f"{mt}_uses"] = {pkg: any(str(v).startswith(pkg + ".") for v in bound.values()) for pkg in KERNEL_PACKAGES}
    return out


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------------- models


def is_gdn(model: str) -> bool:
    """A Gated DeltaNet model (Qwen3.5)."""
    return SHAPES[model][0].startswith("qwen3_5")


def gdn_backend(model: str, device: torch.device, grad: bool) -> str | None:
    """The backend ``ops.gated_delta_rule(backend="auto")`` picks for our mixers of a Gated DeltaNet model (None for
    the others): ``gated_delta.fla.fla_usable``, else the torch path."""
    if not is_gdn(model):
        return None
    from ssmtune.ops.gated_delta.fla import fla_usable

    cfg = SHAPES[model][1]
    dims = (cfg["linear_key_head_dim"], cfg["linear_value_head_dim"])
    return "fla" if fla_usable(device, grad, head_dims=dims) else "torch"


def peer_gdn_impl() -> str:
    """The chunked gated delta rule transformers bound for Qwen3.5: fla's (used on CUDA inputs) or its torch one."""
    m = importlib.import_module(f"transformers.models.{HYBRID_MODULES['qwen3_5_text']}")
    return _bound(m.torch_chunk_gated_delta_rule)


def from_transformers_fn() -> tuple[Callable | None, str]:
    """``ssmtune.from_transformers`` (and the reason ours are skipped: none)."""
    from ssmtune.models.hybrid import from_transformers

    return from_transformers, ""


def hf_model(model: str, small: bool, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, cfg = (SMALL_SHAPES if small else SHAPES)[model]
    config = AutoConfig.for_model(model_type, **cfg, use_cache=False)
    torch.manual_seed(0)
    with torch.device(device):
        m = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return m.to(device=device, dtype=dtype)


def ours_config(method: str, targets: list[str] | None = None):
    from ssmtune.methods import InitialStateConfig, LoraConfig, StateOffsetConfig

    if method == "state_offset_h":
        return StateOffsetConfig(variant="h")
    if method == "initial_state":
        return InitialStateConfig()
    if method == "lora":
        return LoraConfig(r=8, target_modules=list(targets or LORA_TARGETS))
    raise ValueError(f"unknown method {method!r}; known: {METHODS[1:]}")


def build_ours(model: str, method: str, small: bool, device: torch.device, targets: list[str] | None = None):
    from ssmtune.core.peft_model import get_peft_model

    fn, why = from_transformers_fn()
    if fn is None:
        raise RuntimeError(why)
    m = fn(hf_model(model, small, device, torch.bfloat16))
    if method == "bare":
        return m.requires_grad_(False)
    m = get_peft_model(m, ours_config(method, targets))
    for p in m.parameters():  # the trainer's bf16 recipe: trainables in fp32 under autocast
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return m


def build_peer(model: str, method: str, small: bool, device: torch.device, targets: list[str] | None = None):
    import peft

    m = hf_model(model, small, device, torch.bfloat16)
    if method == "bare":
        return m.requires_grad_(False)
    if method != "lora":
        raise ValueError(f"the peer runs 'bare' and 'lora' only, got {method!r}")
    # peft keeps LoRA weights in fp32 on a bf16 base (autocast_adapter_dtype=True)
    return peft.get_peft_model(m, peft.LoraConfig(r=8, target_modules=list(targets or LORA_TARGETS)))


_TARGETS: dict[tuple[str, str], list[str]] = {}


def lora_targets(stack: str, model: str) -> list[str]:
    """The model's LoRA targets that the stack attaches on this model family, tried one by one on the small shape."""
    key = (stack, model)
    if key not in _TARGETS:
        build = build_ours if stack == "ssmtune" else build_peer
        ok = []
        for t in MODEL_LORA_TARGETS.get(model, LORA_TARGETS):
            with contextlib.suppress(Exception):
                build(model, "lora", True, torch.device("cpu"), [t])
                ok.append(t)
        _TARGETS[key] = ok
    return _TARGETS[key]


# ------------------------------------------------------------------------------------------------------------ gate


def _first_tensor(x):
    return x if isinstance(x, torch.Tensor) else next((t for t in x if isinstance(t, torch.Tensor)), None)


def _forward_capturing(m: torch.nn.Module, paths: list[str], ids: torch.Tensor) -> tuple[torch.Tensor, list]:
    """Logits and the output of each module in ``paths`` (forward hooks)."""
    outs: dict[str, torch.Tensor] = {}
    hooks = [m.get_submodule(p).register_forward_hook(lambda mod, i, o, p=p: outs.__setitem__(p, _first_tensor(o)))
             for p in paths]  # fmt: skip
    try:
        with torch.no_grad():
            logits = m(input_ids=ids).logits.float()  # [B, L, V]
    finally:
        for h in hooks:
            h.remove()
    return logits, [outs.get(p) for p in paths]


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


def correctness_gate(models: list[str], device: torch.device) -> dict:
    """Our swapped model against transformers' on the small shapes, fp32, eval, one forward of 2 x 64: each recurrent
    mixer's output and the logits, relative to their largest magnitude."""
    fn, why = from_transformers_fn()
    if fn is None:
        return {"status": f"skipped: {why}", "passed": None}
    tol = GATE_TOL.get(device.type, GATE_TOL["cuda"])
    out: dict = {"tolerance": tol, "models": {}}
    ok = True
    for model in models:
        m = None
        try:
            m = hf_model(model, True, device, torch.float32).eval()
            # unit-scale Linears: at transformers' init (std 0.02) the mixers' outputs are ~1e-4, too small to test
            g = torch.Generator(device=device).manual_seed(4)
            with torch.no_grad():
                for lin in m.modules():
                    if isinstance(lin, torch.nn.Linear):
                        lin.weight.normal_(0.0, lin.in_features**-0.5, generator=g)
            vocab = SMALL_SHAPES[model][1]["vocab_size"]
            ids = torch.randint(1, vocab, (2, 64), generator=torch.Generator().manual_seed(2)).to(device)
            paths = [n for n, mod in m.named_modules() if hasattr(mod, "A_log") and hasattr(mod, "conv1d")]
            ref, ref_mix = _forward_capturing(m, paths, ids)
            fn(m)
            got, got_mix = _forward_capturing(m, paths, ids)
            if not paths or any(t is None for t in got_mix):
                raise RuntimeError(f"recurrent mixers {paths} did not all run after the swap")
            mix = max(_rel(g, r) for g, r in zip(got_mix, ref_mix, strict=True))
            rel = _rel(got, ref)
            passed = max(mix, rel) <= tol
            out["models"][model] = {"mixers": len(paths), "max_rel_err_mixer": mix, "max_rel_err_logits": rel,
                                    "passed": passed}  # fmt: skip
            ok &= passed
        except Exception as e:  # noqa: BLE001
            out["models"][model] = {"error": f"{type(e).__name__}: {str(e)[:300]}", "passed": False}
            ok = False
        finally:
            m = None
            free_memory(device)
    out["passed"] = ok
    out["status"] = "passed" if ok else "failed"
    return out


# ------------------------------------------------------------------------------------------------------------ step


def make_step(model: torch.nn.Module, method: str, ids: torch.Tensor, *, ours: bool) -> tuple[Callable[..., None], int]:
    """The step closure (``step(row)`` also records the loss and the dead parameters) and the trainable count;
    ``ours``: the loss of ``ssmtune train`` (``causal_lm_loss`` on the logits), else transformers' (``labels=``)."""
    from ssmtune.models.lm import causal_lm_loss

    device = ids.device
    params = [p for p in model.parameters() if p.requires_grad]
    if method == "bare":
        # no trainable parameter: the embedding output requires grad, so the backward runs through every block
        model.get_input_embeddings().register_forward_hook(lambda mod, inp, out: out.detach().requires_grad_())
    elif not params:
        raise RuntimeError(f"method {method!r} attached no trainable parameter")
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0) if params else None
    model.train()

    def step(row: dict | None = None) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=None if ours else ids, use_cache=False)
        loss = causal_lm_loss(out.logits, ids) if ours else out.loss
        loss.backward()
        if row is not None:
            row["loss"] = loss.item()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {row['loss']!r}")
            row["dead_params"] = sum(p.grad is None for p in params)
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


def timed_ms(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        sync(device)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t0)


def _error(row: dict, e: BaseException) -> None:
    if isinstance(e, torch.OutOfMemoryError):
        row["status"] = "out of memory"
    else:
        msg = str(e).splitlines()[0][:200] if str(e) else ""
        row["status"] = f"error: {type(e).__name__}: {msg}"
        row["detail"] = (row.get("detail", "") + " | " + traceback.format_exc(limit=-3)[-1500:]).strip(" |")
    row["ms_step"] = row["tokens_per_s"] = None


def run_row(row: dict, args: argparse.Namespace, device: torch.device, deadline: float) -> None:
    """Build, warm up and time one configuration in place of ``row``, adding its steps to those of earlier rounds
    (``ms_all``; ``round_ms``: each round's median); frees everything it built."""
    torch_peer = args.no_kernels
    warmup = args.warmup if args.warmup is not None else 1 if args.small else 3
    warmup, steps = (args.torch_warmup, args.torch_steps) if torch_peer else (warmup, args.steps)
    build = build_ours if row["stack"] == "ssmtune" else build_peer
    vocab = (SMALL_SHAPES if args.small else SHAPES)[row["model"]][1]["vocab_size"]
    ids = torch.randint(1, vocab, (row["batch"], row["seqlen"]), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)  # [B, L]
    model = step = None
    free_memory(device)
    try:
        first = not row.get("round_ms")  # the details are written once, not per round
        targets = None
        if row["method"] == "lora":
            targets = lora_targets(row["stack"], row["model"])
            if first:
                row["detail"] = "targets " + "+".join(targets)
            if not targets:
                raise RuntimeError(f"no LoRA target of {MODEL_LORA_TARGETS.get(row['model'], LORA_TARGETS)} attaches")
        if first and row["stack"] == "ssmtune" and (backend := gdn_backend(row["model"], device, grad=True)):
            row["detail"] = (row["detail"] + f" | gated_delta_rule backend {backend} (auto)").strip(" |")
        elif first and row["stack"] != "ssmtune" and is_gdn(row["model"]):
            row["detail"] = (row["detail"] + f" | transformers' gated delta rule: {peer_gdn_impl()}").strip(" |")
        model = build(row["model"], row["method"], args.small, device, targets)
        step, row["trainable_params"] = make_step(model, row["method"], ids, ours=row["stack"] == "ssmtune")
        row["warmup_ms"] = []
        for i in range(max(1, warmup)):
            if i > 0 and time.perf_counter() > deadline:
                break
            row["warmup_ms"].append(timed_ms(lambda i=i: step(row if i == 0 else None), device))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        ms = []
        for _ in range(max(1, steps)):
            if ms and time.perf_counter() + ms[-1] / 1e3 > deadline:
                break
            ms.append(timed_ms(step, device))
        row["ms_all"] = row.get("ms_all", []) + ms
        row["round_ms"] = row.get("round_ms", []) + [statistics.median(ms)]
        row["ms_step"] = statistics.median(row["ms_all"])
        row["tokens_per_s"] = row["batch"] * row["seqlen"] / (row["ms_step"] / 1e3)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) / 2**30
            row["peak_gib"] = max(peak, row["peak_gib"] or 0.0)
        row["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - one failing configuration must not lose the others
        if row.get("round_ms"):  # a later round: keep what the earlier ones measured
            row["detail"] = (row["detail"] + f" | round {len(row['round_ms']) + 1}: {type(e).__name__}").strip(" |")
        else:
            _error(row, e)
    finally:
        model = step = None
        free_memory(device)


# ------------------------------------------------------------------------------------------------------ generation


def run_generation(model: str, batch: int, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """transformers' generate on the untouched model, then on our swapped model with a State-offset (h) adapter:
    ``ssmtune`` decodes eagerly (transformers' default loop and cache), ``ssmtune:graph`` with ``cuda_graph=True``
    (the captured step on transformers' StaticCache; on the CPU its static buffers without capture; a family that
    falls back to eager decoding says so in ``detail``)."""
    prompt = args.gen_prompt or (8 if args.small else 128)
    new = args.gen_new or (4 if args.small else 128)
    vocab = (SMALL_SHAPES if args.small else SHAPES)[model][1]["vocab_size"]
    ids = torch.randint(1, vocab, (batch, prompt), generator=torch.Generator().manual_seed(3)).to(device)
    rows = []
    for stack in ("hf", "ssmtune", "ssmtune:graph"):
        row = {"model": model, "stack": stack, "batch": batch, "prompt": prompt, "new_tokens": new,
               "method": "none" if stack == "hf" else "state_offset_h", "status": "ok"}  # fmt: skip
        m = None
        free_memory(device)
        if stack != "hf" and (why := from_transformers_fn()[1]):
            rows.append(row | {"status": f"skipped: {why}", "tokens_per_s": None})
            continue
        try:
            if stack == "hf":
                m = hf_model(model, args.small, device, torch.bfloat16)
            else:
                from ssmtune.core.peft_model import get_peft_model

                fn = from_transformers_fn()[0]
                m = get_peft_model(
                    fn(hf_model(model, args.small, device, torch.bfloat16)), ours_config("state_offset_h")
                )
                m = m.to(torch.bfloat16)  # the adapter in the model's dtype, as served
                if backend := gdn_backend(model, device, grad=False):
                    row["detail"] = f"gated_delta_rule backend {backend} (auto; decode steps on the recurrent path)"
            m.eval()
            kw = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "use_cache": True,
                  "pad_token_id": 0, "attention_mask": torch.ones_like(ids)}  # fmt: skip
            if stack == "ssmtune:graph":
                kw["cuda_graph"] = True

            def gen(m=m, kw=kw) -> None:
                with torch.no_grad():
                    out = m.generate(ids, **kw)
                if out.shape[1] != prompt + new:
                    raise RuntimeError(f"generate returned {out.shape[1] - prompt} new tokens, expected {new}")

            # warm-up on the same prompt, few new tokens: the kernels compile (prefill and decode), the allocator warms
            warm = min(new, 4)
            with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                m.generate(ids, **(kw | {"max_new_tokens": warm, "min_new_tokens": warm}))
            if stack == "ssmtune:graph" and (fell := [str(w.message) for w in caught if "eager" in str(w.message)]):
                row["detail"] = (row.get("detail", "") + " | " if row.get("detail") else "") + fell[0][:200]
            ms = [timed_ms(gen, device) for _ in range(max(1, args.gen_reps or (1 if args.small else 2)))]
            row["ms"] = statistics.median(ms)
            row["tokens_per_s"] = batch * new / (row["ms"] / 1e3)
        except Exception as e:  # noqa: BLE001
            _error(row, e)
            row["tokens_per_s"] = None
        finally:
            m = None
            free_memory(device)
        rows.append(row)
    hf = rows[0]
    for ours in rows[1:]:
        ok = ours.get("tokens_per_s") and hf.get("tokens_per_s")
        ours["vs_hf"] = ours["tokens_per_s"] / hf["tokens_per_s"] if ok else None
    return rows


# --------------------------------------------------------------------------------------------------------- results


def _key(r: dict) -> tuple:
    return r["model"], r["batch"], r["seqlen"]


def add_ratios(rows: list[dict]) -> None:
    """vs_bare (ms over our bare ms), vs_peer / vs_peer_torch (tokens/s over the peer LoRA's), mem_vs_* (peak over
    the peer's), on every measured row of ours."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("tokens_per_s")]
    bare = {_key(r): r for r in ok if r["stack"] == "ssmtune" and r["method"] == "bare"}
    peers = {s: {_key(r): r for r in ok if r["stack"] == s and r["method"] == "lora"} for s in STACKS[1:]}
    for r in rows:
        r["vs_bare"] = r["vs_peer"] = r["mem_vs_peer"] = r["vs_peer_torch"] = r["mem_vs_peer_torch"] = None
        if r not in ok or r["stack"] != "ssmtune":
            continue
        b = bare.get(_key(r))
        r["vs_bare"] = r["ms_step"] / b["ms_step"] if b else None
        for s, suffix in (("hf+peft", ""), ("hf+peft:torch", "_torch")):
            p = peers[s].get(_key(r))
            if p:
                r["vs_peer" + suffix] = r["tokens_per_s"] / p["tokens_per_s"]
                if r.get("peak_gib") and p.get("peak_gib"):
                    r["mem_vs_peer" + suffix] = r["peak_gib"] / p["peak_gib"]


def targets_report(rows: list[dict], gen: list[dict]) -> list[dict]:
    """One line per target and (model, size): the measured value and pass / fail (None when not measured)."""
    out = []
    for r in rows:
        if r["stack"] != "ssmtune" or r["method"] != "state_offset_h":
            continue
        where = {"model": r["model"], "batch": r["batch"], "seqlen": r["seqlen"]}
        v = r.get("vs_bare")
        out.append(where | {"target": f"x bare <= {TARGET_VS_BARE}", "value": v,
                            "passed": None if v is None else v <= TARGET_VS_BARE})  # fmt: skip
        goals = MODEL_PEER_TARGETS.get(r["model"], (TARGET_VS_PEER, TARGET_VS_PEER_TORCH))
        for suffix, goal in zip(("", "_torch"), goals, strict=True):
            v, mem = r.get("vs_peer" + suffix), r.get("mem_vs_peer" + suffix)
            passed = None if v is None else v >= goal and (mem is None or mem <= 1.0)
            out.append(where | {"target": f"tokens/s >= {goal}x hf+peft{suffix.replace('_', ':')}, memory <= peer's",
                                "value": v, "mem_ratio": mem, "passed": passed})  # fmt: skip
    for g in gen:
        if g["stack"] != "hf":
            v = g.get("vs_hf")
            out.append({"model": g["model"], "batch": g["batch"],
                        "target": f"generate ({g['stack']}) >= {TARGET_GENERATE}x hf",
                        "value": v, "passed": None if v is None else v >= TARGET_GENERATE})  # fmt: skip
    return out


def write_json(path: str, result: dict) -> None:
    """Atomically: a temporary file in the same folder, then os.replace."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=p.name + ".", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(result, f, indent=1, default=str)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _f(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _status(r: dict) -> str:
    """The row's status, with each round's median step when it was timed in more than one round."""
    rounds = r.get("round_ms") or []
    return r["status"] + (f" (rounds: {' / '.join(f'{m:.1f}' for m in rounds)} ms)" if len(rounds) > 1 else "")


def table(result: dict) -> str:
    head = "| model | B x L | stack | method | ms/step | tok/s | peak GiB | x bare | x peer | mem/peer | x peer:torch |"
    lines = [head + " status |", "|" + "---|" * 12]
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {r['batch']}x{r['seqlen']} | {r['stack']} | {r['method']} | {_f(r.get('ms_step'), '.1f')}"
            f" | {_f(r.get('tokens_per_s'), ',.0f')} | {_f(r.get('peak_gib'), '.2f')} | {_f(r.get('vs_bare'), '.3f')}"
            f" | {_f(r.get('vs_peer'), '.2f')} | {_f(r.get('mem_vs_peer'), '.2f')} | {_f(r.get('vs_peer_torch'), '.1f')}"
            f" | {_status(r)} |"
        )
    if result.get("generation"):
        lines += ["", "| model | batch | stack | tok/s | x hf | status |", "|" + "---|" * 6]
        for g in result["generation"]:
            lines.append(f"| {g['model']} | {g['batch']} | {g['stack']} | {_f(g.get('tokens_per_s'), ',.0f')} | "
                         f"{_f(g.get('vs_hf'), '.2f')} | {g['status']} |")  # fmt: skip
    gate = result.get("gate") or {}
    lines.append(f"\ncorrectness gate: {gate.get('status')}")
    for t in result.get("targets", []):
        size = f" {t['batch']}x{t['seqlen']}" if "seqlen" in t else f" batch {t['batch']}"
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[t["passed"]]
        lines.append(f"target {t['model']}{size}: {t['target']}: {_f(t['value'], '.3f')} {verdict}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------- run


def schedule(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Rows in order: per size and model, ours (bare first) then the peer, then the torch-path peer's rows."""
    sizes = [tuple(map(int, s.lower().split("x"))) for s in args.sizes] if args.sizes else None
    sizes = sizes or (SMALL_SIZES if args.small else SIZES)
    stacks = args.stacks or (list(STACKS) if device.type == "cuda" else list(STACKS[:2]))
    rows = []
    for b, seqlen in sizes:
        for model in args.models:
            for stack in stacks:
                methods = args.methods if stack == "ssmtune" else [m for m in ("lora",) if m in args.methods]
                for method in methods:
                    rows.append({"model": model, "stack": stack, "method": method, "batch": b, "seqlen": seqlen,
                                 "status": "pending", "ms_step": None, "tokens_per_s": None, "peak_gib": None,
                                 "trainable_params": None, "loss": None, "dead_params": None, "detail": ""})  # fmt: skip
    # the torch-path peer runs last, in a child process
    return sorted(rows, key=lambda r: r["stack"] == "hf+peft:torch")


def too_slow(row: dict, rows: list[dict], max_step_s: float, mem_gib: float | None) -> str | None:
    """Why a row would be skipped: its step time or peak memory, scaled by tokens from a smaller measured row of the
    same stack and method, over ``max_step_s`` or the device's memory; or a smaller one ran out of memory."""
    tokens = row["batch"] * row["seqlen"]
    same = [r for r in rows if r is not row and r["stack"] == row["stack"] and r["model"] == row["model"]
            and r["method"] == row["method"] and r["batch"] * r["seqlen"] < tokens]  # fmt: skip
    for r in same:
        scale = tokens / (r["batch"] * r["seqlen"])
        if r["status"] == "out of memory":
            return "skipped (a smaller size ran out of memory)"
        if r.get("ms_step") and r["ms_step"] / 1e3 * scale > max_step_s:
            return f"skipped (estimated {r['ms_step'] / 1e3 * scale:.0f} s/step over --max-step-s {max_step_s:g})"
        if r.get("peak_gib") and mem_gib and r["peak_gib"] * scale > mem_gib:
            return f"skipped (estimated {r['peak_gib'] * scale:.0f} GiB over the device's {mem_gib:.0f} GiB)"
    return None


def run_torch_peer(rows: list[dict], args: argparse.Namespace, deadline: float) -> None:
    """The hf+peft:torch rows, measured by a child process with mamba_ssm and causal_conv1d blocked."""
    sizes = [
        f"{b}x{seqlen}" for b, seqlen in sorted({(r["batch"], r["seqlen"]) for r in rows}, key=lambda t: t[0] * t[1])
    ]
    models = sorted({r["model"] for r in rows}, key=list(SHAPES).index)
    left = deadline - time.perf_counter()
    if left < 30:
        for r in rows:
            r["status"] = "skipped (budget)"
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "torch_peer.json"
        cmd = [sys.executable, "-m", "ssmtune.bench.hybrid_step", "--no-kernels", "--stacks", "hf+peft",
               "--methods", "lora", "--models", *models, "--sizes", *sizes, "--no-generate", "--skip-gate",
               "--torch-steps", str(args.torch_steps), "--torch-warmup", str(args.torch_warmup),
               "--max-step-s", str(args.max_step_s), "--out", str(out),
               "--device", args.device]  # fmt: skip
        if args.small:
            cmd.append("--small")
        if left != float("inf"):
            cmd += ["--budget-s", str(int(left - 10))]
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        try:
            timeout = None if left == float("inf") else max(left - 5, 1)
            proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=timeout)
            child = json.loads(out.read_text()) if out.exists() else None
            err = "" if proc.returncode == 0 else f"child exit {proc.returncode}: {proc.stderr[-400:]}"
        except subprocess.TimeoutExpired:
            child, err = json.loads(out.read_text()) if out.exists() else None, "child timed out (budget)"
    got = {(r["model"], r["batch"], r["seqlen"]): r for r in (child or {}).get("rows", [])}
    for r in rows:
        c = got.get(_key(r))
        if c is None:
            r["status"] = f"error: no row from the torch-path child ({err or 'none written'})"
            continue
        r.update({k: v for k, v in c.items() if k not in ("stack",)})
        r["kernels"] = (child or {}).get("kernels")


def run(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    deadline = t0 + args.budget_s if args.budget_s else float("inf")
    if args.no_kernels and not block_kernels():
        raise ValueError("--no-kernels: transformers' hybrid modeling modules were imported before it took effect")
    shell = "off (--no-kernels)" if args.no_kernels else mamba_ssm_shell()
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
    result: dict = {
        "name": NAME,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if getattr(args, "argv", None) is None else args.argv,
        "versions": versions(),
        "kernels": kernel_report() | {"mamba_ssm_import": shell},
        "shapes": {
            k: {"model_type": v[0], **v[1]}
            for k, v in (SMALL_SHAPES if args.small else SHAPES).items()
            if k in args.models
        },
        "small": args.small,
        "no_kernels": args.no_kernels,
        "rows": schedule(args, device),
        "generation": [],
    }
    uses = [result["kernels"].get(f"{SHAPES[m][0]}_uses", {}) for m in args.models]
    if device.type == "cuda" and any(u.get("mamba_ssm") and not u.get("causal_conv1d") for u in uses):
        # transformers' training path calls mamba_ssm's fused conv + SSD, which calls causal_conv1d's CUDA functions
        result["warnings"] = ["mamba_ssm is bound without causal_conv1d: the peer's training step will fail"]
    gdn = any(is_gdn(m) for m in args.models)
    if device.type == "cuda" and gdn and not args.no_kernels and not result["kernels"]["fla_importable"]:
        # then the default peer is transformers' torch path, as hf+peft:torch is
        result.setdefault("warnings", []).append("fla does not import: hf+peft runs transformers' torch path")

    def save() -> None:
        add_ratios(result["rows"])
        result["targets"] = targets_report(result["rows"], result["generation"])
        result["elapsed_s"] = time.perf_counter() - t0
        write_json(args.out, result)

    has_ours = any(r["stack"] == "ssmtune" for r in result["rows"]) or not args.no_generate
    result["gate"] = (
        {"status": "skipped (--skip-gate)", "passed": None} if args.skip_gate or not has_ours
        else correctness_gate(args.models, device)
    )  # fmt: skip
    if result["gate"]["passed"] is False:
        for r in result["rows"]:
            r["status"] = "refused: the correctness gate failed"
        save()
        return result
    why_not_ours = from_transformers_fn()[1]
    mem_gib = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None
    save()
    for i in range(max(1, args.rounds)):
        for row in [r for r in result["rows"] if r["stack"] != "hf+peft:torch"]:
            if i > 0:  # later rounds time again what the first one timed
                if row["status"] == "ok" and time.perf_counter() < deadline:
                    run_row(row, args, device, deadline)
            elif row["stack"] == "ssmtune" and why_not_ours:
                row["status"] = f"skipped: {why_not_ours}"
            elif time.perf_counter() > deadline:
                row["status"] = "skipped (budget)"
            elif reason := too_slow(row, result["rows"], args.max_step_s, mem_gib):
                row["status"] = reason
            else:
                run_row(row, args, device, deadline)
            save()
    torch_rows = [r for r in result["rows"] if r["stack"] == "hf+peft:torch"]
    if torch_rows:
        run_torch_peer(torch_rows, args, deadline)
        save()
    if not args.no_generate:
        batches = args.gen_batches or ([1, 2] if args.small else [1, 16])
        for model in args.models:
            for b in batches:
                if time.perf_counter() > deadline:
                    break
                result["generation"] += run_generation(model, b, args, device)
                save()
    save()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m ssmtune.bench.{NAME}", description=DESCRIPTION)
    add_args(parser, standalone=True)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    result = run(args)
    print(table(result))
    return 1 if (result.get("gate") or {}).get("passed") is False else 0


def _registered_run(args: argparse.Namespace) -> dict:
    """``ssmtune bench hybrid_step``: the runner owns --device and --out (this run rewrites --out after every row;
    the runner writes the final report there)."""
    from ssmtune.bench.common import CheckFailed

    args.device = None if args.device in (None, "auto") else args.device
    args.out = str(args.out or f"bench_{NAME}.json")
    result = run(args)
    if (result.get("gate") or {}).get("passed") is False:
        raise CheckFailed(f"our swapped model's outputs differ from transformers': {result['gate']}")
    result["table"] = table(result)
    return result


register(Benchmark(NAME, DESCRIPTION, add_args, _registered_run))

if __name__ == "__main__":
    sys.exit(main())
