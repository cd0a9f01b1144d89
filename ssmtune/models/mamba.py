"""Mamba-1 (S6) mixer (docs/methods.md §2), with parameter names of HF transformers and mamba_ssm.

Glossary: ``in_proj`` → x, z; ``conv1d`` → causal conv K; ``x_proj`` → δ (R), B_t, C_t (N each); ``dt_proj`` → Δ before
softplus (holds b_dt); ``A_log`` → A = −exp(A_log) [D, N]; ``D`` → D_skip [D]; ``out_proj`` → d_model.

The mixer calls its submodules (never passes a Linear's ``.weight`` into an op), so LoRA-style wrappers and
``torch.nn.utils.parametrize`` act in every path. State sizes are read from the current parameter shapes, because
Additional-scan extends ``A_log`` and the B/C rows of ``x_proj``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops
from ..ops.varlen import PAD_LOGIT
from .cache import LayerCache
from .config import MambaConfig
from .hooks import MergedState, check_packed, check_rows, collect_state, conv0_at_slots


def _inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    return x + torch.log(-torch.expm1(-x))


def sample_dt(n: int, dt_min: float, dt_max: float, floor: float, device: torch.device | None = None) -> torch.Tensor:
    """Δ ~ logUniform[dt_min, dt_max], clamped below at ``floor``."""
    dt = torch.exp(torch.rand(n, device=device) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    return dt.clamp(min=floor)


def mask_padding(x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the activations at padded positions (as transformers does), so pads leave a zero state unchanged."""
    if attention_mask is None:
        return x
    mask = attention_mask[:, -x.shape[1] :]  # [B, L]
    return (x * mask[:, :, None]).to(x.dtype)


