"""CUDA-graph training steps (ssmtune.train.graphs): argument checks on the CPU, graphed = eager on the GPU."""

from __future__ import annotations

import copy

import pytest
import torch

from ssmtune import LoraConfig, StateOffsetConfig, get_peft_model
from ssmtune.models import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM
from ssmtune.train import TrainConfig, fit
from ssmtune.train.graphs import GraphedStep, pad_batch
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

    with pytest.raises(ValueError, match="cuda_graph does not support precision 'fp16'"):
        TrainConfig(cuda_graph=True, precision="fp16")
    with pytest.raises(ValueError, match="cuda_graph needs one micro-batch per step.*micro_batch_size=2"):
        TrainConfig(cuda_graph=True, batch_size=4, micro_batch_size=2)
    if not torch.cuda.is_available():
        cfg = TrainConfig(cuda_graph=True, device="cpu", progress=False, save_steps=0)
        with pytest.raises(ValueError, match="cuda_graph needs a single CUDA process, got device cpu"):
            fit(TinyLM(), make_dataset(8), collate, config=cfg, out_dir=tmp_path)


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
