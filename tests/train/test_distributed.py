"""Distributed training on CPU: gloo, 2 processes (torch.multiprocessing spawn), a tiny Mamba.

One spawn trains four runs per rank (DDP + State-offset h and FSDP + full FT, each uninterrupted and interrupted after
a checkpoint); the test process then trains the 1-rank references, resumes the interrupted 2-rank runs with 1 rank and
compares. Rank 1 records every file-system write through an audit hook: only rank 0 may write into the run folders.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from tiny import VOCAB, collate, make_dataset

from ssmtune.train import TrainConfig, fit
from ssmtune.train.checkpoint import list_checkpoints
from ssmtune.train.distributed import (
    DistContext,
    ShardedSampler,
    env_ranks,
    init_distributed,
    resolve_strategy,
    shard_batch,
    shutdown,
)
from ssmtune.train.loop import EpochSampler

STOP_AT = 3  # interrupted runs stop after step 3; their last checkpoint is step 2
CASES = {"so_h": "ddp", "full": "fsdp"}  # method -> the strategy `auto` must pick
WRITE_EVENTS = ("open", "os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate")


class _Stop(Exception):
    pass


def _model(method: str) -> torch.nn.Module:
    from ssmtune.core.peft_model import get_peft_model
    from ssmtune.methods.state_offset import StateOffsetConfig
    from ssmtune.models import MambaConfig, causal_lm_for

    torch.manual_seed(0)
    model = causal_lm_for(MambaConfig(d_model=16, n_layer=2, d_state=4, vocab_size=VOCAB))
    model.backend = "ref"
    if method == "full":
        return model.requires_grad_(True)
    return get_peft_model(model, StateOffsetConfig(variant="h"))


def _train(method: str, out: Path, *, stop: bool = False) -> None:
    cfg = TrainConfig(epochs=1, max_steps=5, batch_size=4, micro_batch_size=1, lr=1e-2, seed=5, save_steps=2,
                      eval_every_epoch=False, eval_steps=2, log_steps=1, progress=False, device="cpu")  # fmt: skip
    probe = collate(make_dataset(4, seed=9))

    def eval_fn(m: torch.nn.Module) -> dict[str, float]:
        from ssmtune.train.loop import token_loss

        s, n = token_loss(m(probe["input_ids"], attention_mask=probe["attention_mask"]).logits, probe["labels"])
        return {"loss": float(s) / n}

    def on_step(step: int) -> None:
        if stop and step == STOP_AT:
            raise _Stop

    try:
        fit(_model(method), make_dataset(24), collate, config=cfg, out_dir=out, eval_fn=eval_fn, on_step=on_step)
    except _Stop:
        pass


def _worker(rank: int, world: int, port: int, root: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    runs = os.path.realpath(os.path.join(root, "runs"))
    writes: list[str] = []

    def audit(event: str, args: tuple) -> None:
        if event not in WRITE_EVENTS or not args:
            return
        if event == "open" and (len(args) < 2 or not isinstance(args[1], str) or not set(args[1]) & set("wax+")):
            return
        path = args[0]
        if isinstance(path, (str, bytes, os.PathLike)) and os.path.realpath(os.fsdecode(path)).startswith(runs):
            writes.append(f"{event} {os.fsdecode(path)}")

    if rank != 0:
        sys.addaudithook(audit)
    ctx = init_distributed("cpu")  # from the environment, as under torchrun; fit finds the group
    assert ctx.world_size == world and ctx.backend == "gloo"
    strategies = {m: resolve_strategy("auto", _model(m), ctx) for m in CASES}
    for method in CASES:
        _train(method, Path(runs) / f"{method}-2")
        _train(method, Path(runs) / f"{method}-resume", stop=True)
    shutdown(ctx)
    report = {"writes": writes, "strategies": strategies}
    Path(root, f"rank{rank}.json").write_text(json.dumps(report))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _final(run: Path, method: str) -> dict[str, torch.Tensor]:
    name = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    return load_file(str(run / "final" / name))


def _train_losses(run: Path, key: str = "loss") -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["type"] == "train"]
    assert steps == sorted(set(steps)), steps  # no duplicate step from an interrupted attempt
    return {r["step"]: r[key] for r in records if r["type"] == "train"}


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(2, _free_port(), str(root)), nprocs=2, join=True)
    for method in CASES:
        _train(method, root / "runs" / f"{method}-1")
        _train(method, root / "runs" / f"{method}-resume")  # 1 rank resumes the 2-rank checkpoint of step 2
    return root


@pytest.mark.parametrize("method", list(CASES))
def test_two_ranks_equal_one_rank(two_rank_runs, method):
    """Same global batch → same adapter (DDP, State-offset h) / same weights (FSDP, full FT) after 5 steps."""
    runs = two_rank_runs / "runs"
    one, two = _final(runs / f"{method}-1", method), _final(runs / f"{method}-2", method)
    assert one.keys() == two.keys() and len(one) > 0
    if method == "full":
        init = _model(method).state_dict()
        assert all(k in init for k in one) and any(not torch.equal(one[k], init[k]) for k in one)
    else:
        assert any(float(t.abs().max()) > 0 for t in one.values())  # the zero-initialised offset moved
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-6, msg=k)
    # The logged loss is the global batch's token mean on every step (count all-reduced, not per rank).
    l1, l2 = _train_losses(runs / f"{method}-1"), _train_losses(runs / f"{method}-2")
    assert list(l1) == list(l2) == [1, 2, 3, 4, 5]
    assert l2 == pytest.approx(l1, rel=1e-4)
    # The gradient (before clipping) is the 1-rank one, not 1/world of it: DDP/FSDP's averaging is undone.
    g1, g2 = _train_losses(runs / f"{method}-1", "grad_norm"), _train_losses(runs / f"{method}-2", "grad_norm")
    assert g2 == pytest.approx(g1, rel=1e-4)
    strategies = json.loads((two_rank_runs / "rank0.json").read_text())["strategies"]
    assert strategies[method] == CASES[method]


@pytest.mark.parametrize("method", list(CASES))
def test_resume_across_world_size(two_rank_runs, method):
    """Checkpointed with 2 ranks at step 2, resumed with 1 rank: the final weights equal the uninterrupted 1-rank run."""
    runs = two_rank_runs / "runs"
    ckpts = list_checkpoints(runs / f"{method}-resume" / "checkpoints")
    assert [p.name for p in ckpts] == ["step-00000002", "step-00000004"]  # 2 from the 2-rank run, 4 from the resume
    state = torch.load(ckpts[0] / "state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["optimizer"]["state"]) > 0
    one, resumed = _final(runs / f"{method}-1", method), _final(runs / f"{method}-resume", method)
    for k in one:
        torch.testing.assert_close(resumed[k], one[k], rtol=1e-4, atol=1e-6, msg=k)
    assert list(_train_losses(runs / f"{method}-resume")) == [1, 2, 3, 4, 5]


def test_only_rank0_writes(two_rank_runs):
    report = json.loads((two_rank_runs / "rank1.json").read_text())
    assert report["writes"] == []
    # The audit hook does see writes: rank 0 wrote the same kind of files (self-check of the recorder's filter).
    run = two_rank_runs / "runs" / "so_h-2"
    assert (run / "metrics.jsonl").is_file() and (run / "best" / "adapter_model.safetensors").is_file()
    assert not list(run.rglob(".tmp-*")) and not list(run.rglob(".old-*"))


def test_sharded_sampler_covers_global_batch():
    base = EpochSampler(30, 6, seed=1)
    for epoch, index in [(0, 0), (0, 4), (3, 2)]:
        parts = [ShardedSampler(base, r, 3).batch(epoch, index) for r in range(3)]
        assert [i for part in parts for i in part] == base.batch(
            epoch, index
        )  # disjoint, in order, union = the 1-rank batch
    assert len(ShardedSampler(base, 1, 3)) == len(base) == 5
    with pytest.raises(ValueError, match="multiple of the world size 4, got 6"):
        ShardedSampler(base, 0, 4)
    with pytest.raises(ValueError, match="does not split over world_size=2"):
        shard_batch([1, 2, 3], 0, 2)


def test_env_and_strategy(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert env_ranks() == (2, 4, 0)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match=r"RANK must be in \[0, WORLD_SIZE=4\), got 4"):
        env_ranks()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE must be an integer, got 'two'"):
        env_ranks()
    two = DistContext(rank=0, world_size=2)
    peft, full = _model("so_h"), _model("full")
    assert resolve_strategy("auto", peft, DistContext()) == "none"
    assert resolve_strategy("auto", peft, two) == "ddp" and resolve_strategy("auto", full, two) == "fsdp"
    assert resolve_strategy("ddp", full, two) == "ddp"
    with pytest.raises(ValueError, match="strategy must be one of .* got 'zero3'"):
        resolve_strategy("zero3", full, two)
    with pytest.raises(ValueError, match="got 'zero3'"):
        TrainConfig(strategy="zero3")
