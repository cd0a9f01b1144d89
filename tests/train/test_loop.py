import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import TinyLM, collate, make_dataset

from ssmtune.train import NonFiniteLossError, TrainConfig, fit, linear_schedule, load_checkpoint
from ssmtune.train.checkpoint import list_checkpoints

HERE = Path(__file__).parent


def records(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def cfg(**kw) -> TrainConfig:
    base = {"epochs": 1, "batch_size": 4, "lr": 3e-2, "save_steps": 0, "progress": False, "log_steps": 1, "seed": 3}
    return TrainConfig(**{**base, **kw})


def test_loss_decreases_and_outputs(tmp_path):
    torch.manual_seed(0)
    model = TinyLM(full=True)
    evals = []

    def eval_fn(m):
        evals.append(1)
        return {"loss": 1.0 / len(evals), "accuracy": 0.5}

    res = fit(model, make_dataset(32), collate, config=cfg(epochs=8, lr=5e-2), out_dir=tmp_path, eval_fn=eval_fn)
    losses = [r["loss"] for r in records(tmp_path, "train")]
    assert len(losses) == 8 * 8 and res.step == 64
    assert sum(losses[-8:]) < 0.7 * sum(losses[:8])
    assert len(records(tmp_path, "eval")) == 8  # once per epoch
    assert res.best_step == 64 and res.best_value == pytest.approx(1 / 8)
    assert (tmp_path / "best" / "adapter_model.safetensors").exists()
    assert (tmp_path / "final" / "adapter_model.safetensors").exists()
    assert all(r["tokens_per_s"] > 0 for r in records(tmp_path, "train"))


def test_schedule_is_linear_decay_to_zero_with_warmup():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = linear_schedule(opt, total_steps=10, warmup_steps=2)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.0, 0.5, 1.0, 7 / 8])
    assert sched.get_last_lr()[0] == 0.0


@pytest.mark.parametrize("steps", [1, 3])
def test_accumulation_equals_large_batch(tmp_path, steps):
    """Two micro-batches of 2 == one batch of 4: the loss is normalised by the whole batch's target tokens."""
    data = make_dataset(12)  # examples have 1-3 target tokens, so a per-micro-batch mean would differ
    finals = []
    for micro in (None, 2):
        torch.manual_seed(0)
        model = TinyLM()
        fit(model, data, collate, config=cfg(max_steps=steps, micro_batch_size=micro), out_dir=tmp_path / str(micro))
        finals.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    assert finals[0]["adapter"].abs().sum() > 0
    for name in finals[0]:
        torch.testing.assert_close(finals[1][name], finals[0][name], rtol=1e-5, atol=1e-6)


def test_gradients_are_clipped(tmp_path):
    torch.manual_seed(0)
    model = TinyLM()
    clip = 1e-3
    fit(model, make_dataset(12), collate, config=cfg(max_steps=2, save_steps=1, max_grad_norm=clip), out_dir=tmp_path)
    raw = records(tmp_path, "train")[0]["grad_norm"]
    assert raw > 10 * clip  # the logged norm is the one before clipping
    state = load_checkpoint(list_checkpoints(tmp_path / "checkpoints")[0], TinyLM())
    # After one AdamW step exp_avg = (1 - beta1) * g_clipped.
    m = torch.cat([s["exp_avg"].flatten() for s in state["optimizer"]["state"].values()])
    assert float(m.norm()) == pytest.approx(0.1 * clip, rel=1e-4)


def test_nan_loss_stops_with_clear_message(tmp_path):
    model = TinyLM()
    with torch.no_grad():
        model.mix.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss \(nan\) at step 1"):
        fit(model, make_dataset(8), collate, config=cfg(), out_dir=tmp_path)
    assert "non-finite" in records(tmp_path, "error")[0]["message"]
    assert not (tmp_path / "final").exists()


def test_bf16_casts_frozen_base_only(tmp_path):
    model = TinyLM()
    fit(model, make_dataset(8), collate, config=cfg(precision="bf16", max_steps=1), out_dir=tmp_path)
    assert model.mix.weight.dtype == torch.bfloat16 and model.embed.weight.dtype == torch.bfloat16
    assert model.adapter.dtype == torch.float32 and model.adapter.abs().sum() > 0


def test_errors_on_bad_config():
    with pytest.raises(ValueError, match="micro_batch_size must divide batch_size=4, got 3"):
        TrainConfig(batch_size=4, micro_batch_size=3)
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(precision="fp8")


