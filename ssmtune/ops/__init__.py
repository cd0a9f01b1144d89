"""Pure tensor ops for Mamba-1 (S6) and Mamba-2 (SSD), in mamba_ssm's layouts. No nn.Module, no configs.

Glossary (docs/methods.md §1): B batch, L sequence length, D inner channels (``d_inner``), N state size (``d_state``),
H heads, P head dim, G groups sharing B_t/C_t, K conv width. Paper symbols: h_t state, h' state offset (State-offset
Tuning h), y' output offset (State-offset Tuning y), h_0 initial state (Initial State Tuning).

Each op has a ``backend`` argument:
- ``"ref"``: the sequential fp32 reference (``*/naive.py``), every flag, any device;
- ``"torch"``: a pure-PyTorch path for CPU training (Mamba-1: sequential on CPU, Blelloch on CUDA; Mamba-2: chunked);
- ``"triton"``: fused Triton kernels (CUDA, or the CPU interpreter under ``TRITON_INTERPRET=1``);
- ``"auto"``: triton on CUDA when available, else torch; it warns once when it falls back.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Callable

import torch

from .conv import check_causal_conv1d_args
from .cross_entropy import check_cross_entropy_args
from .norm import check_add_rms_norm_args, check_rms_norm_args
from .selective_scan.naive import selective_scan_ref, selective_state_update_ref
from .ssd import SSD_MIN_HEADDIM_CUDA
from .ssd.naive import ssd_scan_ref, ssd_state_update_ref
from .varlen import RESET_ALIGN, check_cu_seqlens, check_resets, conv_packed, scan_packed

BACKENDS = ("auto", "ref", "torch", "triton")

# op name -> backend -> "module:function" (imported lazily so that ops never require triton).
_IMPLS: dict[str, dict[str, str]] = {
    "add_rms_norm": {
        "ref": "ssmtune.ops.norm:add_rms_norm_torch",
        "torch": "ssmtune.ops.norm:add_rms_norm_torch",
        "triton": "ssmtune.ops.norm_fused:add_rms_norm_triton",
    },
    "causal_conv1d": {
        "ref": "ssmtune.ops.conv:causal_conv1d_torch",
        "torch": "ssmtune.ops.conv:causal_conv1d_torch",
        "triton": "ssmtune.ops.conv_fused:causal_conv1d_triton",
    },
    "causal_conv1d_update": {
        "ref": "ssmtune.ops.conv:causal_conv1d_update",
        "torch": "ssmtune.ops.conv:causal_conv1d_update",
        "triton": "ssmtune.ops.conv_fused:causal_conv1d_update_triton",
    },
    "cross_entropy": {
        "ref": "ssmtune.ops.cross_entropy:cross_entropy_torch",
        "torch": "ssmtune.ops.cross_entropy:cross_entropy_torch",
        "triton": "ssmtune.ops.cross_entropy_fused:cross_entropy_triton",
    },
    "rms_norm": {
        "ref": "ssmtune.ops.norm:rms_norm_torch",
        "torch": "ssmtune.ops.norm:rms_norm_torch",
        "triton": "ssmtune.ops.norm_fused:rms_norm_triton",
    },
    "selective_scan": {
        "ref": "ssmtune.ops.selective_scan.naive:selective_scan_ref",
        "torch": "ssmtune.ops.selective_scan.parallel:selective_scan_torch",
        "triton": "ssmtune.ops.selective_scan.fused:selective_scan_triton",
    },
    "selective_state_update": {
        "ref": "ssmtune.ops.selective_scan.naive:selective_state_update_ref",
        "torch": "ssmtune.ops.selective_scan.naive:selective_state_update_ref",
        "triton": "ssmtune.ops.selective_scan.fused:selective_state_update_triton",
    },
    "ssd_scan": {
        "ref": "ssmtune.ops.ssd.naive:ssd_scan_ref",
        "torch": "ssmtune.ops.ssd.chunk:ssd_scan_torch",
        "triton": "ssmtune.ops.ssd.fused:ssd_scan_triton",
    },
    "conv_ssd_scan": {"triton": "ssmtune.ops.ssd.fused:conv_ssd_scan_triton"},  # the mixers' training node only
    "ssd_state_update": {
        "ref": "ssmtune.ops.ssd.naive:ssd_state_update_ref",
        "torch": "ssmtune.ops.ssd.naive:ssd_state_update_ref",
        "triton": "ssmtune.ops.ssd.fused:ssd_state_update_triton",
    },
}
_cache: dict[tuple[str, str], Callable | None] = {}
_warned: set[tuple[str, str]] = set()


def _load(op: str, backend: str) -> Callable | None:
    key = (op, backend)
    if key not in _cache:
        mod, fn = _IMPLS[op][backend].split(":")
        try:
            _cache[key] = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError):
            _cache[key] = None
    return _cache[key]


def _triton_usable(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve(op: str, backend: str, device: torch.device) -> Callable:
    """Return the implementation of ``op`` for ``backend`` on ``device``; ``auto`` falls back visibly."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        fn = _load(op, backend)
        if fn is None:
            raise ValueError(f"{op}: backend {backend!r} is not available (its module failed to import)")
        return fn
    order = ("triton", "torch", "ref") if device.type == "cuda" else ("torch", "ref")
    for i, name in enumerate(order):
        if name == "triton" and not _triton_usable(device):
            continue
        fn = _load(op, name)
        if fn is not None:
            if i > 0 and (op, order[0]) not in _warned:
                _warned.add((op, order[0]))
                warnings.warn(f"ssmtune.ops.{op}: backend {order[0]!r} unavailable, using {name!r}", stacklevel=3)
            return fn
    raise RuntimeError(f"{op}: no backend available")  # the reference always imports


