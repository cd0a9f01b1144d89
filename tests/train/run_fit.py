"""Subprocess entry of the kill -9 resume test: ``python run_fit.py OUT_DIR [KILL_AT_STEP]``."""

import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny import TinyLM, collate, make_dataset

from ssmtune.train import TrainConfig, fit

torch.set_num_threads(1)
out, kill_at = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0


def on_step(step: int) -> None:
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)


torch.manual_seed(0)
model = TinyLM()
cfg = TrainConfig(epochs=3, batch_size=4, lr=3e-2, save_steps=4, keep_last=2, progress=False, log_steps=1, seed=7)
fit(
    model,
    make_dataset(24),
    collate,
    config=cfg,
    out_dir=out,
    on_step=on_step,
    eval_fn=lambda m: {"loss": float(m.adapter.abs().sum())},
)
