"""Training strategies on a hybrid model, on CPU with gloo: 2 ranks (DDP + State-offset h, FSDP per decoder layer +
full fine-tuning) give the weights of the 1-rank run."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
from tiny import collate, make_dataset

CASES = {"so_h": "ddp", "full": "fsdp"}


def _model(method: str) -> torch.nn.Module:
    sys.path.insert(0, str(Path(__file__).parent))
    from _hybrid import tiny_hybrid

    from ssmtune import StateOffsetConfig, get_peft_model
    from ssmtune.models.hybrid import set_backend

    model = tiny_hybrid("bamba")
    set_backend(model, "torch")
    if method == "full":
        return model.requires_grad_(True)
    return get_peft_model(model, StateOffsetConfig())


def _train(method: str, out: Path) -> str:
    from ssmtune.train import TrainConfig, fit
    from ssmtune.train.distributed import init_distributed, resolve_strategy

    cfg = TrainConfig(epochs=1, max_steps=3, batch_size=4, micro_batch_size=2, lr=1e-2, seed=5, save_steps=0,
                      eval_every_epoch=False, log_steps=1, progress=False, device="cpu")  # fmt: skip
    model = _model(method)
    strategy = resolve_strategy("auto", model, init_distributed("cpu"))
    fit(model, make_dataset(12), collate, config=cfg, out_dir=out)
    return strategy


def _worker(rank: int, world: int, port: int, root: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    from ssmtune.train.distributed import init_distributed, shutdown

    ctx = init_distributed("cpu")
    for method, strategy in CASES.items():
        assert _train(method, Path(root) / f"{method}-2") == strategy
    shutdown(ctx)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hybrid_dist")
    mp.spawn(_worker, args=(2, _free_port(), str(root)), nprocs=2, join=True)
    for method in CASES:
        _train(method, root / f"{method}-1")
    return root


@pytest.mark.parametrize("method", list(CASES))
def test_two_ranks_equal_one_rank(runs, method):
    name = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    one, two = (load_file(str(runs / f"{method}-{n}" / "final" / name)) for n in (1, 2))
    assert one.keys() == two.keys() and len(one) > 0
    init = _model(method).state_dict() if method == "full" else {k: torch.zeros_like(t) for k, t in one.items()}
    assert any(not torch.equal(one[k], init[k]) for k in one)  # training moved the weights / the zero offset
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-6, msg=k)