def _check(name: str, t: torch.Tensor | None, shapes: list[tuple], op: str) -> None:
    """Raise ValueError unless ``t`` is None or has one of ``shapes`` (None entries match any size)."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        # one exception type for every bad argument of a public op (the project's error convention)
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")  # noqa: TRY004
    for s in shapes:
        if t.dim() == len(s) and all(e is None or e == a for e, a in zip(s, t.shape)):
            return
    want = " or ".join(str(list(s)) for s in shapes)
    raise ValueError(f"{op}: {name} must have shape {want}, got {list(t.shape)}")


def _check_offset_index(op: str, index: torch.Tensor | None, batch: int) -> int | None:
    """Validate a decode step's ``offset_index`` (int32 [B]); returns the leading dim its per-row offsets must have
    (None: any, they are tables read through the index; ``batch`` without an index)."""
    if index is None:
        return batch
    if not isinstance(index, torch.Tensor) or index.dtype != torch.int32 or tuple(index.shape) != (batch,):
        got = f"{index.dtype} {list(index.shape)}" if isinstance(index, torch.Tensor) else type(index).__name__
        raise ValueError(f"{op}: offset_index must be an int32 tensor of shape [{batch}], got {got}")
    return None


def _check_float(op: str, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and not t.is_floating_point():
            raise ValueError(f"{op}: {name} must be a floating-point tensor, got dtype {t.dtype}")


# the dtypes a decode step's state may be kept in (loaded and updated in fp32 either way)
STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_state_dtype(op: str, state: torch.Tensor) -> None:
    if state.dtype not in STATE_DTYPES:
        raise ValueError(f"{op}: state must be fp32, bf16 or fp16, got dtype {state.dtype}")


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    initial_state: torch.Tensor | None = None,
    activation: str | None = None,
    return_final_state: bool = False,
    channels_last: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise conv1d from an initial conv state (``conv.py`` for the maths).

    Args:
        x (torch.Tensor): shape [B, C, L], any strides (the mixers pass the time-major view of their projection)
        weight (torch.Tensor): shape [C, K]
        bias (torch.Tensor | None): shape [C]
        initial_state (torch.Tensor | None): the K-1 inputs before x, shape [C, K-1] or [B, C, K-1]
        activation: None or ``"silu"``
        channels_last: return y as a [B, C, L] view of [B, L, C] memory (what a Linear or the SSD scan reads next)
        cu_seqlens (torch.Tensor | None): int32 [n_seq + 1], x a packed [1, C, total] batch (``varlen.py``): no window
            reaches into the previous sequence; initial_state [C, K-1] or [n_seq, C, K-1]
    Returns:
        y [B, C, L] in x's dtype, and the final conv state [B, C, K-1] (the last K-1 inputs of initial_state ⧺ x)
        when ``return_final_state`` ([n_seq, C, K-1] with cu_seqlens).
    """
    # packed, x is [1, C, total]: the first row of a per-sequence initial state has the shape of an unpacked one
    check_causal_conv1d_args(x, weight, initial_state if cu_seqlens is None else _row0(initial_state), activation)
    fn = resolve("causal_conv1d", backend, x.device)
    if cu_seqlens is not None:
        bounds = check_cu_seqlens("causal_conv1d", cu_seqlens, x.shape[0], x.shape[2])
        n_seq = len(bounds) - 1
        if initial_state is not None and initial_state.dim() == 3 and initial_state.shape[0] != n_seq:
            raise ValueError(f"causal_conv1d: initial_state must be [C, K-1] or [n_seq={n_seq}, C, K-1] with "
                             f"cu_seqlens, got shape {tuple(initial_state.shape)}")  # fmt: skip
        return conv_packed(fn, bounds, x, initial_state, return_final_state, channels_last, weight=weight, bias=bias,
                           activation=activation)  # fmt: skip
    return fn(x, weight, bias, initial_state=initial_state, activation=activation,
              return_final_state=return_final_state, channels_last=channels_last)  # fmt: skip


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """One decode step of ``causal_conv1d``: x [B, C]; conv_state [B, C, K-1] (the last K-1 inputs) is rolled in
    place; returns y [B, C] in x's dtype. weight [C, K]; bias [C]; activation None or ``"silu"``."""
    op = "causal_conv1d_update"
    _check("x", x, [(None, None)], op)
    b, c = x.shape
    _check("weight", weight, [(c, None)], op)
    _check("conv_state", conv_state, [(b, c, weight.shape[1] - 1)], op)
    _check("bias", bias, [(c,)], op)
    if activation not in (None, "silu"):
        raise ValueError(f"{op}: activation must be None or 'silu', got {activation!r}")
    fn = resolve(op, backend, x.device)
    return fn(x, conv_state, weight, bias, activation)


