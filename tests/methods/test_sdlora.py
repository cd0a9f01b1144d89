"""SDT / SDLoRA (docs/methods.md §5.5): selection rule on constructed deltas, the warm-up of sdt_select, exact trainable
counts (pitfall 7), and that a phase-2 step changes only the selected entries."""

from __future__ import annotations

import copy

import pytest
import torch
from _peft_cases import VOCAB, tiny_model
from test_bitfit import meta_model, real_empty  # noqa: F401  (fixture)

from ssmtune import PeftModel, SDLoraConfig, get_peft_model, sdt_select
from ssmtune.methods.sdlora import Layout, SparseDelta, select_dims, select_heads_rows
from ssmtune.ops.testing import assert_close

CFG = {"state_freeze": 0.6, "channel_freeze": 0.85, "r": 2, "lora_dropout": 0.0}  # tiny M1: k_c = 5 of 32, k_s = 2 of 5


def _batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (2, 8), generator=g) for _ in range(n)]


def test_select_dims_constructed():
    g = torch.zeros(6, 4)
    g[4] = torch.tensor([0.1, -3.0, 0.2, 2.0])  # s = 13.05: first channel
    g[1] = torch.tensor([-2.0, 0.0, 1.5, 0.1])  # s = 6.26: second
    g[2] = torch.tensor([0.0, 0.0, 0.0, -2.4])  # s = 5.76: third, left out with k_c = 2
    channels, states = select_dims(g, k_c=2, k_s=2)
    assert channels.tolist() == [1, 4]
    assert states.tolist() == [[0, 2], [1, 3]]  # by G², so the sign does not matter


def test_select_heads_rows_constructed():
    heads, rows = select_heads_rows(
        torch.tensor([0.0, 1.0, 0.0, 0.5]), torch.tensor([0.9, 0.0, 0.0, 0.5]), torch.eye(6)[[0, 1, 2, 5, 0, 4]], 2, 1
    )
    assert heads.tolist() == [0, 1] and rows.tolist() == [0]  # row 0 moved in W_B and W_C


@pytest.mark.parametrize(
    ("d", "n", "alpha", "k_c", "k_s"),
    [(1536, 16, 0.75, 15, 4), (4096, 16, 0.9, 41, 2), (5120, 16, 0.95, 51, 1)],
)
def test_sizes_from_the_freeze_ratios(d, n, alpha, k_c, k_s):
    assert Layout(False, d, n, dt_rank=1).sizes(SDLoraConfig(state_freeze=alpha)) == (k_c, k_s)


@pytest.mark.usefixtures("real_empty")
@pytest.mark.parametrize(
    ("size", "count"), [("130m", 12_960 + 442_368), ("1.4b", 70_848 + 2_359_296), ("2.8b", 4_049_664)]
)
def test_count(size, count):
    model = get_peft_model(meta_model("m1", size), SDLoraConfig())
    assert model.trainable_parameters() == count
    # pitfall 7: the only trainable tensors are the sparse deltas and the LoRA pair, no dense Δ_A
    kinds = {type(m).__name__ for m in model.adapter_modules().values()}
    assert kinds == {"SparseDelta", "LoraDelta"}


def test_sdt_select_m1():
    base = tiny_model("m1")
    clean = copy.deepcopy(base)
    model = get_peft_model(base, SDLoraConfig(**CFG))
    frozen = [p for p in base.parameters() if not p.requires_grad]
    before = [p.detach().clone() for p in frozen]
    modes = [m.training for m in model.modules()]
    sel = sdt_select(model, _batches(4), lr=1e-2, steps=3, total_steps=10)
    assert sorted(sel) == ["backbone.layers.0.mixer", "backbone.layers.1.mixer"]
    assert [m.training for m in model.modules()] == modes  # the warm-up restores every module's mode
    for path, s in sel.items():
        g2 = s.warmup["A_log"].pow(2)  # [D, N]
        assert g2.sum() > 0  # the warm-up moved Δ_A
        top = torch.argsort(g2.sum(1), descending=True)[:5]
        assert s.channels.tolist() == sorted(top.tolist())
        for c, states in zip(s.channels, s.states):
            assert states.tolist() == sorted(torch.argsort(g2[c], descending=True)[:2].tolist())
        a_delta = model.adapter_modules()[f"{path}.A_log.sdt"]
        assert bool(a_delta.selected) and torch.equal(a_delta.index, (s.channels[:, None] * 5 + s.states).reshape(-1))
    # nothing of the warm-up is left: base untouched, one parametrization, one LoRA, fresh (zero) adapters
    assert all(torch.equal(b, p) for b, p in zip(before, frozen))
    mixer = base.backbone.layers[0].mixer
    assert len(mixer.parametrizations.A_log) == 1 and len(mixer.x_proj.parametrizations.weight) == 2
    assert list(mixer.out_proj.adapters) == ["default__sdlora"]
    ids = _batches(1, seed=5)[0]
    assert_close("phase 2 at init", clean(ids).logits, model(ids).logits, 0, atol=1e-6)
    assert model.trainable_parameters() == 2 * (5 * 2 + 2 * 5 * 5) + 2 * 2 * (32 + 16)


