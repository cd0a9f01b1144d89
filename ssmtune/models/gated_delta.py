"""Gated DeltaNet and KDA hybrids (Qwen3.5 / 3.6, Qwen3.5-MoE, Qwen3-Next, OLMo-Hybrid, Kimi-Linear) with ssmtune's
gated delta rule.

``from_transformers`` (models/hybrid.py) swaps each transformers Gated DeltaNet for a ``HostedGDNMixer``: the host's
projections, conv, ``A_log``, ``dt_bias``, gated norm and output projection, shared by reference under the host's
names, around ``ssmtune.ops.gated_delta_rule`` (fla's kernels on CUDA when installed, else the chunked torch path).
The state per row is S [H, K, V] (value heads H, key head dim K, value head dim V), read out as o_t = Sᵀ q̂_t with
q̂ = l2norm(q) / sqrt(K), key heads repeated for grouped value heads.

State hooks, as the SSD mixers take them (models/hooks.py): initial_state S_0 [H, K, V], state_offset S' [H, K, V]
(read out as q̂ᵀS' and added before the gated norm, never decayed), output_offset y' [H, V], initial_conv_state
[conv channels, K_conv - 1]. The cache holds the un-offset state. Padded positions (``attention_mask == 0``) take a
zero step (no decay, β = 0), so S_0 acts at each row's first real token under left padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .hooks import MergedState, collect_state
from .hybrid import HYBRID_MODEL_TYPES, MIXER_BUILDERS, _family, check_contract, host_cache
from .mamba import mask_padding
from .mamba2 import conv0_at_first_token

GDN_ATTRIBUTES = ("conv1d", "dt_bias", "A_log", "num_k_heads", "num_v_heads", "head_k_dim", "head_v_dim", "layer_idx",
                  "activation")  # fmt: skip
GDN_CHUNK = 64  # transformers' chunk length for the torch path


class HostedGDNMixer(nn.Module):
    """ssmtune's Gated DeltaNet around a transformers one's parameters, with the host's call signature:
    ``forward(hidden_states, cache=None, attention_mask=None, **kwargs)``.

    A family names its Linears (``PROJECTIONS``, the gated norm ``NORM``, the output ``OUT``) and splits them
    (``project``); the rest is shared. ``lora_targets`` are the mixer's Linears that LoRA may wrap.
    """

    PROJECTIONS: tuple[str, ...] = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")
    NORM = "norm"
    OUT = "out_proj"
    CHUNK: int | None = GDN_CHUNK  # the torch path's chunk length (None: the op's default)

    ATTRIBUTES = GDN_ATTRIBUTES
    SHARED = ("conv1d", "dt_bias", "A_log")  # besides the Linears and the norm, shared by reference

    def __init__(self, host: nn.Module) -> None:
        super().__init__()
        check_contract(host, self.ATTRIBUTES + self.PROJECTIONS + (self.NORM, self.OUT))
        family = _family(host)
        if host.activation not in ("silu", "swish"):
            raise ValueError(f"{family}: conv activation {host.activation!r} is not supported (only 'silu')")
        self.family = family
        self.layer_idx = host.layer_idx
        self.num_k_heads, self.num_v_heads, self.head_k_dim, self.head_v_dim = self.head_dims(host)
        if self.num_v_heads % self.num_k_heads != 0:
            raise ValueError(f"{family}: value heads ({self.num_v_heads}) must be a multiple of key heads "
                             f"({self.num_k_heads})")  # fmt: skip
        self.chunk_size = self.CHUNK
        for name in (*self.PROJECTIONS, self.NORM, self.OUT, *self.SHARED):
            setattr(self, name, getattr(host, name))  # by reference: the host's parameter names stay
        self.beta_scale = 1.0
        self.state_hooks = nn.ModuleDict()
        self.backend = "auto"
        want = 2 * self.num_k_heads * self.head_k_dim + self.num_v_heads * self.head_v_dim
        if self.conv_dim != want:
            raise ValueError(f"{family}: conv channels {self.conv_dim} != 2·Hk·K + H·V = {want}")
        # the block's pre-norm, for Prefix-Tuning (a plain reference: the block owns it)
        object.__setattr__(self, "host_norm", None)

    @staticmethod
    def head_dims(host: nn.Module) -> tuple[int, int, int, int]:
        """(key heads, value heads, key head dim, value head dim) of the host."""
        return host.num_k_heads, host.num_v_heads, host.head_k_dim, host.head_v_dim

    @property
    def lora_targets(self) -> tuple[str, ...]:
        return (*self.PROJECTIONS, self.OUT)

    @property
    def nheads(self) -> int:
        return self.num_v_heads

    @property
    def conv_dim(self) -> int:
        return self.conv1d.weight.shape[0]

    @property
    def state_shape(self) -> tuple[int, int, int]:
        """(H, K, V): the per-row recurrent state, initial state and state offset."""
        return (self.num_v_heads, self.head_k_dim, self.head_v_dim)

    @property
    def output_offset_shape(self) -> tuple[int, int]:
        """(H, V): the output offset y'."""
        return (self.num_v_heads, self.head_v_dim)

    @property
    def conv_state_shape(self) -> tuple[int, int]:
        return (self.conv_dim, self.conv1d.weight.shape[-1] - 1)

    def project(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """u [B, L, d_model] -> (q|k|v [B, L, conv channels], z [B, L, H·V], b [B, L, H], a [B, L, H])."""
        return self.in_proj_qkv(u), self.in_proj_z(u), self.in_proj_b(u), self.in_proj_a(u)

    def decay(self, a: torch.Tensor) -> torch.Tensor:
        """The log-decay g [B, L, H] from the gate input a [B, L, H]: -exp(A_log) · softplus(a + dt_bias)."""
        return -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache=None,
        attention_mask: torch.Tensor | None = None,
        *,
        use_state_hooks: bool = True,
        cache_params=None,
        **kwargs,
    ) -> torch.Tensor:
        cache = host_cache(self, cache, cache_params, attention_mask, kwargs)
        batch, seqlen, _ = hidden_states.shape
        fresh = cache is None or cache.fresh
        st = (
            collect_state(self.state_hooks.values(), batch, initial=fresh)
            if use_state_hooks and self.state_hooks
            else MergedState()
        )
        hk, h, dk, dv = self.num_k_heads, self.num_v_heads, self.head_k_dim, self.head_v_dim
        u = mask_padding(hidden_states, attention_mask)
        qkv, z, b, a = self.project(u)
        weight, bias = self.conv1d.weight[:, 0, :], self.conv1d.bias
        step = not fresh and seqlen == 1
        qkv = qkv.transpose(1, 2)  # [B, C, L]
        if step:
            qkv = ops.causal_conv1d_update(
                qkv[:, :, 0], cache.conv_state, weight, bias, activation="silu",
                backend=self.backend if self.backend != "fla" else "auto",
            )[..., None]  # fmt: skip
        else:
            conv0 = st.conv0 if fresh else cache.conv_state
            if fresh and conv0 is not None and attention_mask is not None:
                qkv, conv0 = conv0_at_first_token(qkv, conv0, attention_mask)
            qkv, conv_last = ops.causal_conv1d(
                qkv, weight, bias, initial_state=conv0, activation="silu", return_final_state=True,
                backend=self.backend if self.backend != "fla" else "auto",
            )  # fmt: skip
        qkv = mask_padding(qkv.transpose(1, 2), attention_mask)
        q, k, v = torch.split(qkv, [hk * dk, hk * dk, h * dv], dim=-1)
        q, k, v = q.reshape(batch, seqlen, hk, dk), k.reshape(batch, seqlen, hk, dk), v.reshape(batch, seqlen, h, dv)
        beta = b.sigmoid() * self.beta_scale
        g = self.decay(a)
        if attention_mask is not None:  # a zero step: no decay, no write
            pad = attention_mask[:, -seqlen:, None] == 0
            beta = beta.masked_fill(pad, 0.0)
            g = g.masked_fill(pad if g.dim() == 3 else pad[..., None], 0.0)
        h0 = st.h0 if fresh else cache.ssm_state
        out = ops.gated_delta_rule(
            q, k, v, g, beta, use_qk_l2norm=True, initial_state=h0, state_offset=st.h_off, output_offset=st.y_off,
            output_final_state=cache is not None, chunk_size=self.chunk_size,
            backend="ref" if step else self.backend,
        )  # fmt: skip
        if cache is not None:
            o, s_last = out
            if step:
                cache.ssm_state.copy_(s_last)
            else:
                cache.store(conv_last, s_last)
            cache.seqlen_offset += seqlen
        else:
            o = out
        o = getattr(self, self.NORM)(o.reshape(-1, dv), z.reshape(-1, dv))
        return getattr(self, self.OUT)(o.reshape(batch, seqlen, h * dv).to(hidden_states.dtype))

    def extra_repr(self) -> str:
        return f"{self.family}, layer_idx={self.layer_idx}, state_shape={self.state_shape}"