def _row0(t: torch.Tensor | None) -> torch.Tensor | None:
    """A per-sequence tensor's first row (shape checks of packed calls, whose batch is one row)."""
    return t[:1] if t is not None and t.dim() >= 3 else t


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of ``logits`` [R, V] against ``labels`` [R], in fp32 (``cross_entropy.py``).

    ``F.cross_entropy(logits.float(), labels, ignore_index=..., reduction=...)``, without the fp32 copy of the logits
    on the Triton backend: the gradient comes back in the logits' dtype. ``reduction``: ``"mean"`` (over the rows not
    labelled ``ignore_index``), ``"sum"`` or ``"none"`` (one loss per row, 0 where ignored).
    """
    check_cross_entropy_args(logits, labels, reduction)
    fn = resolve("cross_entropy", backend, logits.device)
    return fn(logits, labels, ignore_index=ignore_index, reduction=reduction)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    z: torch.Tensor | None = None,
    eps: float = 1e-5,
    group_size: int | None = None,
    input_dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """RMSNorm of x (gated by silu(z) first when z is given) per group of ``group_size`` channels (``norm.py``).

    Args:
        x (torch.Tensor): shape [..., H]
        weight (torch.Tensor): shape [H]
        z (torch.Tensor | None): x's shape; the gate of Mamba-2's ``RMSNormGated``
        group_size (int | None): divides H; None: one group (plain RMSNorm)
        input_dtype (torch.dtype | None): normalise ``x.to(input_dtype)`` (the Triton path casts inside its kernel when
            no gradient is needed: one kernel less, e.g. the fp32 residual stream into a bf16 model's norm)
    Returns:
        x's shape, in the promoted dtype of weight and x (x's after the cast).
    """
    check_rms_norm_args(x, weight, z, group_size)
    _check_float("rms_norm", x=x, weight=weight, z=z)
    fn = resolve("rms_norm", backend, x.device)
    return fn(x, weight, z=z, eps=eps, group_size=group_size, input_dtype=input_dtype)


def add_rms_norm(
    x: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    *,
    eps: float = 1e-5,
    group_size: int | None = None,
    input_dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add of a pre-norm block fused into the next norm: (s, rms_norm(s)) with s = x + y (``norm.py``).

    The results are those of ``s = x + y`` followed by ``rms_norm(s, weight, ...)``; the Triton path computes both in
    one kernel when no gradient is needed (forward only; with autograd the add stays a torch op before the norm).

    Args:
        x (torch.Tensor): shape [..., H]; the residual stream (e.g. fp32 under ``residual_in_fp32``)
        y (torch.Tensor): x's shape; the block's output added to it (e.g. bf16)
        weight (torch.Tensor): shape [H]
        group_size (int | None): divides H; None: one group
        input_dtype (torch.dtype | None): normalise ``s.to(input_dtype)``, as ``rms_norm``'s
    Returns:
        (s in the promoted dtype of x and y, the normed s in the promoted dtype of weight and s (or input_dtype)),
        both of x's shape.
    """
    check_add_rms_norm_args(x, y, weight, group_size)
    _check_float("add_rms_norm", x=x, y=y, weight=weight)
    fn = resolve("add_rms_norm", backend, x.device)
    return fn(x, y, weight, eps=eps, group_size=group_size, input_dtype=input_dtype)


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    *,
    initial_state: torch.Tensor | None = None,
    state_offset: torch.Tensor | None = None,
    y_offset: torch.Tensor | None = None,
    return_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    resets: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mamba-1 selective scan with initial state and state offsets (see ``selective_scan/naive.py`` for the maths).

    Args:
        u (torch.Tensor): shape [B, D, L]
        delta (torch.Tensor): shape [B, D, L]
        A (torch.Tensor): shape [D, N]
        B (torch.Tensor): shape [B, N, L]
        C (torch.Tensor): shape [B, N, L]
        D (torch.Tensor | None): shape [D]
        z (torch.Tensor | None): shape [B, D, L], gate: y · silu(z)
        delta_bias (torch.Tensor | None): shape [D]
        initial_state (torch.Tensor | None): shape [D, N] or [B, D, N]
        state_offset (torch.Tensor | None): h', shape [D, N] or [B, D, N]
        y_offset (torch.Tensor | None): y', shape [D] or [B, D]
        cu_seqlens (torch.Tensor | None): int32 [n_seq + 1]: u etc. are a packed [1, D, total] batch of n_seq
            sequences (``varlen.py``), each scanned from its own state; h0, h', y' shared or [n_seq, ...]
        resets (torch.Tensor | None): bool [B, ceil(L / RESET_ALIGN)], packed rows (``varlen.py``): where
            resets[b, r], the step at position r · RESET_ALIGN reads row b's initial state (the start of a sequence)
    Returns:
        y [B, D, L] in u's dtype, and h_L [B, D, N] in fp32 when ``return_final_state`` ([n_seq, D, N] packed).
    """
    op = "selective_scan"
    _check("u", u, [(None, None, None)], op)
    b, d, seqlen = u.shape
    bounds = None if cu_seqlens is None else check_cu_seqlens(op, cu_seqlens, b, seqlen)
    rows = b if bounds is None else len(bounds) - 1  # the leading dim of per-row states and offsets
    _check("delta", delta, [(b, d, seqlen)], op)
    _check("A", A, [(d, None)], op)
    n = A.shape[1]
    _check("B", B, [(b, n, seqlen)], op)
    _check("C", C, [(b, n, seqlen)], op)
    _check("D", D, [(d,)], op)
    _check("z", z, [(b, d, seqlen)], op)
    _check("delta_bias", delta_bias, [(d,)], op)
    _check("initial_state", initial_state, [(d, n), (rows, d, n)], op)
    _check("state_offset", state_offset, [(d, n), (rows, d, n)], op)
    _check("y_offset", y_offset, [(d,), (rows, d)], op)
    _check_float(op, u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, initial_state=initial_state)
    _check_resets(op, backend, u.device, resets, b, seqlen, bounds)
    fn = resolve(op, backend, u.device)
    if bounds is not None:
        timed = {"u": u, "delta": delta, "B": B, "C": C, "z": z}
        rows = {"initial_state": (initial_state, 2), "state_offset": (state_offset, 2), "y_offset": (y_offset, 1)}
        return scan_packed(fn, bounds, 2, timed, rows, ("delta", "delta_bias", "delta_softplus"), return_final_state,
                           A=A, D=D, delta_bias=delta_bias, delta_softplus=delta_softplus)  # fmt: skip
    return fn(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus,
        initial_state=initial_state, state_offset=state_offset, y_offset=y_offset,
        return_final_state=return_final_state, resets=resets,
    )  # fmt: skip


def selective_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    *,
    state_offset: torch.Tensor | None = None,
    y_offset: torch.Tensor | None = None,
    offset_index: torch.Tensor | None = None,
    A_is_log: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """One Mamba-1 decode step; ``state`` [B, D, N] is updated in place, y [B, D] is returned. The state may be fp32,
    bf16 or fp16: it is loaded and updated in fp32, stored back in its dtype; y reads the fp32 update (as mamba_ssm).

    x, dt, z [B, D]; A [D, N]; B, C [B, N]; D, dt_bias [D]; state_offset [D, N] or [B, D, N]; y_offset [D] or [B, D].
    ``offset_index`` (int32 [B]): per-row offsets are instead tables [n, D, N] / [n, D] and row b reads entry
    ``offset_index[b]`` (rows sharing an adapter read one entry); shared offsets are unaffected. Its values are not
    checked (that would synchronise with the device): each must be in [0, n).
    ``A_is_log``: A holds the mixers' A_log and the step uses -exp(A_log) in fp32 (computed inside the step's kernel,
    not as separate kernels per step).
    """
    op = "selective_state_update"
    _check("x", x, [(None, None)], op)
    b, d = x.shape
    _check("A", A, [(d, None)], op)
    n = A.shape[1]
    _check("state", state, [(b, d, n)], op)
    _check_state_dtype(op, state)
    _check("dt", dt, [(b, d)], op)
    _check("B", B, [(b, n)], op)
    _check("C", C, [(b, n)], op)
    _check("z", z, [(b, d)], op)
    rows = _check_offset_index(op, offset_index, b)
    _check("state_offset", state_offset, [(d, n), (rows, d, n)], op)
    _check("y_offset", y_offset, [(d,), (rows, d)], op)
    fn = resolve(op, backend, x.device)
    return fn(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_offset=state_offset, y_offset=y_offset,
              offset_index=offset_index, A_is_log=A_is_log)  # fmt: skip


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    chunk_size: int | None = None,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    state_offset: torch.Tensor | None = None,
    y_offset: torch.Tensor | None = None,
    return_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    resets: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mamba-2 SSD scan with initial state and state offsets (see ``ssd/naive.py`` for the maths).

    Args:
        x (torch.Tensor): shape [B, L, H, P]
        dt (torch.Tensor): shape [B, L, H]
        A (torch.Tensor): shape [H]
        B (torch.Tensor): shape [B, L, G, N], H divisible by G
        C (torch.Tensor): shape [B, L, G, N]
        chunk_size (int | None): chunk length of chunked backends (the reference ignores it)
        D (torch.Tensor | None): shape [H] or [H, P]
        z (torch.Tensor | None): shape [B, L, H, P]
        dt_bias (torch.Tensor | None): shape [H]
        initial_state (torch.Tensor | None): shape [H, P, N] or [B, H, P, N]
        state_offset (torch.Tensor | None): h', shape [H, P, N] or [B, H, P, N]
        y_offset (torch.Tensor | None): y', shape [H, P] or [B, H, P]
        cu_seqlens (torch.Tensor | None): int32 [n_seq + 1]: x etc. are a packed [1, total, ...] batch of n_seq
            sequences (``varlen.py``), each scanned from its own state; h0, h', y' shared or [n_seq, ...]
        resets (torch.Tensor | None): bool [B, ceil(L / RESET_ALIGN)], packed rows (``varlen.py``): where
            resets[b, r], the step at position r · RESET_ALIGN reads row b's initial state (the start of a sequence)
    Returns:
        y [B, L, H, P] in x's dtype, and h_L [B, H, P, N] in fp32 when ``return_final_state`` ([n_seq, H, P, N]
        packed).
    """
    op = "ssd_scan"
    _check("x", x, [(None, None, None, None)], op)
    b, seqlen, h, p = x.shape
    bounds = None if cu_seqlens is None else check_cu_seqlens(op, cu_seqlens, b, seqlen)
    rows = b if bounds is None else len(bounds) - 1  # the leading dim of per-row states and offsets
    _check("dt", dt, [(b, seqlen, h)], op)
    _check("A", A, [(h,)], op)
    _check("B", B, [(b, seqlen, None, None)], op)
    g, n = B.shape[2], B.shape[3]
    if g < 1 or h % g != 0:
        raise ValueError(f"{op}: nheads ({h}) must be divisible by ngroups ({g})")
    _check("C", C, [(b, seqlen, g, n)], op)
    _check("D", D, [(h,), (h, p)], op)
    _check("z", z, [(b, seqlen, h, p)], op)
    _check("dt_bias", dt_bias, [(h,)], op)
    _check("initial_state", initial_state, [(h, p, n), (rows, h, p, n)], op)
    _check("state_offset", state_offset, [(h, p, n), (rows, h, p, n)], op)
    _check("y_offset", y_offset, [(h, p), (rows, h, p)], op)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be positive, got {chunk_size}")
    _check_float(op, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, initial_state=initial_state)
    picked = _ssd_backend(backend, x.device, p)
    if picked != backend and (op, "headdim") not in _warned:
        _warned.add((op, "headdim"))
        warnings.warn(f"ssmtune.ops.ssd_scan: headdim {p} < {SSD_MIN_HEADDIM_CUDA} runs the torch backend on "
                      "CUDA (the Triton backward does not support it)", stacklevel=2)  # fmt: skip
    _check_resets(op, picked, x.device, resets, b, seqlen, bounds)
    fn = resolve(op, picked, x.device)
    if bounds is not None:
        timed = {"x": x, "dt": dt, "B": B, "C": C, "z": z}
        rows = {"initial_state": (initial_state, 3), "state_offset": (state_offset, 3), "y_offset": (y_offset, 2)}
        return scan_packed(fn, bounds, 1, timed, rows, ("dt", "dt_bias", "dt_softplus"), return_final_state, A=A,
                           chunk_size=chunk_size, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus)  # fmt: skip
    return fn(
        x, dt, A, B, C, chunk_size=chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
        initial_state=initial_state, state_offset=state_offset, y_offset=y_offset,
        return_final_state=return_final_state, resets=resets,
    )  # fmt: skip