class MambaMixer(nn.Module):
    """Selective-scan mixer: ``forward(hidden_states [B, L, d_model], cache) -> [B, L, d_model]``."""

    reads_offset_index = True  # the decode step takes MergedState.offset_index (models/hooks.py)

    def __init__(self, config: MambaConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        d, n, r, k = config.d_inner, config.d_state, config.dt_rank, config.d_conv
        self.d_inner = d
        self.in_proj = nn.Linear(config.d_model, 2 * d, bias=config.bias)
        self.conv1d = nn.Conv1d(d, d, k, groups=d, padding=k - 1, bias=config.conv_bias)
        self.x_proj = nn.Linear(d, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, d, bias=True)
        self.A_log = nn.Parameter(torch.empty(d, n))
        self.D = nn.Parameter(torch.empty(d))
        self.out_proj = nn.Linear(d, config.d_model, bias=config.bias)
        self.state_hooks = nn.ModuleDict()
        self.backend: str = "auto"
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """mamba_ssm's init: dt_proj weight ±R^-0.5·dt_scale, b_dt = softplus⁻¹(Δ), A_log = log(1..N), D = 1."""
        cfg = self.config
        std = cfg.dt_rank**-0.5 * cfg.dt_scale
        if cfg.dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, std)
        else:
            nn.init.uniform_(self.dt_proj.weight, -std, std)
        # explicit devices: the model may be built on the meta device before loading a checkpoint
        dev = self.A_log.device
        dt = sample_dt(self.d_inner, cfg.dt_min, cfg.dt_max, cfg.dt_init_floor, dev)
        self.dt_proj.bias.copy_(_inverse_softplus(dt))
        self.dt_proj.bias._no_reinit = True
        n = self.A_log.shape[-1]
        self.A_log.copy_(torch.log(torch.arange(1, n + 1, dtype=torch.float32, device=dev)).expand(self.d_inner, n))
        self.D.fill_(1.0)
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True

    @property
    def d_state(self) -> int:
        """Current state size N (Additional-scan may have extended it)."""
        return self.A_log.shape[-1]

    @property
    def state_shape(self) -> tuple[int, int]:
        """(D, N): the per-row SSM state, initial state and state offset."""
        return (self.d_inner, self.d_state)

    @property
    def conv_state_shape(self) -> tuple[int, int]:
        """(D, K-1): the conv window before the next token."""
        return (self.d_inner, self.conv1d.weight.shape[-1] - 1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache: LayerCache | None = None,
        *,
        use_state_hooks: bool = True,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        resets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states [B, L, d_model]; with ``cu_seqlens`` (int32 [n_seq + 1]) a packed [1, total, d_model] batch
        whose sequences start from their own states (the hooks' states are per sequence; ``ops.varlen``). With
        ``resets`` (bool [B, ceil(L / 64)]) packed rows: each sequence sits in a slot of its row after masked pads, and
        every slot start restarts the scan from the row's initial state (``ops.selective_scan``)."""
        if resets is not None:
            check_rows(resets, cache, cu_seqlens, attention_mask)
        batch, seqlen, _ = hidden_states.shape
        fresh = cache is None or cache.fresh
        if cache is not None and not fresh and cache.ssm_state is not None and cache.ssm_state.shape[0] != batch:
            raise ValueError(f"cache holds batch {cache.ssm_state.shape[0]}, got hidden_states batch {batch}")
        rows = batch
        if cu_seqlens is not None:
            check_packed(cu_seqlens, cache, attention_mask)
            rows = cu_seqlens.numel() - 1  # the hooks' initial states and routed offsets come per sequence
        st = (
            collect_state(self.state_hooks.values(), rows, initial=fresh)
            if use_state_hooks and self.state_hooks
            else MergedState()
        )
        N = self.d_state

        # 1. x, z = in_proj(u)
        xz = self.in_proj(mask_padding(hidden_states, attention_mask))  # [B, L, 2D]
        x, z = xz.chunk(2, dim=-1)  # [B, L, D] each
        x = x.transpose(1, 2)  # [B, D, L]
        weight, bias = self.conv1d.weight[:, 0, :], self.conv1d.bias  # [D, K]
        step = not fresh and seqlen == 1

        # 2. x = silu(conv(x)), from the cached window, the hook's conv0, or zero padding
        if step:
            x = ops.causal_conv1d_update(
                x[:, :, 0], cache.conv_state, weight, bias, activation="silu", backend=self.backend
            )[:, :, None]
        else:
            conv0 = st.conv0 if fresh else cache.conv_state
            if resets is not None and (conv0 is not None or self.config.bias):
                # every sequence of the rows starts from conv0 (in_proj's bias would leave pads nonzero)
                x = conv0_at_slots(x, conv0, attention_mask)
            # Without gradients y is written as [B, D, L] rows, what the scan reads. With them, on CUDA, it is written
            # time-major: its two gradients (x_proj's, and the scan's, which the Triton scan returns time-major) then
            # add in one layout; torch's channel-major + time-major sum took 0.174 ms against 0.069 ms for a transpose
            # and a same-layout sum (H200, 8 x 2048 x 1536, bf16). The CPU torch path keeps
            # one layout (a cached prefix state must equal a fresh one bit for bit: tests/methods/test_prefix_cache.py)
            time_major = (xz.is_cuda or self.backend == "triton") and torch.is_grad_enabled() and xz.requires_grad
            x, conv_last = ops.causal_conv1d(
                x, weight, bias, initial_state=conv0, activation="silu", return_final_state=True,
                channels_last=time_major, cu_seqlens=cu_seqlens, backend=self.backend,
            )  # [B, D, L], [B, D, K-1]  # fmt: skip
        x = mask_padding(x.transpose(1, 2), attention_mask)  # [B, L, D]

        # 3-4. δ, B_t, C_t = x_proj(x); Δ before softplus = dt_proj(δ) (holds b_dt)
        # a decode step's x is a [B, 1, D] view of the conv's [B, D] output, which F.linear runs as a broadcast bmm: the
        # 2-D x goes to one plain GEMM (mm)
        x_dbl = self.x_proj(x[:, 0])[:, None] if step else self.x_proj(x)  # [B, L, R+2N]
        dt, Bt, Ct = torch.split(x_dbl, [x_dbl.shape[-1] - 2 * N, N, N], dim=-1)
        # dt is a strided slice of x_dbl: made contiguous (R columns, a small copy), F.linear adds the bias inside the
        # GEMM (addmm) instead of a separate pass over the [B, L, D] output. A decode step passes the [B, R] slice
        # itself: a 2-D input with unit column stride goes to addmm as it is, without the copy
        delta = self.dt_proj(dt[:, 0])[:, None] if step else self.dt_proj(dt.contiguous())  # [B, L, D]
        if resets is not None:
            # a pad takes a zero step (softplus(PAD_LOGIT) == 0): the row's initial state, restored at a slot start,
            # reaches the sequence's first token undecayed, as in a separate run
            delta = delta.masked_fill(attention_mask[:, -seqlen:, None] == 0, PAD_LOGIT)

        # 5-8. scan (offsets before the gate), gate by silu(z)
        if step:
            # A_log, D in their own dtype and B_t, C_t, z as strided slices: the step's kernel reads them in place and
            # computes A = -exp(A_log) itself (no copies, casts or A kernels per step)
            y = ops.selective_state_update(
                cache.ssm_state, x[:, 0], delta[:, 0], self.A_log, Bt[:, 0], Ct[:, 0], self.D, z[:, 0], None, True,
                state_offset=st.h_off, y_offset=st.y_off, offset_index=st.offset_index, A_is_log=True,
                backend=self.backend,
            )[:, None]  # fmt: skip
        else:
            A = -torch.exp(self.A_log.float())  # [D, N]
            Dskip = self.D.float()
            h0 = st.h0 if fresh else cache.ssm_state
            out = ops.selective_scan(
                x.transpose(1, 2), delta.transpose(1, 2), A, Bt.transpose(1, 2), Ct.transpose(1, 2), Dskip,
                z.transpose(1, 2), None, True, initial_state=h0, state_offset=st.h_off, y_offset=st.y_off,
                return_final_state=cache is not None, cu_seqlens=cu_seqlens, resets=resets, backend=self.backend,
            )  # fmt: skip
            if cache is not None:
                y, h_last = out
                cache.store(conv_last, h_last)
            else:
                y = out
            y = y.transpose(1, 2)  # [B, L, D]
        if cache is not None:
            cache.seqlen_offset += seqlen

        # 9. out_proj
        return self.out_proj(y.to(hidden_states.dtype))