def _run(out: Path, kill_at: int = 0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HERE / "run_fit.py"), str(out), str(kill_at)], check=False,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_kill9_resume_is_exact(tmp_path):
    """A run killed by SIGKILL mid-run and restarted with the same command ends bit-identical to an uninterrupted one."""
    ref = _run(tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    killed = _run(tmp_path / "run", kill_at=11)  # checkpoints at steps 4 and 8; dies at step 11
    assert killed.returncode == -9
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-00000004", "step-00000008"]
    assert not (tmp_path / "run" / "final").exists()
    resumed = _run(tmp_path / "run")
    assert resumed.returncode == 0, resumed.stderr
    for sub in ("final", "best"):
        a = load_file(str(tmp_path / "ref" / sub / "adapter_model.safetensors"))
        b = load_file(str(tmp_path / "run" / sub / "adapter_model.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    # The log has no duplicate steps from the killed attempt.
    assert (tmp_path / "ref" / "metrics.jsonl").read_text().count('"train"') == 18
    steps = [r["step"] for r in records(tmp_path / "run", "train")]
    assert steps == list(range(1, 19))


def test_fresh_run_removes_an_earlier_runs_checkpoints(tmp_path):
    """`resume=False` (or no checkpoint) starts over: the earlier run's checkpoints and best adapter must go, or a
    later rerun would resume from them."""
    torch.manual_seed(0)
    fit(TinyLM(), make_dataset(32), collate, config=cfg(epochs=2, save_steps=4), out_dir=tmp_path,
        eval_fn=lambda m: {"loss": 1.0})  # fmt: skip
    assert [c.name for c in list_checkpoints(tmp_path / "checkpoints")] and (tmp_path / "best").exists()
    fit(TinyLM(), make_dataset(32), collate, config=cfg(epochs=1, save_steps=0, resume=False), out_dir=tmp_path)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "best").exists()


def test_resume_refuses_other_settings(tmp_path):
    """A checkpoint written with another learning rate, seed or training set is not silently continued."""
    torch.manual_seed(0)
    fit(TinyLM(), make_dataset(32), collate, config=cfg(epochs=1, save_steps=4), out_dir=tmp_path)
    assert list_checkpoints(tmp_path / "checkpoints")
    with pytest.raises(ValueError, match=r"lr: 0\.\d+ -> 0\.5"):
        fit(TinyLM(), make_dataset(32), collate, config=cfg(epochs=1, save_steps=4, lr=0.5), out_dir=tmp_path)
    with pytest.raises(ValueError, match="training examples: 32 -> 40"):
        fit(TinyLM(), make_dataset(40), collate, config=cfg(epochs=1, save_steps=4), out_dir=tmp_path)
    # settings that do not change the trajectory may differ
    fit(TinyLM(), make_dataset(32), collate, config=cfg(epochs=1, save_steps=2, log_steps=3), out_dir=tmp_path)


def test_refused_resume_leaves_the_model_untouched(tmp_path):
    """The settings are checked before the checkpoint's weights are loaded: a caller that catches the error and
    starts afresh (resume=False) must not train from the refused checkpoint's weights."""
    torch.manual_seed(0)
    fit(TinyLM(), make_dataset(32), collate, config=cfg(epochs=1, save_steps=4), out_dir=tmp_path)
    model = TinyLM()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="cannot resume"):
        fit(model, make_dataset(32), collate, config=cfg(epochs=1, save_steps=4, lr=0.5), out_dir=tmp_path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_resume_from_a_checkpoint_without_the_training_set_size(tmp_path):
    """Checkpoints written before the size was recorded (no `_n_train`) still resume; their settings still count."""
    torch.manual_seed(0)
    fit(TinyLM(), make_dataset(32), collate, config=cfg(epochs=1, save_steps=4), out_dir=tmp_path)
    path = list_checkpoints(tmp_path / "checkpoints")[-1] / "state.pt"
    assert path.parent.name == "step-00000004"
    state = torch.load(path, weights_only=True)
    del state["config"]["_n_train"]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"lr: 0\.\d+ -> 0\.5"):
        fit(TinyLM(), make_dataset(32), collate, config=cfg(epochs=1, save_steps=4, lr=0.5), out_dir=tmp_path)
    res = fit(TinyLM(), make_dataset(32), collate, config=cfg(epochs=1, save_steps=4), out_dir=tmp_path)
    assert res.resumed_from == 4 and res.step == 8