# The backends whose scans take ``resets`` (packed rows): every one.
RESETS_BACKENDS = {"selective_scan": ("triton", "torch", "ref"), "ssd_scan": ("triton", "torch", "ref")}


def _check_resets(op: str, backend: str, device: torch.device, resets, batch: int, seqlen: int, bounds) -> None:
    """A ValueError naming the bad value unless ``resets`` (None, or packed rows' flags) fits the call."""
    if resets is None:
        return
    if bounds is not None:
        raise ValueError(f"{op}: resets (packed rows) and cu_seqlens (one packed sequence row) are two layouts; "
                         "pass one of them")  # fmt: skip
    check_resets(op, resets, batch, seqlen)
    if resets.device != device:
        raise ValueError(f"{op}: resets must be on {device}, got {resets.device}")
    if backend != "auto" and backend not in RESETS_BACKENDS[op]:
        raise ValueError(f"{op}: backend {backend!r} does not take resets (packed rows); use one of "
                         f"{RESETS_BACKENDS[op]}")  # fmt: skip


def _ssd_backend(backend: str, device: torch.device, headdim: int) -> str:
    """The backend ``ssd_scan`` runs for ``backend``: auto takes the torch path on CUDA below the head dim the Triton
    backward supports (it faults there on the GPU: ssd/fused.py)."""
    return "torch" if backend == "auto" and device.type == "cuda" and headdim < SSD_MIN_HEADDIM_CUDA else backend