class Qwen3NextGDNMixer(HostedGDNMixer):
    """Qwen3-Next: q, k, v, z fused in ``in_proj_qkvz`` and b, a in ``in_proj_ba``, interleaved per key head."""

    PROJECTIONS = ("in_proj_qkvz", "in_proj_ba")

    def project(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, seqlen, _ = u.shape
        hk, dk, dv = self.num_k_heads, self.head_k_dim, self.head_v_dim
        m = self.num_v_heads // hk
        qkvz = self.in_proj_qkvz(u).reshape(batch, seqlen, hk, 2 * dk + 2 * m * dv)
        q, k, v, z = torch.split(qkvz, [dk, dk, m * dv, m * dv], dim=-1)
        b, a = torch.split(self.in_proj_ba(u).reshape(batch, seqlen, hk, 2 * m), [m, m], dim=-1)
        qkv = torch.cat([t.reshape(batch, seqlen, -1) for t in (q, k, v)], dim=-1)
        return qkv, z.reshape(batch, seqlen, -1), b.reshape(batch, seqlen, -1), a.reshape(batch, seqlen, -1)


class OlmoHybridGDNMixer(HostedGDNMixer):
    """OLMo-Hybrid: separate q/k/v/a/b projections, the gate from ``g_proj``, β in [0, 2] with ``allow_neg_eigval``."""

    PROJECTIONS = ("q_proj", "k_proj", "v_proj", "a_proj", "b_proj", "g_proj")
    NORM = "o_norm"
    OUT = "o_proj"

    def __init__(self, host: nn.Module) -> None:
        super().__init__(host)
        self.beta_scale = 2.0 if getattr(host, "allow_neg_eigval", False) else 1.0

    def project(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        qkv = torch.cat([self.q_proj(u), self.k_proj(u), self.v_proj(u)], dim=-1)
        return qkv, self.g_proj(u), self.b_proj(u), self.a_proj(u)


class KimiLinearKDAMixer(HostedGDNMixer):
    """Kimi-Linear (KDA): the gated delta rule with one decay per key channel, from the low-rank ``forget_gate``
    (its ``A_log`` [H], ``dt_bias`` [H·K]); the output gate is low-rank too (``g_a_proj``, ``g_b_proj``), and the
    gated norm uses a sigmoid (the host's norm module, shared)."""

    PROJECTIONS = ("q_proj", "k_proj", "v_proj", "b_proj", "g_a_proj", "g_b_proj")
    NORM = "o_norm"
    OUT = "o_proj"
    ATTRIBUTES = ("conv1d", "forget_gate", "num_heads", "head_dim", "layer_idx", "activation")
    SHARED = ("conv1d", "forget_gate")
    CHUNK = None  # the op's shorter chunk for per-channel gates

    @staticmethod
    def head_dims(host: nn.Module) -> tuple[int, int, int, int]:
        return host.num_heads, host.num_heads, host.head_dim, host.head_dim

    @property
    def A_log(self) -> torch.Tensor:
        return self.forget_gate.A_log

    def project(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        qkv = torch.cat([self.q_proj(u), self.k_proj(u), self.v_proj(u)], dim=-1)
        gate = self.forget_gate
        return qkv, self.g_b_proj(self.g_a_proj(u)), self.b_proj(u), gate.f_b_proj(gate.f_a_proj(u))

    def decay(self, a: torch.Tensor) -> torch.Tensor:
        """g [B, L, H, K] = -exp(A_log_h) · softplus(a + dt_bias), one decay per key channel."""
        h, dk = self.num_v_heads, self.head_k_dim
        g = F.softplus(a.float() + self.forget_gate.dt_bias.float()).unflatten(-1, (h, dk))
        return -self.forget_gate.A_log.float().reshape(h, 1).exp() * g


# model_type -> the transformers class of its Gated DeltaNet; class name -> our builder
GDN_MODEL_TYPES: dict[str, str] = {
    "qwen3_5_text": "Qwen3_5GatedDeltaNet",
    "qwen3_5": "Qwen3_5GatedDeltaNet",
    "qwen3_5_moe_text": "Qwen3_5MoeGatedDeltaNet",
    "qwen3_5_moe": "Qwen3_5MoeGatedDeltaNet",
    "qwen3_next": "Qwen3NextGatedDeltaNet",
    "olmo_hybrid": "OlmoHybridGatedDeltaNet",
    "kimi_linear": "KimiLinearDeltaAttention",
}
GDN_BUILDERS = {
    "Qwen3_5GatedDeltaNet": HostedGDNMixer,
    "Qwen3_5MoeGatedDeltaNet": HostedGDNMixer,
    "Qwen3NextGatedDeltaNet": Qwen3NextGDNMixer,
    "OlmoHybridGatedDeltaNet": OlmoHybridGDNMixer,
    "KimiLinearDeltaAttention": KimiLinearKDAMixer,
}
# rows of models/hybrid.py's tables: from_transformers, load_model and the error messages see these families
HYBRID_MODEL_TYPES.update(GDN_MODEL_TYPES)
MIXER_BUILDERS.update(GDN_BUILDERS)