def test_phase2_step_changes_only_selected_entries(tmp_path):
    base = tiny_model("m1")
    clean = copy.deepcopy(base)
    model = get_peft_model(base, SDLoraConfig(**CFG))
    sel = sdt_select(model, _batches(3), lr=1e-2, steps=3)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model.train()
    for ids in _batches(2, seed=7):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    for i in range(2):
        s = sel[f"backbone.layers.{i}.mixer"]
        m, m0 = base.backbone.layers[i].mixer, clean.backbone.layers[i].mixer
        mask_a = torch.zeros(32, 5, dtype=torch.bool)
        mask_a[s.channels[:, None], s.states] = True
        assert torch.equal(m.A_log != m0.A_log, mask_a)  # exactly the k_c·k_s selected entries moved
        changed = m.x_proj.weight != m0.x_proj.weight  # [R + 2N, D]
        mask_w = torch.zeros(3 + 10, 32, dtype=torch.bool)
        mask_w[3:, s.channels] = True  # all B and C rows, selected input channels only; δ rows frozen
        assert torch.equal(changed, mask_w)
        for name in ("in_proj.weight", "conv1d.weight", "dt_proj.weight", "dt_proj.bias", "D"):
            assert torch.equal(m.get_parameter(name), m0.get_parameter(name)), name
    # the selection travels with the adapter file
    ids = _batches(1, seed=9)[0]
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(clean, tmp_path)
    assert_close("reloaded", model(ids).logits, loaded(ids).logits, 1e-6, atol=1e-6)


def test_sdt_select_m2_proposal():
    base = tiny_model("m2")
    clean = copy.deepcopy(base)
    model = get_peft_model(base, SDLoraConfig(state_freeze=0.75, channel_freeze=0.5, r=2))
    sel = sdt_select(model, _batches(3), lr=1e-2, steps=2)
    s = sel["backbone.layers.0.mixer"]
    score = s.warmup["A_log"].pow(2) + s.warmup["dt_bias"].pow(2)  # [H]
    assert s.channels.tolist() == sorted(torch.argsort(score, descending=True)[:2].tolist())
    bc = s.warmup["in_proj.BC"].pow(2).sum(1)  # [2GN]
    assert s.states.tolist() == sorted(torch.argsort(bc[:12] + bc[12:], descending=True)[:3].tolist())
    ids = _batches(1, seed=5)[0]
    assert_close("phase 2 at init", clean(ids).logits, model(ids).logits, 0, atol=1e-6)
    # 2 layers · (k_h for A_log + k_h for dt_bias + 2·k_s·d_model) + LoRA r=2 on in_proj.z, in_proj.x (32 rows each), out_proj
    assert model.trainable_parameters() == 2 * (2 + 2 + 2 * 3 * 16) + 2 * 2 * ((16 + 32) * 2 + (32 + 16))


def test_placeholder_warns_and_errors():
    model = get_peft_model(tiny_model("m1"), SDLoraConfig(**CFG))
    model.train()
    ids = _batches(1)[0]
    with pytest.warns(UserWarning, match="placeholder selection"):
        model(ids, labels=ids)
    with pytest.raises(ValueError, match="leave k_c=0"):
        get_peft_model(tiny_model("m1"), SDLoraConfig())  # β = 0.99 of D = 32 leaves no channel
    with pytest.raises(ValueError, match="not Mamba-1 targets"):
        get_peft_model(tiny_model("m1"), SDLoraConfig(**CFG, sdt_targets=["dt_bias"]))
    with pytest.raises(ValueError, match="state_freeze must be in"):
        SDLoraConfig(state_freeze=1.0)
    with pytest.raises(TypeError, match="PeftModel"):
        sdt_select(tiny_model("m1"), _batches(1), lr=1e-3)
    assert isinstance(next(iter(model.adapter_modules().values())), SparseDelta)