def conv_ssd_fused(backend: str, device: torch.device, headdim: int) -> Callable | None:
    """``ssd.fused.conv_ssd_scan_triton`` when both the conv and the SSD scan resolve to Triton for ``backend`` on
    ``device`` (the mixers' training path then keeps the conv's input, not its output); None otherwise. It takes
    ``resets=`` (packed rows) as ``ssd_scan`` does."""
    triton_fns = (_load("causal_conv1d", "triton"), _load("ssd_scan", "triton"))
    if None in triton_fns:
        return None
    try:
        fns = (
            resolve("causal_conv1d", backend, device),
            resolve("ssd_scan", _ssd_backend(backend, device, headdim), device),
        )
    except ValueError:
        return None
    return _load("conv_ssd_scan", "triton") if fns == triton_fns else None


def ssd_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    *,
    state_offset: torch.Tensor | None = None,
    y_offset: torch.Tensor | None = None,
    offset_index: torch.Tensor | None = None,
    A_is_log: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """One Mamba-2 decode step; ``state`` [B, H, P, N] is updated in place, y [B, H, P] is returned. The state may be
    fp32, bf16 or fp16 (as in ``selective_state_update``).

    x, z [B, H, P]; dt [B, H]; A [H]; B, C [B, G, N]; D [H] or [H, P]; dt_bias [H]; state_offset [H, P, N] or
    [B, H, P, N]; y_offset [H, P] or [B, H, P]. ``offset_index`` (int32 [B]): per-row offsets are tables [n, H, P, N] /
    [n, H, P] read through it; ``A_is_log``: A holds A_log (both as in ``selective_state_update``).
    """
    op = "ssd_state_update"
    _check("x", x, [(None, None, None)], op)
    b, h, p = x.shape
    _check("B", B, [(b, None, None)], op)
    g, n = B.shape[1], B.shape[2]
    if g < 1 or h % g != 0:
        raise ValueError(f"{op}: nheads ({h}) must be divisible by ngroups ({g})")
    _check("state", state, [(b, h, p, n)], op)
    _check_state_dtype(op, state)
    _check("dt", dt, [(b, h)], op)
    _check("A", A, [(h,)], op)
    _check("C", C, [(b, g, n)], op)
    _check("z", z, [(b, h, p)], op)
    rows = _check_offset_index(op, offset_index, b)
    _check("state_offset", state_offset, [(h, p, n), (rows, h, p, n)], op)
    _check("y_offset", y_offset, [(h, p), (rows, h, p)], op)
    fn = resolve(op, backend, x.device)
    return fn(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_offset=state_offset, y_offset=y_offset,
              offset_index=offset_index, A_is_log=A_is_log)  # fmt: skip


