"""Mamba-2 (SSD) mixer (docs/methods.md §3), with parameter names of HF transformers and mamba_ssm.

Glossary: ``in_proj`` → [z (D), xBC (D+2GN), dt (H)]; ``conv1d`` over the whole xBC; ``dt_bias`` [H];
``A_log`` [H] (A = −exp(A_log), one scalar per head); ``D`` → D_skip [H] (or [D] with ``D_has_hdim``);
``norm`` → gated RMSNorm RMSNorm(y ⊙ silu(z))·w in groups of D/G channels; ``out_proj`` → d_model.

The scan runs without z; state offsets are added to y before the gated norm, as docs/methods.md §4.1 prescribes.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .. import ops
from .cache import LayerCache
from .config import Mamba2Config
from .hooks import MergedState, check_packed, check_rows, collect_state, conv0_at_slots
from .mamba import _inverse_softplus, mask_padding, sample_dt


class RMSNormGated(nn.Module):
    """y = rmsnorm_grouped(y ⊙ silu(z)) · w (mamba_ssm ``norm_before_gate=False``), normalised per group of channels."""

    def __init__(self, hidden_size: int, group_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.group_size = group_size
        self.eps = eps
        self.backend: str = "auto"  # ssmtune.ops.rms_norm's: the fused Triton kernels on CUDA

    def forward(self, y: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return ops.rms_norm(y, self.weight, z=z, eps=self.eps, group_size=self.group_size, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, group_size={self.group_size}, eps={self.eps}"


class Mamba2Mixer(nn.Module):
    """SSD mixer: ``forward(hidden_states [B, L, d_model], cache) -> [B, L, d_model]``."""

    reads_offset_index = True  # the decode step takes MergedState.offset_index (models/hooks.py)

    def __init__(self, config: Mamba2Config, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        d, n, g, h, k = config.d_inner, config.d_state, config.ngroups, config.nheads, config.d_conv
        self.d_inner = d
        self.ngroups = g
        self.headdim = config.headdim
        self.chunk_size = config.chunk_size
        conv_dim = d + 2 * g * n
        self.in_proj = nn.Linear(config.d_model, d + conv_dim + h, bias=config.bias)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, k, groups=conv_dim, padding=k - 1, bias=config.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(h))
        self.A_log = nn.Parameter(torch.empty(h))
        self.D = nn.Parameter(torch.empty(d if config.D_has_hdim else h))
        self.norm = RMSNormGated(d, group_size=d // g, eps=config.norm_epsilon)
        self.out_proj = nn.Linear(d, config.d_model, bias=config.bias)
        self.state_hooks = nn.ModuleDict()
        self.backend: str = "auto"
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """mamba_ssm's init: dt_bias = softplus⁻¹(Δ), A = uniform(A_init_range), D = 1."""
        cfg = self.config
        h = self.A_log.shape[0]
        dev = self.A_log.device
        self.dt_bias.copy_(_inverse_softplus(sample_dt(h, cfg.dt_min, cfg.dt_max, cfg.dt_init_floor, dev)))
        lo, hi = cfg.A_init_range
        self.A_log.copy_(torch.log(torch.empty(h, device=dev).uniform_(lo, hi)))
        self.D.fill_(1.0)
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True

    @property
    def nheads(self) -> int:
        return self.A_log.shape[0]

    @property
    def conv_dim(self) -> int:
        """D + 2GN, from the current conv weight."""
        return self.conv1d.weight.shape[0]

    @property
    def d_state(self) -> int:
        """Current state size N, from the conv width over xBC."""
        return (self.conv_dim - self.d_inner) // (2 * self.ngroups)

    @property
    def state_shape(self) -> tuple[int, int, int]:
        """(H, P, N): the per-row SSM state, initial state and state offset."""
        h = self.nheads
        return (h, self.d_inner // h, self.d_state)

    @property
    def conv_state_shape(self) -> tuple[int, int]:
        """(D+2GN, K-1): the conv window over xBC before the next token."""
        return (self.conv_dim, self.conv1d.weight.shape[-1] - 1)

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
        every slot start restarts the scan from the row's initial state (``ops.ssd_scan``)."""
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
        d, g, n = self.d_inner, self.ngroups, self.d_state
        h = self.nheads
        p = d // h

        # 1. z, xBC, dt = in_proj(u)
        zxbcdt = self.project(mask_padding(hidden_states, attention_mask))  # [B, L, 2D+2GN+H]
        z, xBC, dt = torch.split(zxbcdt, [d, self.conv_dim, h], dim=-1)
        weight, bias = self.conv1d.weight[:, 0, :], self.conv1d.bias  # [D+2GN, K]
        step = not fresh and seqlen == 1

        # 2. causal conv + silu over the whole xBC
        xBC = xBC.transpose(1, 2)  # [B, D+2GN, L]
        conv0 = None if step else (st.conv0 if fresh else cache.conv_state)
        if resets is not None and (conv0 is not None or self.config.bias):
            # every sequence of the rows starts from conv0 (in_proj's bias would leave pads nonzero)
            xBC = conv0_at_slots(xBC, conv0, attention_mask)
        elif fresh and conv0 is not None and attention_mask is not None:
            xBC, conv0 = conv0_at_first_token(xBC, conv0, attention_mask)
        fused = self._conv_scan((xBC, weight, bias, conv0, dt, st.h0, st.h_off, st.y_off), cache, cu_seqlens, resets)
        if fused is not None:
            # training: conv and scan as one autograd node that recomputes the conv in its backward
            dt, dt_bias, softplus = self.scan_dt(dt, attention_mask)
            A, Dskip = -torch.exp(self.A_log.float()), self.D.float()
            y = fused(
                xBC, weight, bias, dt, A, headdim=p, ngroups=g, conv_initial_state=conv0, mask=attention_mask,
                chunk_size=self.scan_chunk(resets), D=Dskip if Dskip.shape[0] == h else Dskip.view(h, p),
                dt_bias=dt_bias, dt_softplus=softplus, initial_state=st.h0, state_offset=st.h_off, y_offset=st.y_off,
            )  # fmt: skip
            y = self.gate_norm(y.reshape(batch, seqlen, d), z)
            return self.out_proj(y.to(hidden_states.dtype))
        if step:
            xBC = ops.causal_conv1d_update(
                xBC[:, :, 0], cache.conv_state, weight, bias, activation="silu", backend=self.backend
            )[:, :, None]
        else:
            xBC, conv_last = ops.causal_conv1d(
                xBC,
                weight,
                bias,
                initial_state=conv0,
                activation="silu",
                return_final_state=True,
                channels_last=True,
                cu_seqlens=cu_seqlens,
                backend=self.backend,
            )  # [B, D+2GN, L] view of [B, L, D+2GN] memory (the scan reads time-major), [B, D+2GN, K-1]
        xBC = mask_padding(xBC.transpose(1, 2), attention_mask)  # [B, L, D+2GN]

        # 3. split into x [B, L, H, P], B_t, C_t [B, L, G, N]
        x, Bt, Ct = torch.split(xBC, [d, g * n, g * n], dim=-1)
        x = x.reshape(batch, seqlen, h, p)
        Bt = Bt.reshape(batch, seqlen, g, n)
        Ct = Ct.reshape(batch, seqlen, g, n)
        # the decode step reads A_log and D in their own dtype and computes A = -exp(A_log) in its kernel: no casts or
        # A kernels per step
        A = self.A_log if step else -torch.exp(self.A_log.float())  # [H]
        Dskip = self.D if step else self.D.float()
        if Dskip.shape[0] != h:
            Dskip = Dskip.view(h, p)

        # 4-5. SSD scan without z; offsets land on y before the gated norm
        dt, dt_bias, softplus = self.scan_dt(dt, attention_mask)
        if step:
            y = ops.ssd_state_update(
                cache.ssm_state, x[:, 0], dt[:, 0], A, Bt[:, 0], Ct[:, 0], Dskip, None, dt_bias, softplus,
                state_offset=st.h_off, y_offset=st.y_off, offset_index=st.offset_index, A_is_log=True,
                backend=self.backend,
            )[:, None]  # fmt: skip
        else:
            h0 = st.h0 if fresh else cache.ssm_state
            out = ops.ssd_scan(
                x, dt, A, Bt, Ct, chunk_size=self.scan_chunk(resets), D=Dskip, dt_bias=dt_bias, dt_softplus=softplus,
                initial_state=h0, state_offset=st.h_off, y_offset=st.y_off, return_final_state=cache is not None,
                cu_seqlens=cu_seqlens, resets=resets, backend=self.backend,
            )  # fmt: skip
            if cache is not None:
                y, h_last = out
                cache.store(conv_last, h_last)
            else:
                y = out
        if cache is not None:
            cache.seqlen_offset += seqlen

        # 6-7. gated RMSNorm, out_proj
        y = self.gate_norm(y.reshape(batch, seqlen, d), z)
        return self.out_proj(y.to(hidden_states.dtype))

    def scan_chunk(self, resets: torch.Tensor | None) -> int:
        """The SSD's chunk length: the config's, or under ``resets`` RESET_ALIGN unless the config's divides it (a
        chunked scan restarts between chunks; the chunk length changes rounding only, not the maths)."""
        if resets is None or ops.RESET_ALIGN % self.chunk_size == 0:
            return self.chunk_size
        return ops.RESET_ALIGN

    def _conv_scan(self, inputs: tuple, cache, cu_seqlens, resets):
        """The fused conv + scan op for a training forward (a gradient to take, no cache, not packed), else None.
        Also when no gradient reaches the conv (a state adapter's first mixer): the conv input it keeps is smaller
        than the conv output and chunk states the scan alone would keep (at d_state 128). Packed rows (``resets``)
        take it too."""
        if cache is not None or cu_seqlens is not None or not torch.is_grad_enabled():
            return None
        params = (self.A_log, self.D, self.dt_bias)
        if not any(t is not None and t.requires_grad for t in (*inputs, *params)):
            return None
        fused = ops.conv_ssd_fused(self.backend, inputs[0].device, self.headdim)
        return fused if fused is None or resets is None else functools.partial(fused, resets=resets)

    # Steps a host model may change (models/hybrid.py): the input projection, the step size of the scan, the gate.
    def project(self, u: torch.Tensor) -> torch.Tensor:
        """u [B, L, d_model] -> [z, xBC, dt] [B, L, 2D+2GN+H]."""
        return self.in_proj(u)

    def scan_dt(
        self, dt: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """(dt, dt_bias, dt_softplus) for the scan and the decode step. Padded positions get a zero step, so they
        neither decay nor feed the state: an initial state acts at each row's first real token under left padding."""
        if attention_mask is None:
            return dt, self.dt_bias, True
        pad = attention_mask[:, -dt.shape[1] :, None] == 0  # [B, L, 1]
        # softplus(-1e4 + dt_bias) is 0 in fp32
        return dt.masked_fill(pad, -1e4), self.dt_bias, True

    def gate_norm(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Gated RMSNorm of the scan output y [B, L, D] by z [B, L, D]."""
        return self.norm(y, z)


def conv0_at_first_token(
    xBC: torch.Tensor, conv0: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Place an initial conv window right before each row's first real token (left padding moves it right).

    xBC [B, C, L] (the conv input), conv0 [C, K-1] or [B, C, K-1], attention_mask [B, >=L]. Returns the conv input and
    initial state that a row without padding would see at its first token; rows without left padding are unchanged.
    """
    batch, channels, seqlen = xBC.shape
    k1 = conv0.shape[-1]
    mask = attention_mask[:, -seqlen:]
    pads = (mask.cumsum(-1) == 0).sum(-1).to(xBC.device)  # [B] leading pad positions
    ext = torch.cat([conv0.to(xBC.dtype).expand(batch, channels, k1), xBC], dim=-1)  # [B, C, K-1+L]
    t = torch.arange(k1 + seqlen, device=xBC.device)[None, :]  # [1, K-1+L]
    real = t >= k1 + pads[:, None]
    src = torch.where(real, t, t - pads[:, None])  # conv0 shifted right by the row's padding
    keep = (src >= 0)[:, None, :]
    out = ext.gather(-1, src.clamp(min=0)[:, None, :].expand(batch, channels, -1)) * keep
    return out[..., k1:], out[..., :k1]
