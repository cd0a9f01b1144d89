"""flash-linear-attention (``fla-core``, MIT) kernels for the gated delta rule, when installed (``ssmtune[fla]``).

fla runs the recurrence (``chunk_gated_delta_rule``; ``chunk_kda`` for per-channel gates), with the initial state and
its gradient; the offsets are read out beside it (``naive.read_offsets``'s maths on q̂ recomputed in fp32 as fla
normalises and scales it: one Triton kernel each way, ``offsets_triton.py``, or torch ops with ``READOUT = "torch"``).
fla refuses one kernel of its Gated DeltaNet backward (``chunk_bwd_dqkwg``, miscompiled on Hopper by Triton >= 3.4
and < 3.7.1); there ``fla_bwd.py`` registers our port of it with fla's backend registry, and the rest of the backward
stays fla's. KDA's backward does not use that kernel but is not vetted there either, so ``backend="auto"`` trains KDA
there on the torch path.
"""

from __future__ import annotations

import importlib
import re

import torch

from .naive import prepare_q, read_offsets

INSTALL = "pip install 'ssmtune[fla]' (fla-core>=0.6)"
# How the offsets are read out beside fla's kernels: "triton" (``offsets_triton.py``, one kernel each way, less memory)
# or "torch" (``naive.read_offsets`` on an fp32 q̂, some ten kernels each way; kept as the plain fallback)
READOUT = "triton"


def fla_ops():
    """fla's ``(chunk_gated_delta_rule, chunk_kda)``; ValueError with the install line when fla does not import."""
    try:
        gdn = importlib.import_module("fla.ops.gated_delta_rule")
        kda = importlib.import_module("fla.ops.kda")
    except ImportError as e:
        raise ValueError(f"gated_delta_rule: backend 'fla' needs flash-linear-attention: {INSTALL} ({e})") from e
    return gdn.chunk_gated_delta_rule, kda.chunk_kda


def fla_importable() -> bool:
    try:
        fla_ops()
    except ValueError:
        return False
    return True


def _triton_version() -> tuple[int, int, int]:
    try:
        import triton
    except ImportError:
        return (0, 0, 0)
    found = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", triton.__version__)
    return (int(found[1]), int(found[2]), int(found[3] or 0)) if found else (0, 0, 0)


def fla_backward_ok(device: torch.device) -> bool:
    """False where fla's gated backward raises: Hopper (sm_90) with Triton >= 3.4 and < 3.7.1."""
    if device.type != "cuda":
        return False
    hopper = torch.cuda.get_device_capability(device)[0] == 9
    return not (hopper and (3, 4, 0) <= _triton_version() < (3, 7, 1))


# Where fla refuses its own gated backward (and ours stands in), fla's backward has been run at head dims that are
# multiples of 64 (every released Gated DeltaNet / KDA checkpoint uses 128); at K = 32, V = 16 in bf16 one of fla's own
# kernels (chunk_bwd_dv_local) hit an illegal memory access there (H100, Triton 3.6.0, fla-core 0.6.0)
VETTED_HEAD_DIM = 64


def fla_usable(
    device: torch.device, grad: bool, per_channel: bool = False, head_dims: tuple[int, int] | None = None
) -> bool:
    """Whether ``backend="auto"`` runs fla: on CUDA when fla imports and, for a gradient, its backward works there,
    Gated DeltaNet's (``per_channel`` False) with our ``chunk_bwd_dqkwg`` where fla refuses its own, at head dims
    ``(K, V)`` that are multiples of ``VETTED_HEAD_DIM`` there."""
    if device.type != "cuda" or not fla_importable():
        return False
    if not grad or fla_backward_ok(device):
        return True
    if head_dims is not None and any(d % VETTED_HEAD_DIM for d in head_dims):
        return False
    from .fla_bwd import install

    return not per_channel and install()


def gated_delta_rule_fla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
    initial_state: torch.Tensor | None = None,
    state_offset: torch.Tensor | None = None,
    output_offset: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Same arguments and results as ``naive.gated_delta_rule_ref``; fla picks its own chunk size."""
    chunk_gdn, chunk_kda = fla_ops()
    batch, _, nheads, dv = v.shape
    dk = q.shape[-1]
    rep = nheads // q.shape[2]
    qr, kr = (q, k) if rep == 1 else (q.repeat_interleave(rep, dim=2), k.repeat_interleave(rep, dim=2))
    h0 = None if initial_state is None else initial_state.float().expand(batch, nheads, dk, dv).contiguous()
    fn = chunk_kda if g.dim() == 4 else chunk_gdn
    if fn is chunk_gdn and v.is_cuda and not fla_backward_ok(v.device):
        from .fla_bwd import install

        install()  # idempotent; takes only the calls fla would refuse
    o, final = fn(
        qr, kr, v, g.float(), beta, scale=dk**-0.5 if scale is None else scale, initial_state=h0,
        output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm,
    )  # fmt: skip
    # q̂ S' + y' (q̂ recomputed from q as fla prepares it; k̂ is fla's business)
    if READOUT == "triton":
        from .offsets_triton import read_offsets_triton

        o = read_offsets_triton(o, q, state_offset, output_offset, scale=scale, use_qk_l2norm=use_qk_l2norm)
    elif state_offset is not None or output_offset is not None:
        q_hat = prepare_q(q, nheads, scale=scale, use_qk_l2norm=use_qk_l2norm)
        o = read_offsets(o.float(), q_hat, state_offset, output_offset).to(v.dtype)
    return (o, final.float()) if output_final_state else o