__all__ = [
    "BACKENDS",
    "RESET_ALIGN",
    "add_rms_norm",
    "causal_conv1d",
    "causal_conv1d_update",
    "cross_entropy",
    "resolve",
    "rms_norm",
    "selective_scan",
    "selective_scan_ref",
    "selective_state_update",
    "selective_state_update_ref",
    "ssd_scan",
    "ssd_scan_ref",
    "ssd_state_update",
    "ssd_state_update_ref",
]


def gated_delta_rule(
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
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Gated delta rule (Gated DeltaNet; KDA with a per-channel gate) with initial state and read-out offsets
    (``gated_delta/naive.py`` for the maths).

    Args:
        q, k (torch.Tensor): shape [B, L, Hk, K]
        v (torch.Tensor): shape [B, L, H, V], H a multiple of Hk
        g (torch.Tensor): log-decay, shape [B, L, H] or [B, L, H, K] (KDA)
        beta (torch.Tensor): shape [B, L, H]
        scale (float | None): the query scale, K^-1/2 by default
        use_qk_l2norm (bool): L2-normalise q and k per head first
        initial_state (torch.Tensor | None): S_0, shape [H, K, V] or [B, H, K, V]
        state_offset (torch.Tensor | None): S', shape [H, K, V] or [B, H, K, V] (read out, never decayed)
        output_offset (torch.Tensor | None): y', shape [H, V] or [B, H, V]
        backend: ``"ref"``, ``"torch"`` (chunked, autograd), ``"fla"`` (flash-linear-attention), or ``"auto"`` /
            ``"triton"``: fla on CUDA when it imports and, when a gradient is needed, its backward works there; else
            torch. On Hopper with Triton >= 3.4 and < 3.7.1, where fla refuses one kernel of the Gated DeltaNet
            backward (``chunk_bwd_dqkwg``), our port of it stands in (``gated_delta/fla_bwd.py``) and fla
            still trains Gated DeltaNet at head dims that are multiples of 64; KDA and other head dims train there
            on torch.
    Returns:
        o [B, L, H, V] in v's dtype, and S_L [B, H, K, V] in fp32 when ``output_final_state``.
    """
    from .gated_delta import GATED_DELTA_BACKENDS
    from .gated_delta.chunk import gated_delta_rule_torch
    from .gated_delta.fla import fla_usable, gated_delta_rule_fla
    from .gated_delta.naive import gated_delta_rule_ref

    op = "gated_delta_rule"
    if backend not in GATED_DELTA_BACKENDS:
        raise ValueError(f"{op}: backend must be one of {GATED_DELTA_BACKENDS}, got {backend!r}")
    _check("q", q, [(None, None, None, None)], op)
    b, seqlen, hk, dk = q.shape
    _check("k", k, [(b, seqlen, hk, dk)], op)
    _check("v", v, [(b, seqlen, None, None)], op)
    h, dv = v.shape[2], v.shape[3]
    if h % hk != 0:
        raise ValueError(f"{op}: value heads ({h}) must be a multiple of key heads ({hk})")
    _check("g", g, [(b, seqlen, h), (b, seqlen, h, dk)], op)
    _check("beta", beta, [(b, seqlen, h)], op)
    _check("initial_state", initial_state, [(h, dk, dv), (b, h, dk, dv)], op)
    _check("state_offset", state_offset, [(h, dk, dv), (b, h, dk, dv)], op)
    _check("output_offset", output_offset, [(h, dv), (b, h, dv)], op)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be positive, got {chunk_size}")
    _check_float(op, q=q, k=k, v=v, g=g, beta=beta, initial_state=initial_state, state_offset=state_offset)
    if backend in ("auto", "triton"):
        grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, g, beta, initial_state, state_offset, output_offset)
        )
        backend = "fla" if fla_usable(v.device, grad, per_channel=g.dim() == 4, head_dims=(dk, dv)) else "torch"
    fn = {"ref": gated_delta_rule_ref, "torch": gated_delta_rule_torch, "fla": gated_delta_rule_fla}[backend]
    return fn(
        q, k, v, g, beta, scale=scale, use_qk_l2norm=use_qk_l2norm, initial_state=initial_state,
        state_offset=state_offset, output_offset=output_offset, output_final_state=output_final_state,
        chunk_size=chunk_size,
    )  # fmt: skip
