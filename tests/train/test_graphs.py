"""CUDA-graph training steps (ssmtune.train.graphs): argument checks on the CPU, graphed = eager on the GPU."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from ssmtune import LoraConfig, StateOffsetConfig, get_peft_model
from ssmtune.models import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM
from ssmtune.train import TrainConfig, fit
from ssmtune.train.graphs import GraphedStep, GraphedTrainStep, pad_batch
from ssmtune.train.loop import GRAPH_METHODS, graph_decision, padding_overhead
from ssmtune.train.optim import set_capturable


def _noop(batch):
    return torch.zeros(())


def test_warmup_must_be_positive():
    with pytest.raises(ValueError, match="warmup must be >= 1.*got 0"):
        GraphedStep(_noop, {}, warmup=0)


def test_optimizer_must_be_capturable():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3, capturable=False)
    with pytest.raises(ValueError, match="AdamW must be built with capturable=True"):
        GraphedStep(_noop, {}, optimizers=[opt])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_needs_cuda():
    with pytest.raises(RuntimeError, match="need a CUDA device"):
        GraphedStep(_noop, {"input_ids": torch.zeros(2, 3, dtype=torch.long)})


def _model(kind: str, method: str, device: str = "cuda") -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "mamba":
        base = MambaForCausalLM(MambaConfig(d_model=64, n_layer=2, vocab_size=97))
    else:
        base = Mamba2ForCausalLM(Mamba2Config(d_model=64, n_layer=2, vocab_size=97, headdim=32, d_state=32))
    base.backend = "triton" if device == "cuda" else "torch"
    cfg = StateOffsetConfig(variant="h") if method == "state_offset_h" else LoraConfig(r=4, target_modules=["in_proj"])
    model = get_peft_model(base, cfg).to(device)
    for p in model.parameters():
        p.data = p.data.float() if p.requires_grad else p.data.to(torch.bfloat16 if p.ndim > 1 else p.dtype)
    return model.train()


def _stepper(model: torch.nn.Module):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, capturable=True)

    def step(batch):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            loss = model(batch["input_ids"], labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        return loss

    return step, opt


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("kind", "method"), [("mamba", "state_offset_h"), ("mamba", "lora"),
                                              ("mamba2", "state_offset_h")])  # fmt: skip
def test_graphed_steps_match_eager_steps(kind, method):
    """Warm-up on batch 0 and replays on batches 1-4 train the adapter as five eager steps do (same kernels; dB/dC
    atomics can reorder sums, hence a tolerance); a batch of another shape is refused."""
    batches = [{"input_ids": torch.randint(0, 97, (3, 67), device="cuda")} for _ in range(5)]
    eager = _model(kind, method)
    graphed = copy.deepcopy(eager)
    initial = [p.detach().clone() for p in eager.parameters() if p.requires_grad]
    step, _ = _stepper(eager)
    eager_losses = [step(b).item() for b in batches]
    gstep, _ = _stepper(graphed)
    g = GraphedStep(gstep, batches[0], warmup=1)
    graph_losses = [g.run(b).item() for b in batches[1:]]
    torch.testing.assert_close(torch.tensor(graph_losses), torch.tensor(eager_losses[1:]), rtol=1e-3, atol=1e-3)
    for (name, pe), pg in zip(eager.named_parameters(), graphed.parameters(), strict=True):
        if pe.requires_grad:
            torch.testing.assert_close(pg, pe, rtol=1e-3, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    trained = [p for p in graphed.parameters() if p.requires_grad]
    assert all(not torch.equal(p, p0) for p, p0 in zip(trained, initial, strict=True))  # every adapter tensor moved
    with pytest.raises(ValueError, match=r"shape \(3, 68\)"):
        g.run({"input_ids": torch.zeros(3, 68, dtype=torch.long, device="cuda")})


def test_pad_batch_keeps_the_loss_positions():
    batch = {"input_ids": torch.tensor([[5, 6, 7]]), "labels": torch.tensor([[-100, 6, 7]]),
             "attention_mask": torch.tensor([[1, 1, 1]])}  # fmt: skip
    out = pad_batch(batch, rows=2, length=5, ignore_index=-100)
    assert out["input_ids"].tolist() == [[5, 6, 7, 0, 0], [0] * 5]
    assert out["labels"].tolist() == [[-100, 6, 7, -100, -100], [-100] * 5]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [0] * 5]
    with pytest.raises(ValueError, match=r"batch of shape \(1, 3\) does not fit the captured shape \(1, 2\)"):
        pad_batch(batch, rows=1, length=2, ignore_index=-100)


def test_set_capturable_round_trip():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.5)
    p.grad = torch.ones(3)
    opt.step()
    set_capturable(opt, True)
    g = opt.param_groups[0]
    assert g["capturable"] and torch.is_tensor(g["lr"]) and g["lr"].item() == 0.5
    assert opt.state[p]["step"].dtype == torch.float32
    set_capturable(opt, False)
    assert g["capturable"] is False and g["lr"] == 0.5 and opt.state[p]["step"].device.type == "cpu"


def test_fit_config_refuses_what_a_graph_cannot_do(tmp_path):
    from tiny import TinyLM, collate, make_dataset

    with pytest.raises(ValueError, match="cuda_graph=True cannot run: precision 'fp16' is not captured"):
        TrainConfig(cuda_graph=True, precision="fp16")
    with pytest.raises(ValueError, match=r"cuda_graph=True cannot run: gradient accumulation \(2 micro-batches of 2"):
        TrainConfig(cuda_graph=True, batch_size=4, micro_batch_size=2)
    with pytest.raises(ValueError, match="cuda_graph must be None \\(auto\\), True or False, got 'auto'"):
        TrainConfig(cuda_graph="auto")
    TrainConfig(precision="fp16", micro_batch_size=2)  # auto: eager, no error
    cfg = TrainConfig(cuda_graph=True, device="cpu", progress=False, save_steps=0)
    with pytest.raises(ValueError, match="cuda_graph=True cannot run: device 'cpu' is not CUDA"):
        fit(TinyLM(), make_dataset(8), collate, config=cfg, out_dir=tmp_path)


_GRAPHABLE = {"device_type": "cuda", "world_size": 1, "precision": "bf16", "accumulation_steps": 1, "packed": False,
              "methods": {"state_offset"}, "native_model": True, "lengths": [8] * 8, "batch_size": 4}  # fmt: skip


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({}, None),
        ({"precision": "fp32", "methods": set(GRAPH_METHODS)}, None),
        ({"device_type": "cpu"}, "device 'cpu' is not CUDA"),
        ({"world_size": 2}, r"2 processes \(DDP/FSDP\) are not captured"),
        ({"precision": "fp16"}, "precision 'fp16' is not captured"),
        ({"accumulation_steps": 2}, r"gradient accumulation \(2 micro-batches of 2 per step\)"),
        ({"packed": True}, r"packed batches \(cu_seqlens\) are not captured"),
        ({"native_model": False}, "capture is tested on ssmtune's Mamba / Mamba-2 models only"),
        ({"methods": {"lora", "mine"}}, r"method\(s\) \['mine'\] are not known to capture"),
        ({"lengths": [2] * 7 + [8]}, r"longest example \(8 tokens\) would cost 60% more tokens .*limit 25%"),
        ({"lengths": [4] * 7 + [5]}, None),  # 4 + 5 tokens per row padded: 5 + 5, 11% more
    ],
)
def test_graph_decision_branches(change, reason):
    """Each condition of the auto decision alone; the padding cost is the first epoch's (seed 0: [2, 2, 2, 2] and
    [2, 2, 2, 8] per row, 10 tokens against 16 padded to 8)."""
    got = graph_decision(**(_GRAPHABLE | change))
    assert got is None if reason is None else re.search(reason, got), got


def test_graph_decision_forced_asks_only_what_a_graph_cannot_do():
    """cuda_graph=True: untested models and methods and a long outlier do not stop it (the lengths are never read);
    what a graph cannot do still does."""
    untested = {"native_model": False, "methods": {"mine"}, "lengths": _no_lengths}
    assert graph_decision(**(_GRAPHABLE | untested), forced=True) is None
    for change in ({"device_type": "cpu"}, {"world_size": 2}, {"precision": "fp16"}, {"accumulation_steps": 4},
                   {"packed": True}):  # fmt: skip
        assert graph_decision(**(_GRAPHABLE | untested | change), forced=True) is not None, change


def _no_lengths():
    raise AssertionError("the lengths must not be read")


def test_graph_decision_reads_lengths_last():
    """Collating every example takes time: the lengths are read only when nothing else keeps the step eager."""
    for change in ({"device_type": "cpu"}, {"packed": True}, {"native_model": False}, {"methods": {"mine"}}):
        assert graph_decision(**(_GRAPHABLE | change | {"lengths": _no_lengths})) is not None
    assert graph_decision(**(_GRAPHABLE | {"lengths": lambda: [8] * 8})) is None


def test_padding_overhead():
    assert padding_overhead([8] * 8, 4) == 0.0
    assert padding_overhead([2] * 7 + [8], 4, seed=0) == pytest.approx(16 / 10 - 1)
    assert padding_overhead([2] * 7 + [8], 8) == 0.0  # one batch: its own longest is the longest
    assert padding_overhead([3, 9], 4) == 0.0  # no full batch


def _notes(caplog) -> list[str]:
    """What fit logged about its step."""
    return [r.getMessage() for r in caplog.records if r.name == "ssmtune.train.loop"]


def _peft_mamba():
    return _model("mamba", "state_offset_h", device="cpu")


def test_choose_step_on_cuda_settings(caplog):
    """fit's wiring of the decision (on the host; no GPU is touched): a Mamba PeftModel on CUDA pads to the longest
    example; packed batches and a model other than ssmtune's train eagerly with one logged line, or raise with
    cuda_graph=True; the CPU stays eager silently."""
    from tiny import TinyLM, collate, make_dataset

    from ssmtune.data import PackingCollator
    from ssmtune.train.distributed import DistContext
    from ssmtune.train.loop import _choose_step

    data, ctx, cuda = make_dataset(26), DistContext(), torch.device("cuda")
    packed = PackingCollator(0, 16)
    rows = [{**e, "labels": e["input_ids"], "prompt_length": 1, "example_index": i} for i, e in enumerate(data)]

    def choose(model, dataset, coll, graph=None, device=cuda):
        cfg = TrainConfig(batch_size=4, precision="bf16", cuda_graph=graph)
        return _choose_step(model, dataset, coll, config=cfg, ctx=ctx, device=device)

    with caplog.at_level("DEBUG", logger="ssmtune.train.loop"):
        assert choose(_peft_mamba(), data, collate) == max(len(e["input_ids"]) for e in data)
        assert choose(_peft_mamba(), data, collate, graph=False) is None
        assert choose(_peft_mamba(), rows, packed, device=torch.device("cpu")) is None
        assert _notes(caplog) == []
        assert choose(_peft_mamba(), rows, packed) is None
        assert choose(TinyLM(), data, collate) is None
    assert [m.split(":")[:2] for m in _notes(caplog)] == [
        ["training eagerly", " packed batches (cu_seqlens) are not captured"],
        ["training eagerly", " capture is tested on ssmtune's Mamba / Mamba-2 models only (cuda_graph=True forces it)"],
    ]
    with pytest.raises(ValueError, match=r"cuda_graph=True cannot run: packed batches \(cu_seqlens\)"):
        choose(_peft_mamba(), rows, packed, graph=True)
    assert choose(TinyLM(), data, collate, graph=True) == max(len(e["input_ids"]) for e in data)


def test_fit_by_default_on_the_cpu_trains_eagerly_as_before(tmp_path, caplog):
    """The default (auto) on the CPU is the eager loop: the losses of cuda_graph=False, bit for bit, and no note."""
    import json

    from tiny import TinyLM, collate, make_dataset

    losses = {}
    for graph in (None, False):
        torch.manual_seed(0)
        cfg = TrainConfig(epochs=2, batch_size=4, lr=3e-2, device="cpu", progress=False, save_steps=0, log_steps=1,
                          seed=3, cuda_graph=graph)  # fmt: skip
        with caplog.at_level("DEBUG", logger="ssmtune.train.loop"):
            fit(TinyLM(), make_dataset(26), collate, config=cfg, out_dir=tmp_path / str(graph), save_fn=None)
        recs = (tmp_path / str(graph) / "metrics.jsonl").read_text().splitlines()
        losses[graph] = [r["loss"] for r in map(json.loads, recs) if r["type"] == "train"]
    assert losses[None] == losses[False] and len(losses[None]) == 12
    assert _notes(caplog) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_fit_with_cuda_graph_matches_eager_fit(tmp_path, kind):
    """Same data, same settings: the graphed run (every batch padded to the longest example) logs the eager run's
    losses and ends with its adapter; the decaying learning rate reaches the graph (a device tensor)."""
    import json

    from tiny import collate, make_dataset

    data = make_dataset(26)  # 6 batches of 4 per epoch (the last 2 examples dropped), lengths 5-9
    runs = {}
    for graph in (False, True):
        model = _model(kind, "state_offset_h")
        cfg = TrainConfig(epochs=2, batch_size=4, lr=3e-2, precision="bf16", progress=False, save_steps=0,
                          log_steps=1, seed=3, cuda_graph=graph)  # fmt: skip
        fit(model, data, collate, config=cfg, out_dir=tmp_path / str(graph), save_fn=None)
        lines = (tmp_path / str(graph) / "metrics.jsonl").read_text().splitlines()
        recs = [r for r in map(json.loads, lines) if r["type"] == "train"]
        runs[graph] = ([r["loss"] for r in recs], [r["lr"] for r in recs],
                       [p.detach().float().clone() for p in model.parameters() if p.requires_grad])  # fmt: skip
    (le, lre, pe), (lg, lrg, pg) = runs[False], runs[True]
    assert lrg == pytest.approx(lre, rel=1e-6) and lrg[-1] < lrg[0]  # the graph's lr is an fp32 tensor
    torch.testing.assert_close(torch.tensor(lg), torch.tensor(le), rtol=2e-2, atol=2e-2)
    for a, b in zip(pg, pe, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def _fit_run(out, kind: str, graph: bool, device: str = "cuda") -> tuple[int | None, list[int], list[float], list]:
    """fit() State-offset (h) for 2 epochs of 6 steps, a checkpoint every 3 steps (all kept); returns the step it
    resumed from, the logged steps, their losses and the trained adapter."""
    import json

    from tiny import collate, make_dataset

    model = _model(kind, "state_offset_h", device)
    cfg = TrainConfig(epochs=2, batch_size=4, lr=3e-2, precision="bf16", progress=False, save_steps=3, keep_last=4,
                      log_steps=1, seed=3, cuda_graph=graph, device=device)  # fmt: skip
    res = fit(model, make_dataset(26), collate, config=cfg, out_dir=out, save_fn=None)
    recs = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == "train"]
    return (res.resumed_from, [r["step"] for r in recs], [r["loss"] for r in recs],
            [p.detach().float().cpu().clone() for p in model.parameters() if p.requires_grad])  # fmt: skip


def _drop_checkpoints_after(root, step: int) -> None:
    """Delete the checkpoints after ``step`` (and the final adapter): the next fit resumes from ``step``."""
    import shutil

    from ssmtune.train.checkpoint import list_checkpoints

    for c in list_checkpoints(root / "checkpoints"):
        if int(c.name.split("-")[1]) > step:
            shutil.rmtree(c)
    shutil.rmtree(root / "final", ignore_errors=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("first_graph", [True, False], ids=["graphed-then-eager", "eager-then-graphed"])
def test_resume_across_cuda_graph_modes(tmp_path, first_graph):
    """A run checkpointed in one mode and resumed in the other (set_capturable converts AdamW's state either way) logs
    each step once and ends with the adapter of an eager run that never stopped, within the graphed-vs-eager tolerance
    of test_fit_with_cuda_graph_matches_eager_fit."""
    _, ref_steps, ref_loss, ref_params = _fit_run(tmp_path / "ref", "mamba", graph=False)
    _fit_run(tmp_path / "run", "mamba", graph=first_graph)
    _drop_checkpoints_after(tmp_path / "run", 6)
    resumed_from, steps, loss, params = _fit_run(tmp_path / "run", "mamba", graph=not first_graph)
    assert resumed_from == 6 and steps == ref_steps == list(range(1, 13))
    torch.testing.assert_close(torch.tensor(loss), torch.tensor(ref_loss), rtol=2e-2, atol=2e-2)
    for a, b in zip(params, ref_params, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_resume_helpers_on_cpu(tmp_path):
    """The mechanics of test_resume_across_cuda_graph_modes without a GPU (eager both times): the run resumes from
    step 6 and ends bit-identical to one that never stopped."""
    _, ref_steps, ref_loss, ref_params = _fit_run(tmp_path / "ref", "mamba", graph=False, device="cpu")
    _fit_run(tmp_path / "run", "mamba", graph=False, device="cpu")
    _drop_checkpoints_after(tmp_path / "run", 6)
    resumed_from, steps, loss, params = _fit_run(tmp_path / "run", "mamba", graph=False, device="cpu")
    assert resumed_from == 6 and steps == ref_steps == list(range(1, 13)) and loss == ref_loss
    for a, b in zip(params, ref_params, strict=True):
        assert torch.equal(a, b)


def test_restore_puts_parameters_and_optimizer_state_back():
    """GraphedStep(restore=True)'s warm-up leaves no trace: after steps and a restore, a fresh optimizer steps as if it
    had never stepped, and a used one resumes from its saved moments."""
    from ssmtune.train.graphs import _restore, _snapshot

    def run(opt, p, n):
        for _ in range(n):
            p.grad = torch.full_like(p, 0.5)
            opt.step()

    p = torch.nn.Parameter(torch.arange(4.0))
    ref = torch.nn.Parameter(torch.arange(4.0))
    opt, opt_ref = torch.optim.AdamW([p], lr=0.1), torch.optim.AdamW([ref], lr=0.1)
    saved = _snapshot([opt])
    run(opt, p, 3)
    _restore([opt], saved)
    assert torch.equal(p.detach(), torch.arange(4.0)) and p.grad is None
    run(opt, p, 2)
    run(opt_ref, ref, 2)
    torch.testing.assert_close(p, ref, rtol=0, atol=0)
    saved = _snapshot([opt])  # a used optimizer: its moments and step count come back
    before = {k: v.clone() for k, v in opt.state[p].items()}
    run(opt, p, 2)
    _restore([opt], saved)
    assert all(torch.equal(opt.state[p][k], v) for k, v in before.items())


def test_graphed_train_step_body_matches_the_eager_step_on_cpu():
    """The captured function itself, run eagerly on the CPU: one padded batch gives the eager loop's loss and update;
    a non-finite loss zeroes the gradients so the parameters stay finite."""
    from tiny import TinyLM, collate, make_dataset

    from ssmtune.train.graphs import GraphedTrainStep
    from ssmtune.train.loop import IGNORE_INDEX, count_targets, token_loss_sum

    torch.manual_seed(0)
    eager, graphed = TinyLM(), TinyLM()
    graphed.load_state_dict(eager.state_dict())
    batch = collate(make_dataset(4))
    n = count_targets(batch["labels"])
    opt_e = torch.optim.AdamW([p for p in eager.parameters() if p.requires_grad], lr=0.1)
    loss_e = token_loss_sum(eager(batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                            batch["labels"]) / n  # fmt: skip
    loss_e.backward()
    norm_e = torch.nn.utils.clip_grad_norm_([p for p in eager.parameters() if p.requires_grad], 0.5)
    opt_e.step()
    trainable = [p for p in graphed.parameters() if p.requires_grad]
    opt_g = torch.optim.AdamW(trainable, lr=0.1)
    g = GraphedTrainStep(graphed, opt_g, trainable, rows=6, length=12, clip=0.5, autocast_dtype=torch.float32,
                         loss_fn=token_loss_sum, ignore_index=IGNORE_INDEX)  # fmt: skip
    b = pad_batch(batch, 6, 12, ignore_index=IGNORE_INDEX)
    b["n_targets"] = torch.tensor(float(n))
    loss_g, norm_g = g._step(b)
    torch.testing.assert_close(loss_g, loss_e.detach())
    torch.testing.assert_close(norm_g, norm_e)
    for pe, pg in zip(eager.parameters(), graphed.parameters(), strict=True):
        torch.testing.assert_close(pg, pe)
    b["n_targets"] = torch.tensor(0.0)  # loss = sum / 0: inf
    loss_bad, _ = g._step(b)
    assert not torch.isfinite(loss_bad)
    assert all(torch.isfinite(p).all() for p in trainable)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in trainable)


def _graphed_train_step(model: torch.nn.Module, length: int) -> GraphedTrainStep:
    from ssmtune.train.loop import IGNORE_INDEX, token_loss_sum

    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2, capturable=True)
    return GraphedTrainStep(model, opt, trainable, rows=4, length=length, clip=1.0, autocast_dtype=torch.bfloat16,
                            loss_fn=token_loss_sum, ignore_index=IGNORE_INDEX)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_train_steps_survive_repeated_capture_and_teardown():
    """30 cycles of capture, 3 replays and teardown (close, gc, synchronize, empty_cache: emptying the cache after a
    graph was freed is where a fault was once seen) on Mamba-1 and Mamba-2: every cycle logs the eager step body's
    losses, leaves no gradient behind, and CUDA stays healthy (an eager step after the last cycle)."""
    import gc

    from tiny import collate, make_dataset

    from ssmtune.train.loop import count_targets

    data = make_dataset(12)
    batches = [collate(data[i : i + 4]) for i in range(0, 12, 4)]
    targets = [count_targets(b["labels"]) for b in batches]
    length = max(len(e["input_ids"]) for e in data)
    bases = {kind: _model(kind, "state_offset_h") for kind in ("mamba", "mamba2")}
    eager = {}
    for kind, base in bases.items():
        ref = _graphed_train_step(copy.deepcopy(base), length)  # its step body, run eagerly: never captured
        eager[kind] = []
        for b, n in zip(batches, targets, strict=True):
            padded = {k: v.cuda() for k, v in pad_batch(b, 4, length, ignore_index=-100).items()}
            eager[kind].append(ref._step(padded | {"n_targets": torch.tensor(float(n), device="cuda")})[0].item())
    for cycle in range(30):
        kind = ("mamba", "mamba2")[cycle % 2]
        model = copy.deepcopy(bases[kind])
        step = _graphed_train_step(model, length)
        losses = [step(b, n)[0].item() for b, n in zip(batches, targets, strict=True)]
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager[kind]), rtol=1e-3, atol=1e-3,
                                   msg=lambda m, c=cycle: f"cycle {c}: {m}")  # fmt: skip
        step.close()
        assert all(p.grad is None for p in model.parameters()), cycle
        del step, model
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    model = copy.deepcopy(bases["mamba"])
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(batches[0]["input_ids"].cuda()).logits.float().sum()
    loss.backward()
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fit_captures_by_default_on_cuda(tmp_path, monkeypatch, caplog):
    """The default (auto) on CUDA captures the step of a Mamba PeftModel (lengths 5-9: little padding) without a
    note, leaves no gradient on the parameters, and stays eager with one note for packed batches."""
    from tiny import collate, make_dataset

    from ssmtune.data import PackingCollator
    from ssmtune.train import loop

    built = []
    monkeypatch.setattr(loop, "GraphedTrainStep", lambda *a, **k: built.append(1) or GraphedTrainStep(*a, **k))
    model = _model("mamba", "state_offset_h")
    cfg = TrainConfig(epochs=1, batch_size=4, lr=3e-2, precision="bf16", progress=False, save_steps=0, seed=3)
    with caplog.at_level("INFO", logger="ssmtune.train.loop"):
        fit(model, make_dataset(26), collate, config=cfg, out_dir=tmp_path / "auto", save_fn=None)
    assert built == [1] and _notes(caplog) == []
    assert all(p.grad is None for p in model.parameters())
    rows = [{**e, "labels": e["input_ids"], "prompt_length": 1, "example_index": i}
            for i, e in enumerate(make_dataset(26))]  # fmt: skip
    with caplog.at_level("INFO", logger="ssmtune.train.loop"):
        fit(_model("mamba", "state_offset_h"), rows, PackingCollator(0, 16), config=cfg, out_dir=tmp_path / "packed",
            save_fn=None)  # fmt: skip
    notes = _notes(caplog)
    assert built == [1] and len(notes) == 1 and "packed batches" in notes[0]


_METHOD_CONFIGS = {
    "additional_scan": {}, "bitfit": {}, "full": None, "initial_state": {}, "lora": {}, "partial": {},
    "prefix": {"num_virtual_tokens": 4}, "prompt": {"num_virtual_tokens": 4}, "sdlora": {"lora_dropout": 0.0},
    "state_offset": {},
}  # fmt: skip


def test_every_auto_graphed_method_has_a_gpu_check():
    from ssmtune.core.registry import known_methods

    assert set(_METHOD_CONFIGS) == GRAPH_METHODS <= {*known_methods(), "full"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", sorted(_METHOD_CONFIGS))
def test_every_auto_graphed_method_trains_as_eagerly(tmp_path, method):
    """Each method of GRAPH_METHODS (the ones auto captures): a graphed fit of 6 steps logs the eager fit's losses."""
    import json

    from tiny import collate, make_dataset

    from ssmtune.cli.commands import make_adapter_configs

    runs = {}
    for graph in (False, True):
        torch.manual_seed(0)
        base = MambaForCausalLM(MambaConfig(d_model=64, n_layer=2, vocab_size=97))
        base.backend = "triton"
        configs = make_adapter_configs(method, _METHOD_CONFIGS[method] or {})
        model = base.requires_grad_(True) if configs is None else get_peft_model(base, configs)
        cfg = TrainConfig(epochs=1, batch_size=4, lr=1e-3, precision="bf16", progress=False, save_steps=0,
                          log_steps=1, seed=3, cuda_graph=graph)  # fmt: skip
        fit(model, make_dataset(26), collate, config=cfg, out_dir=tmp_path / str(graph), save_fn=None)
        recs = (tmp_path / str(graph) / "metrics.jsonl").read_text().splitlines()
        runs[graph] = [r["loss"] for r in map(json.loads, recs) if r["type"] == "train"]
    assert len(runs[True]) == 6
    torch.testing.assert_close(torch.tensor(runs[True]), torch.tensor(runs[False]), rtol=2e-2, atol=2e-2)
