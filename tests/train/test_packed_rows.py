"""Packed rows (``resets``): the collator's layout and batch plan, the training loop's batches and graph decision."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "methods"))
from _peft_cases import perturb, tiny_model
from test_packing import items

from ssmtune import InitialStateConfig, StateOffsetConfig, get_peft_model
from ssmtune.data import Collator, PackedRowsCollator
from ssmtune.models.lm import IGNORE_INDEX, token_loss
from ssmtune.train import TrainConfig, fit
from ssmtune.train.loop import RowsSampler, StepPlan, graph_decision
from ssmtune.train.optim import build_optimizer, linear_schedule


def _items(lengths: list[int]) -> list[dict]:
    return [{"input_ids": [10 + i] * n, "labels": [IGNORE_INDEX] + [20 + i] * (n - 1), "prompt_length": 1,
             "example_index": i} for i, n in enumerate(lengths)]  # fmt: skip


def test_collator_layout():
    col = PackedRowsCollator(0, 100, rows=2, lead=3)
    assert col.width == 128 and col.slot(61) == 64 and col.slot(62) == 128
    out = col(_items([61, 10, 100]))
    # first fit: row 0 = [61 in 0..63, 10 in 64..127], row 1 = [100 in 0..127]
    assert out["input_ids"].shape == (2, 128) and out["resets"].shape == (2, 2)
    assert out["resets"].tolist() == [[True, True], [True, False]]
    assert out["input_ids"].shape == out["labels"].shape == out["attention_mask"].shape
    mask = out["attention_mask"]
    assert mask[0, :3].sum() == 0 and mask[0, 3:64].all() and mask[0, 64:67].sum() == 0 and mask[0, 67:77].all()
    assert mask[0, 77:].sum() == 0 and mask[1, 3:103].all() and int(mask.sum()) == 171
    assert (out["input_ids"][0, 67:77] == 11).all() and (out["input_ids"][mask == 0] == 0).all()
    labels = out["labels"]
    assert (labels[mask == 0] == IGNORE_INDEX).all()
    # no position predicts an item's first token (the previous item's pad, or its last token, must not)
    assert labels[0, 3] == labels[0, 67] == labels[1, 3] == IGNORE_INDEX
    assert (labels[0, 68:77] == 21).all() and (labels[1, 4:103] == 22).all()
    assert out["example_index"].tolist() == [0, 1, 2] and out["prompt_lengths"].tolist() == [1, 1, 1]


def test_collator_refusals():
    col = PackedRowsCollator(0, 100, rows=2)
    with pytest.raises(ValueError, match="example of 101 tokens does not fit a row of max_length=100"):
        col(_items([101]))
    with pytest.raises(ValueError, match="do not fit 2 rows of 128"):
        col(_items([100, 100, 100]))
    with pytest.raises(ValueError, match="example of 101 tokens"):
        col.plan([3, 101])
    for kw in ({"rows": 0}, {"rows": 1, "lead": 0}):
        with pytest.raises(ValueError, match="must be >= 1"):
            PackedRowsCollator(0, 100, **kw)


def test_plan_covers_the_stream_in_order():
    col = PackedRowsCollator(0, 100, rows=2)
    lengths = [61, 10, 100, 5, 100, 100, 3, 40]
    plan = col.plan(lengths)
    assert plan == [[0, 1, 2], [3, 4], [5, 6, 7]]
    assert [i for b in plan for i in b] == list(range(len(lengths)))
    for batch in plan:  # every planned batch collates
        col(_items([lengths[i] for i in batch]))


# --- the training loop ----------------------------------------------------------------------------------------------


def _data(n: int = 14, seed: int = 0, max_len: int = 100) -> list[dict]:
    """Examples of 2..max_len tokens (TokenizedDataset items) whose last 1-3 tokens are targets."""
    return items(n, seed, max_len)


def test_rows_sampler_and_step_plan():
    lengths = [len(d["input_ids"]) for d in _data(30)]
    sampler = RowsSampler(lengths, PackedRowsCollator(0, 100, rows=2), seed=5)
    counts = [sampler.count(e) for e in range(3)]
    for e in range(3):  # every example once per epoch, in the epoch's shuffled order
        flat = [i for b in sampler.batches(e) for i in b]
        assert sorted(flat) == list(range(30)) and flat == sampler.order._order(e)
    assert len(set(counts)) > 1, counts  # the number of batches follows the epoch's order
    plan = StepPlan(sampler.count)
    assert plan.start(3) == sum(counts) and plan.position(counts[0]) == (1, 0)
    assert plan.position(counts[0] + counts[1] - 1) == (1, counts[1] - 1)
    assert plan.epochs(counts[0] + 1) == pytest.approx(1 + 1 / counts[1])
    uniform = StepPlan(4)
    assert uniform.position(9) == (2, 1) and uniform.start(3) == 12 and uniform.epochs(6) == 1.5


_GRAPHABLE = {"device_type": "cuda", "world_size": 1, "precision": "bf16", "accumulation_steps": 1, "packed": False,
              "methods": {"state_offset"}, "native_model": True, "batch_size": 4}  # fmt: skip


def _no_lengths():
    raise AssertionError("packed rows have one shape: the lengths must not be read")


def test_graph_decision_captures_packed_rows():
    """Packed rows are static: auto captures them without the padding rule; the other conditions still hold."""
    assert graph_decision(**_GRAPHABLE, lengths=_no_lengths, rows=True) is None
    assert graph_decision(**_GRAPHABLE, lengths=[2] * 7 + [100], rows=True) is None
    assert "more tokens" in graph_decision(**_GRAPHABLE, lengths=[2] * 7 + [100])
    for change, reason in (({"device_type": "cpu"}, "not CUDA"), ({"accumulation_steps": 2}, "accumulation"),
                           ({"world_size": 2}, "processes"),
                           ({"methods": {"mine"}}, "not known to capture")):  # fmt: skip
        assert reason in graph_decision(**(_GRAPHABLE | change), lengths=_no_lengths, rows=True)


def test_choose_step_takes_the_rows_width(caplog):
    from ssmtune.train.distributed import DistContext
    from ssmtune.train.loop import _choose_step

    model = get_peft_model(tiny_model("m1"), StateOffsetConfig())
    cfg = TrainConfig(batch_size=2, precision="bf16")
    collate = PackedRowsCollator(0, 100, rows=2)
    with caplog.at_level("DEBUG", logger="ssmtune.train.loop"):
        got = _choose_step(model, _data(6), collate, config=cfg, ctx=DistContext(), device=torch.device("cuda"))
    assert got == collate.width == 128 and not [r for r in caplog.records if r.name == "ssmtune.train.loop"]


def _fit(model, data, collate, out, **kw) -> tuple[list[float], list[torch.Tensor], list[dict]]:
    cfg = TrainConfig(**{"epochs": 2, "batch_size": 2, "lr": 3e-2, "save_steps": 0, "progress": False,
                         "log_steps": 1, "seed": 3, "device": "cpu", **kw})  # fmt: skip
    fit(model, data, collate, config=cfg, out_dir=out, save_fn=None)
    recs = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == "train"]
    return [r["loss"] for r in recs], [p.detach().clone() for p in model.parameters() if p.requires_grad], recs


@pytest.mark.parametrize("arch", ["m1", "m2"])
def test_fit_on_packed_rows_takes_the_padded_steps_of_the_same_batches(tmp_path, arch):
    """fit over packed rows against a hand-written padded loop over the batches RowsSampler formed (same AdamW,
    schedule and clipping): the same losses and adapter."""
    data, collate = _data(14), PackedRowsCollator(0, 100, rows=2)
    model = get_peft_model(tiny_model(arch), InitialStateConfig(conv_state=True))
    perturb(model, 0.3)
    ref = copy.deepcopy(model)
    losses, weights, recs = _fit(model, data, collate, tmp_path / "rows")

    sampler = RowsSampler([len(d["input_ids"]) for d in data], collate, seed=3)
    plan = StepPlan(sampler.count)
    total = plan.start(2)
    assert len(losses) == total and recs[-1]["epoch"] == pytest.approx(2.0)
    opt = build_optimizer(ref, lr=3e-2, weight_decay=0.0)
    sched = linear_schedule(opt, total_steps=total, warmup_steps=0)
    trainable = [p for p in ref.parameters() if p.requires_grad]
    want = []
    for step in range(total):
        b = Collator(0)([data[i] for i in sampler.batch(*plan.position(step))])
        s, n = token_loss(ref(b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
        (s / n).backward()
        want.append((s / n).item())
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    assert losses == pytest.approx(want, rel=1e-4)
    for a, b in zip(weights, trainable, strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-4, atol=1e-6)


def test_fit_on_packed_rows_accumulates_and_resumes(tmp_path):
    """Micro-batches of rows add up to the whole batch's step; a run resumed from a checkpoint mid-epoch logs each
    step once and ends as the run that never stopped."""
    import shutil

    from ssmtune.train.checkpoint import list_checkpoints

    data, collate = _data(14), PackedRowsCollator(0, 100, rows=2)

    def model():
        m = get_peft_model(tiny_model("m2"), StateOffsetConfig())
        perturb(m, 0.3)
        return m

    loss_a, w_a, recs = _fit(model(), data, collate, tmp_path / "a", save_steps=2, keep_last=20)
    loss_b, w_b, _ = _fit(model(), data, collate, tmp_path / "b", micro_batch_size=1)
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    for a, b in zip(w_a, w_b, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    for c in list_checkpoints(tmp_path / "a" / "checkpoints"):
        if int(c.name.split("-")[1]) > 4:
            shutil.rmtree(c)
    loss_c, w_c, recs_c = _fit(model(), data, collate, tmp_path / "a", save_steps=2, keep_last=20)
    assert [r["step"] for r in recs_c] == [r["step"] for r in recs] and loss_c == loss_a
    for a, c in zip(w_a, w_c, strict=True):
        assert torch.equal(a, c)


def test_fit_plans_each_epoch_once_and_only_when_it_runs(tmp_path, monkeypatch):
    """fit counts the steps it needs from the epochs' plans and trains from those same plans: each epoch that runs
    is planned once, and none past max_steps (a run ending at an epoch's end does not plan the next)."""
    data = _data(14)
    per_epoch = [RowsSampler([len(d["input_ids"]) for d in data], PackedRowsCollator(0, 100, rows=2),
                             seed=3).count(e) for e in range(3)]  # fmt: skip
    assert per_epoch[0] > 1, per_epoch
    plans: list[int] = []
    original = PackedRowsCollator.plan

    def counted(self, lengths):
        plans.append(len(lengths))
        return original(self, lengths)

    monkeypatch.setattr(PackedRowsCollator, "plan", counted)
    for max_steps, want_steps, want_plans in ((1, 1, 1), (per_epoch[0], per_epoch[0], 1), (0, sum(per_epoch), 3)):
        plans.clear()
        model = get_peft_model(tiny_model("m1"), StateOffsetConfig())
        losses, _, _ = _fit(model, data, PackedRowsCollator(0, 100, rows=2), tmp_path / str(max_steps), epochs=3,
                            max_steps=max_steps)  # fmt: skip
        assert len(losses) == want_steps and plans == [len(data)] * want_plans, (max_steps, plans)


def test_fit_refuses_rows_other_than_the_batch_size(tmp_path):
    model = get_peft_model(tiny_model("m1"), StateOffsetConfig())
    with pytest.raises(ValueError, match="collator lays 3 rows per batch but batch_size is 2"):
        _fit(model, _data(6), PackedRowsCollator(0, 100, rows=3), tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", ["m1", "m2"])
def test_graphed_packed_rows_fit_matches_eager(tmp_path, arch):
    """auto captures packed rows on CUDA (GraphedStep copies resets in with the batch): the graphed run logs the
    eager run's losses and ends with its adapter."""
    data, collate = _data(14), PackedRowsCollator(0, 100, rows=2)
    runs = {}
    for graph in (False, None):
        model = get_peft_model(tiny_model(arch, d_model=64, headdim=32, chunk_size=16) if arch == "m2"
                               else tiny_model(arch, d_model=64), InitialStateConfig(conv_state=True))  # fmt: skip
        perturb(model, 0.3)
        model.base_model.backend = "auto"
        runs[graph] = _fit(model.cuda(), data, collate, tmp_path / str(graph), device="cuda", cuda_graph=graph)
    (le, we, _), (lg, wg, _) = runs[False], runs[None]
    torch.testing.assert_close(torch.tensor(lg), torch.tensor(le), rtol=2e-3, atol=2e-3)
    for a, b in zip(wg, we, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-4)


def _rows_worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    from ssmtune.train.distributed import init_distributed, shutdown

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    ctx = init_distributed("cpu")
    model = get_peft_model(tiny_model("m2"), StateOffsetConfig())
    perturb(model, 0.3)
    _, weights, _ = _fit(model, _data(14), PackedRowsCollator(0, 100, rows=4), Path(out), batch_size=4,
                         micro_batch_size=1)  # fmt: skip
    if rank == 0:
        torch.save(weights, Path(out) / "adapter.pt")
    shutdown(ctx)


def test_two_ranks_train_the_rows_of_one(tmp_path):
    """DDP over 2 CPU processes: each rank trains half of every step's rows (one row per micro-batch); the run logs
    the losses of one process training all rows and ends with its adapter."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rows_worker, args=(2, port, str(tmp_path / "two")), nprocs=2, join=True)
    model = get_peft_model(tiny_model("m2"), StateOffsetConfig())
    perturb(model, 0.3)
    loss_1, w_1, _ = _fit(model, _data(14), PackedRowsCollator(0, 100, rows=4), tmp_path / "one", batch_size=4)
    recs = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in recs if r["type"] == "train"] == pytest.approx(loss_1, rel=1e-5)
    for a, b in zip(torch.load(tmp_path / "two" / "adapter.pt"), w_1, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_resume_refuses_another_batch_plan(tmp_path):
    """A checkpoint's position is a step of its run's batches: resumed over other batches (packed rows of another
    width or lead, or unpacked batches, and the other way round) it would go on at other examples with another
    schedule length, so fit refuses."""
    data = _data(14)

    def model():
        return get_peft_model(tiny_model("m2"), StateOffsetConfig())

    rows = PackedRowsCollator(0, 100, rows=2)
    _fit(model(), data, rows, tmp_path / "rows", save_steps=2)
    for other in (PackedRowsCollator(0, 200, rows=2), PackedRowsCollator(0, 100, rows=2, lead=5), Collator(0)):
        with pytest.raises(ValueError, match=r"cannot resume .*\(batches: 'packed rows of 128 tokens, lead 3' -> "):
            _fit(model(), data, other, tmp_path / "rows", save_steps=2)
    _fit(model(), data, Collator(0), tmp_path / "padded", save_steps=2)
    with pytest.raises(ValueError, match="batches: 'batch_size examples' -> 'packed rows of 128 tokens, lead 3'"):
        _fit(model(), data, rows, tmp_path / "padded", save_steps=2)
    _fit(model(), data, rows, tmp_path / "rows", save_steps=2)  # the same plan resumes


def test_fit_refuses_a_lead_shorter_than_the_conv(tmp_path):
    """Fewer than d_conv - 1 pads before an example let its first conv windows read the previous example's tokens."""
    model = get_peft_model(tiny_model("m1"), StateOffsetConfig())
    with pytest.raises(ValueError, match=r"lead 2 is shorter than the model's d_conv - 1 = 3 .*lead=3"):
        _fit(model, _data(6), PackedRowsCollator(0, 100, rows=2, lead=2), tmp_path)
