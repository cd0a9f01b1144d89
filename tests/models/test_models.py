"""Mixers, LM and cache: decode parity with and without state hooks, masks, input hooks, backends, configs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ssmtune.models import (
    InferenceCache,
    Mamba2Config,
    Mamba2ForCausalLM,
    MambaConfig,
    MambaForCausalLM,
    SSMForSequenceClassification,
    causal_lm_for,
)
from ssmtune.models.hooks import InputHook, StateHook

CONFIGS = {
    "mamba": lambda: MambaConfig(d_model=24, n_layer=2, vocab_size=70),
    "mamba2": lambda: Mamba2Config(
        d_model=24, n_layer=2, vocab_size=70, headdim=8, d_state=16, ngroups=2, chunk_size=8
    ),
    "mamba2-hdim": lambda: Mamba2Config(d_model=16, n_layer=2, vocab_size=64, headdim=8, d_state=8, D_has_hdim=True),
}


class RandomStateHook(StateHook):
    """Non-zero contributions to all four hook points."""

    def __init__(self, mixer: nn.Module, scale: float = 0.5) -> None:
        super().__init__()
        shape = mixer.state_shape
        self.h0 = nn.Parameter(torch.randn(shape) * scale)
        self.h_off = nn.Parameter(torch.randn(shape) * scale)
        self.y_off = nn.Parameter(torch.randn(shape[:-1]) * scale)  # [D] or [H, P]
        self.conv0 = nn.Parameter(torch.randn(mixer.conv_state_shape) * scale)

    def initial_state(self, batch_size: int) -> torch.Tensor:
        return self.h0

    def initial_conv_state(self, batch_size: int) -> torch.Tensor:
        return self.conv0

    def state_offset(self) -> torch.Tensor:
        return self.h_off

    def output_offset(self) -> torch.Tensor:
        return self.y_off


class OffsetOnlyHook(RandomStateHook):
    def initial_state(self, batch_size: int) -> None:
        return None

    def initial_conv_state(self, batch_size: int) -> None:
        return None


def make_model(arch: str, hook: type[StateHook] | None = None):
    model = causal_lm_for(CONFIGS[arch]()).eval()
    if hook is not None:
        for _, mixer in model.mixers():
            mixer.state_hooks["test"] = hook(mixer)
    return model


@pytest.mark.parametrize("hooks", [False, True], ids=["plain", "hooks"])
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_prefill_continue_step_equals_forward(arch: str, hooks: bool) -> None:
    model = make_model(arch, RandomStateHook if hooks else None)
    ids = torch.randint(0, 70 if arch != "mamba2-hdim" else 64, (3, 12))
    full = model(ids).logits
    cache = InferenceCache(model.config.n_layer)
    parts = [model(ids[:, :5], cache=cache).logits, model(ids[:, 5:9], cache=cache).logits]
    parts += [model(ids[:, t : t + 1], cache=cache).logits for t in range(9, 12)]
    assert cache.seqlen_offset == 12
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-4)
    if hooks:
        plain = model.__class__(model.config, init=False).eval()
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if "state_hooks" not in k})
        assert (plain(ids).logits - full).abs().max() > 1e-2  # the hooks really act


@pytest.mark.parametrize("arch", ["mamba", "mamba2"])
def test_allocated_cache_and_unoffset_state(arch: str) -> None:
    model = make_model(arch)
    ids = torch.randint(0, 70, (2, 7))
    ref_cache = model.allocate_cache(2, torch.float32)
    ref = model(ids, cache=ref_cache)
    for _, mixer in model.mixers():
        mixer.state_hooks["off"] = OffsetOnlyHook(mixer)
    cache = model.allocate_cache(2, torch.float32)
    buffers = [layer.ssm_state for layer in cache.layers]
    out = model(ids, cache=cache)
    assert (out.logits - ref.logits).abs().max() > 1e-2
    assert all(layer.ssm_state is buf for layer, buf in zip(cache.layers, buffers))  # written in place
    # offsets act on the read-out only: the first layer's cached states ignore them
    torch.testing.assert_close(cache[0].ssm_state, ref_cache[0].ssm_state)
    torch.testing.assert_close(cache[0].conv_state, ref_cache[0].conv_state)


@pytest.mark.parametrize("arch", ["mamba", "mamba2"])
def test_use_state_hooks_false_ignores_hooks(arch: str) -> None:
    model = make_model(arch)
    x = torch.randn(2, 6, model.config.d_model)
    mixer = model.backbone.layers[0].mixer
    base = mixer(x)
    mixer.state_hooks["h"] = RandomStateHook(mixer)
    torch.testing.assert_close(mixer(x, use_state_hooks=False), base)
    assert (mixer(x) - base).abs().max() > 1e-3


@pytest.mark.filterwarnings("ignore:ssmtune.ops")
@pytest.mark.parametrize("arch", ["mamba", "mamba2"])
def test_backend_ref_equals_auto(arch: str) -> None:
    model = make_model(arch, RandomStateHook)
    ids = torch.randint(0, 70, (2, 19))
    model.backend = "ref"
    assert model.backend == "ref"
    ref = model(ids).logits
    model.backend = "auto"
    auto = model(ids).logits
    torch.testing.assert_close(auto, ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="'cuda-magic'"):
        model.backend = "cuda-magic"


@pytest.mark.parametrize("arch", ["mamba", "mamba2"])
def test_padding_mask_either_side_matches_per_row(arch: str) -> None:
    model = make_model(arch)
    a, b = torch.randint(1, 70, (1, 7)), torch.randint(1, 70, (1, 4))
    ref_a, ref_b = model(a).logits, model(b).logits
    # right padding: causal, the real positions are unaffected
    ids = torch.cat([a, torch.cat([b, torch.zeros(1, 3, dtype=torch.long)], 1)])
    mask = (torch.arange(7) < torch.tensor([[7], [4]])).long()
    out = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(out[1, :4], ref_b[0], rtol=1e-4, atol=1e-4)
    # left padding: masked pads leave the zero state (and conv window) untouched
    ids = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = mask.flip(1)
    out = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(out[0], ref_a[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[1, 3:], ref_b[0], rtol=1e-4, atol=1e-4)


class PrependHook(InputHook):
    def __init__(self, d_model: int, k: int) -> None:
        super().__init__()
        self.num_added = k
        self.prompt = nn.Parameter(torch.randn(k, d_model))

    def forward(self, embeds, attention_mask, labels):
        b = embeds.shape[0]
        embeds = torch.cat([self.prompt.expand(b, -1, -1).to(embeds.dtype), embeds], 1)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(b, self.num_added), attention_mask], 1)
        if labels is not None:
            labels = torch.cat([labels.new_full((b, self.num_added), -100), labels], 1)
        return embeds, attention_mask, labels


@pytest.mark.parametrize("arch", ["mamba", "mamba2"])
def test_input_hook_drops_added_positions(arch: str) -> None:
    model = make_model(arch)
    ids = torch.randint(0, 70, (2, 6))
    hook = PrependHook(model.config.d_model, 3)
    embeds = torch.cat([hook.prompt.expand(2, -1, -1), model.backbone.embeddings(ids)], 1)
    full = model(inputs_embeds=embeds).logits  # [B, 3 + L, V]
    ref = full[:, 3:]
    model.input_hooks["prompt"] = hook
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 6, model.config.padded_vocab_size)
    torch.testing.assert_close(out.logits, ref)
    # the loss runs over the hook-extended sequence: the last virtual position predicts the first real token
    expected = nn.functional.cross_entropy(full[:, 2:-1].reshape(-1, full.shape[-1]), ids.reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    # the hook acts only on a fresh cache: a continuation sees no extra positions
    cache = InferenceCache(model.config.n_layer)
    model(ids[:, :4], cache=cache)
    assert cache.seqlen_offset == 7
    step = model(ids[:, 4:], cache=cache).logits
    torch.testing.assert_close(step, ref[:, 4:], rtol=1e-4, atol=1e-4)


def test_loss_is_shifted_and_ignores_minus_100() -> None:
    model = make_model("mamba")
    ids = torch.randint(0, 70, (2, 5))
    labels = ids.clone()
    labels[:, :2] = -100
    out = model(ids, labels=labels)
    lp = out.logits.log_softmax(-1)
    manual = -torch.stack([lp[b, t - 1, ids[b, t]] for b in range(2) for t in range(2, 5)]).mean()
    torch.testing.assert_close(out.loss, manual)


@pytest.mark.parametrize("arch", ["mamba", "mamba2"])
def test_gradients_reach_every_parameter(arch: str) -> None:
    model = make_model(arch, RandomStateHook).train()
    ids = torch.randint(0, 70, (2, 9))
    model(ids, labels=ids).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_sequence_classification_pools_last_real_token() -> None:
    lm = make_model("mamba2")
    clf = SSMForSequenceClassification.from_causal_lm(lm, num_labels=3).eval()
    a, b = torch.randint(1, 70, (1, 6)), torch.randint(1, 70, (1, 3))
    ids = torch.cat([a, torch.cat([b, torch.zeros(1, 3, dtype=torch.long)], 1)])
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    out = clf(ids, attention_mask=mask, labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3)
    torch.testing.assert_close(out.logits[1], clf(b).logits[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.loss, nn.functional.cross_entropy(out.logits, torch.tensor([0, 2])))
    reg = SSMForSequenceClassification(lm.config, num_labels=1)
    out = reg(ids, attention_mask=mask, labels=torch.tensor([0.5, -1.0]))
    torch.testing.assert_close(out.loss, nn.functional.mse_loss(out.logits[:, 0], torch.tensor([0.5, -1.0])))
    with pytest.raises(ValueError, match="num_labels"):
        SSMForSequenceClassification(lm.config, num_labels=0)


def test_init_follows_mamba_ssm() -> None:
    cfg = MambaConfig(d_model=32, n_layer=2, vocab_size=50, dt_min=0.01, dt_max=0.05)
    model = MambaForCausalLM(cfg)
    assert model.config.padded_vocab_size == 56 and model.lm_head.weight is model.backbone.embeddings.weight
    mixer = model.backbone.layers[0].mixer
    dt = nn.functional.softplus(mixer.dt_proj.bias)
    assert dt.min() >= 0.01 - 1e-6 and dt.max() <= 0.05 + 1e-6
    torch.testing.assert_close(mixer.A_log[3], torch.log(torch.arange(1.0, 17.0)))
    assert (mixer.D == 1).all() and mixer.x_proj.weight.shape == (2 + 32, 64)
    cfg2 = Mamba2Config(d_model=32, n_layer=2, vocab_size=50, headdim=16, d_state=8, tie_embeddings=False)
    model2 = Mamba2ForCausalLM(cfg2)
    m2 = model2.backbone.layers[1].mixer
    assert m2.state_shape == (4, 16, 8) and m2.conv_state_shape == (64 + 16, 3)
    assert -torch.exp(m2.A_log).max() <= -1 + 1e-6 and model2.lm_head.weight is not model2.backbone.embeddings.weight
    assert math.isclose(m2.in_proj.weight.shape[0], 2 * 64 + 16 + 4)


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (MambaConfig, {"d_model": 0}, "d_model.*0"),
        (MambaConfig, {"dt_rank": -3}, "dt_rank.*-3"),
        (MambaConfig, {"dt_min": 0.5, "dt_max": 0.1}, "dt_min"),
        (Mamba2Config, {"d_model": 24, "headdim": 7}, "headdim=7"),
        (Mamba2Config, {"d_model": 32, "headdim": 16, "ngroups": 3}, "ngroups=3"),
        (Mamba2Config, {"A_init_range": (0.0, 1.0)}, "A_init_range"),
    ],
)
def test_config_validation(cls, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_config_dict_round_trip() -> None:
    cfg = Mamba2Config(d_model=24, n_layer=3, headdim=8, ngroups=2)
    again = Mamba2Config.from_dict(cfg.to_dict())
    assert again == cfg and type(again) is Mamba2Config
    assert MambaConfig(d_model=40).dt_rank == 3
    with pytest.raises(ValueError, match="'rwkv'"):
        MambaConfig.from_dict({"model_type": "rwkv"})


def test_reorder_selects_rows() -> None:
    model = make_model("mamba")
    ids = torch.randint(0, 70, (3, 5))
    cache = InferenceCache(2)
    model(ids, cache=cache)
    before = cache[1].ssm_state.clone()
    cache.reorder(torch.tensor([2, 2, 0]))
    torch.testing.assert_close(cache[1].ssm_state, before[[2, 2, 0]])
    with pytest.raises(ValueError, match="cache holds batch 3"):
        model(ids[:2, :1], cache=cache)


@pytest.mark.parametrize("arch", ["mamba", "mamba2"])
def test_bf16_weights_decode_close_to_forward(arch: str) -> None:
    model = make_model(arch)
    ids = torch.randint(0, 70, (2, 8))
    ref = model(ids).logits
    model = model.to(torch.bfloat16)
    for _, mixer in model.mixers():
        mixer.A_log.data, mixer.D.data = mixer.A_log.data.float(), mixer.D.data.float()
    full = model(ids).logits
    cache = model.allocate_cache(2)
    assert cache[0].conv_state.dtype == torch.bfloat16 and cache[0].ssm_state.dtype == torch.float32
    steps = [model(ids[:, :4], cache=cache).logits] + [
        model(ids[:, t : t + 1], cache=cache).logits for t in range(4, 8)
    ]
    # logits come in the head's dtype (no fp32 copy of [B, L, V]); the loss is computed in fp32 from them
    assert full.dtype == torch.bfloat16 and ref.dtype == torch.float32
    torch.testing.assert_close(full.float(), ref, rtol=0.05, atol=2e-2)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0.05, atol=2e-2)
