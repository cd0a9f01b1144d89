"""End to end: `ssmtune train / eval / generate / compare / pretrain` on a tiny model saved to tmp, and clear errors."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from ssmtune.cli.__main__ import COMMANDS, arg_type, main
from ssmtune.models import MambaConfig, causal_lm_for

BYTE_MARKER = '{"tokenizer_class": "ByteTokenizer"}\n'


def save_tiny(folder: Path, d_model: int = 16) -> Path:
    torch.manual_seed(0)
    model = causal_lm_for(MambaConfig(d_model=d_model, n_layer=2, d_state=4, vocab_size=264))
    model.save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text(BYTE_MARKER)
    return folder


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    base = save_tiny(root / "base")
    rte = root / "rte"
    rte.mkdir()
    words = ["cats sleep", "dogs run", "birds fly", "fish swim", "a b", "c d", "e f", "g h"]
    for split, n in (("train", 16), ("validation", 4)):
        rows = [{"sentence1": words[i % 8], "sentence2": words[(i * 3) % 8], "label": i % 2} for i in range(n)]
        (rte / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    gen = root / "gen"
    gen.mkdir()
    for split, n in (("train", 8), ("validation", 2)):
        rows = [{"input": f"say {w}", "target": w} for w in words[:n]]
        (gen / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "base": base, "rte": rte, "gen": gen, "runs": root / "runs"}


def train_argv(env, name: str, *extra: str) -> list[str]:
    return ["train", "--model", str(env["base"]), "--data.task", "rte", "--data.data_dir", str(env["rte"]),
            "--train.epochs", "2", "--train.lr", "1e-2", "--train.save_steps", "2", "--train.progress", "false",
            "--train.log_steps", "1", "--train.best_metric", "score", "--eval.batch_size", "4",
            "--out_dir", str(env["runs"]), "--name", name, *extra]  # fmt: skip


def test_commands_dict_matches_parsers():
    assert set(COMMANDS) == {"train", "eval", "generate", "compare", "pretrain", "bench", "demo", "serve"}
    for name, fn in COMMANDS.items():
        tp = arg_type(fn)
        assert tp == list[str] if name in ("demo", "bench") else tp.__name__.endswith("Args"), name


def test_train_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--recipe", "--model", "--method_args", "--data.task", "--data.data_dir", "--train.lr",
                 "--train.micro_batch_size", "--train.precision", "--eval.num_beams", "Peak learning rate"):  # fmt: skip
        assert flag in out, flag
    assert "state_offset_h" in out and "full" in out  # the method list in the epilog


@pytest.mark.parametrize(("flag", "value"), [(None, None), ("auto", None), ("AUTO", None), ("true", True),
                                             ("false", False), ("null", None)])  # fmt: skip
def test_train_cuda_graph_flag_reads_auto_true_false(tmp_path, flag, value):
    """--train.cuda_graph: auto (the default) is None; a recipe may say `cuda_graph: auto` too."""
    from ssmtune.cli.args import TrainArgs, parse

    argv = ["--model", "m", "--data.task", "rte"] + ([] if flag is None else ["--train.cuda_graph", flag])
    assert parse(TrainArgs, argv, prog="t").train.cuda_graph is value
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"train: {{cuda_graph: {flag or 'auto'}}}\n")
    assert parse(TrainArgs, ["--recipe", str(recipe), "--model", "m", "--data.task", "rte"],
                 prog="t").train.cuda_graph is value  # fmt: skip


def test_train_cuda_graph_flag_refuses_other_words(capsys):
    from ssmtune.cli.args import TrainArgs, parse

    with pytest.raises(SystemExit):
        parse(TrainArgs, ["--model", "m", "--data.task", "rte", "--train.cuda_graph", "maybe"], prog="t")
    assert "--train.cuda_graph: expected auto/true/false, got 'maybe'" in capsys.readouterr().err


def test_train_eval_generate(env, capsys):
    assert main(train_argv(env, "soh")) == 0
    run = env["runs"] / "soh"
    for f in ("config.yaml", "metrics.jsonl", "results.json", "loss.png", "eval.png", "best/adapter_config.json",
              "final/adapter_model.safetensors"):  # fmt: skip
        assert (run / f).exists(), f
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["train"]["lr"] == 0.01 and config["method"] == "state_offset_h" and config["data"]["task"] == "rte"
    results = json.loads((run / "results.json").read_text())
    # h' of 2 layers x D=32 x N=4.
    assert results["trainable_params"] == 2 * 32 * 4 and results["steps"] == 8
    assert {"accuracy", "ref_accuracy", "out_of_class", "loss", "score"} <= set(results["best_eval"])
    capsys.readouterr()

    out_json = env["root"] / "eval.json"
    argv = ["eval", "--model", str(env["base"]), "--adapter", str(run / "best"), "--data.task", "rte",
            "--data.data_dir", str(env["rte"]), "--output", str(out_json)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(out_json.read_text())
    assert result["num_examples"] == 4 and result["mode"] == "classification"
    assert result["accuracy"] == pytest.approx(results["best_eval"]["accuracy"])
    capsys.readouterr()
    argv = ["generate", "--model", str(env["base"]), "--adapter", str(run / "final"), "--prompt", "cats",
            "--max_new_tokens", "3", "--num_beams", "2"]  # fmt: skip
    assert main(argv) == 0


def test_full_finetune_and_compare(env, capsys):
    assert main(train_argv(env, "full", "--method", "full", "--train.epochs", "1", "--eval.mode", "loss")) == 0
    final = env["runs"] / "full" / "final"
    assert (final / "model.safetensors").exists() and (final / "config.json").exists()
    # A generation recipe run by compare, next to the finished run above.
    recipe = env["root"] / "gen_lora.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": str(env["base"]), "tokenizer": str(env["base"]), "method": "lora",
        "method_args": {"r": 2, "target_modules": ["x_proj", "dt_proj"]},
        "data": {"task": "jsonl", "data_dir": str(env["gen"])},
        "train": {"epochs": 1, "lr": 1e-2, "progress": False, "save_steps": 0, "best_metric": "score"},
        "eval": {"mode": "generation", "num_beams": 2, "max_new_tokens": 4, "min_new_tokens": 1},
        "out_dir": str(env["runs"]), "name": "gen-lora",
    }))  # fmt: skip
    out = env["root"] / "cmp"
    argv = ["compare", "--recipes", f"[{recipe}]", "--runs", f"[{env['runs'] / 'full'}]", "--out", str(out)]
    assert main(argv) == 0
    lines = (out / "compare.csv").read_text().splitlines()
    assert lines[0].startswith("run,task,method,trainable_params") and len(lines) == 3
    assert "gen-lora" in (out / "compare.md").read_text() and (out / "compare.png").exists()
    gen = json.loads((env["runs"] / "gen-lora" / "results.json").read_text())
    assert "rougeL" in gen["best_eval"] and gen["trainable_params"] > 0


def test_pretrain_then_generate(env, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("the cat sat on the mat. " * 20)
    out = tmp_path / "model"
    argv = ["pretrain", "--corpus", str(corpus), "--out", str(out), "--shape.d_model", "16", "--shape.n_layer", "1",
            "--shape.d_state", "4", "--seq_len", "32", "--train.max_steps", "3", "--train.batch_size", "2",
            "--train.progress", "false", "--train.warmup_steps", "0", "--val_fraction", "0.2"]  # fmt: skip
    assert main(argv) == 0
    assert (out / "model.safetensors").exists() and (out / "training" / "metrics.jsonl").exists()
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "--prompt", "the", "--max_new_tokens", "4"]) == 0


def test_clear_errors(env, tmp_path, capsys):
    # A missing dataset file.
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = train_argv(env, "x")
    argv[argv.index("--data.data_dir") + 1] = str(empty)
    assert main(argv) == 2
    assert "no dataset file in" in capsys.readouterr().err

    # A recipe with an unknown key: the parser names it and lists the valid ones.
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\ndata: {task: rte}\ntrain: {lrr: 1.0}\n")
    with pytest.raises(SystemExit) as e:
        main(["train", "--recipe", str(bad)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown key 'train.lrr'" in err and "valid keys:" in err and "train.lr," in err

    # A recipe with an unknown method lists the methods.
    bad.write_text(f"model: {env['base']}\nmethod: state_offsett\ndata: {{task: rte}}\n")
    assert main(["train", "--recipe", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'state_offsett'" in err and "state_offset_h" in err and "lora" in err

    # A model folder without a tokenizer.
    bare = tmp_path / "bare"
    shutil.copytree(env["base"], bare)
    (bare / "tokenizer_config.json").unlink()
    argv = train_argv(env, "y")
    argv[argv.index("--model") + 1] = str(bare)
    assert main(argv) == 2
    assert "no tokenizer in" in capsys.readouterr().err

    # An adapter trained for another base model.
    other = save_tiny(tmp_path / "other", d_model=24)
    adapter = env["runs"] / "soh" / "final"
    if not adapter.exists():
        assert main(train_argv(env, "soh")) == 0
    argv = ["eval", "--model", str(other), "--adapter", str(adapter), "--data.task", "rte",
            "--data.data_dir", str(env["rte"])]  # fmt: skip
    assert main(argv) == 2
    assert "different base model" in capsys.readouterr().err


def test_sdlora_selects_once_and_resume_keeps_the_selection(env):
    """`--method sdlora` runs the warm-up selection before training; checkpoints carry the selected indices, so a
    resumed run neither repeats the warm-up nor changes the selection."""
    from safetensors.torch import load_file

    from ssmtune.train.checkpoint import list_checkpoints

    argv = train_argv(env, "sdl", "--method", "sdlora", "--method_args",
                      "{warmup_steps: 2, channel_freeze: 0.5, state_freeze: 0.5}", "--train.batch_size", "4",
                      "--train.max_steps", "3", "--eval.mode", "none")  # fmt: skip
    assert main(argv) == 0
    ckpt = list_checkpoints(env["runs"] / "sdl" / "checkpoints")[-1]
    saved = load_file(str(ckpt / "trainable.safetensors"))
    index_keys = [k for k in saved if k.endswith(".index")]
    selected = [k for k in saved if k.endswith(".selected")]
    assert index_keys and all(int(saved[k]) == 1 for k in selected)  # the warm-up wrote a real selection
    final = load_file(str(env["runs"] / "sdl" / "final" / "adapter_model.safetensors"))
    assert any(k.endswith("index") for k in final)
    # rerunning the same command resumes from the step-2 checkpoint: no new warm-up, the same selection
    shutil.rmtree(env["runs"] / "sdl" / "final")
    assert main(argv) == 0
    again = load_file(str(env["runs"] / "sdl" / "final" / "adapter_model.safetensors"))
    assert all(torch.equal(again[k], final[k]) for k in final if k.endswith("index"))
    assert json.loads((env["runs"] / "sdl" / "results.json").read_text())["resumed_from"] == 2


def test_refused_resume_keeps_config_yaml(env, capsys):
    """Rerunning a run with another learning rate is refused before anything in the run folder is rewritten."""
    argv = train_argv(env, "lrchange", "--train.max_steps", "3", "--eval.mode", "none")
    assert main(argv) == 0
    before = (env["runs"] / "lrchange" / "config.yaml").read_text()
    capsys.readouterr()
    changed = [a if a != "1e-2" else "5e-2" for a in argv]
    assert main(changed) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "lr: 0.01 -> 0.05" in err
    assert (env["runs"] / "lrchange" / "config.yaml").read_text() == before


def test_refused_resume_over_other_batches_keeps_config_yaml(env, capsys):
    """Checkpoints of packed rows resumed over other batches (unpacked, or rows of another width) are refused with
    fit's message before config.yaml is rewritten (the rows' lead comes from the model, so the check follows its
    loading)."""
    argv = train_argv(env, "rowschange", "--data.packing", "true", "--max_length", "61", "--train.max_steps", "3",
                      "--eval.mode", "none")  # fmt: skip
    assert main(argv) == 0
    config_yaml = env["runs"] / "rowschange" / "config.yaml"
    before = config_yaml.read_bytes()
    for change, now in ((["--data.packing", "false"], "'batch_size examples'"),
                        (["--max_length", "100"], "'packed rows of 128 tokens, lead 3'")):  # fmt: skip
        code, err = _run_main([*argv, *change], capsys)
        assert code == 2
        assert "cannot resume" in err and f"batches: 'packed rows of 64 tokens, lead 3' -> {now}" in err, err
        assert config_yaml.read_bytes() == before


def _run_main(argv: list[str], capsys) -> tuple[int, str]:
    """main()'s exit code (argparse's SystemExit included) and its stderr; any other exception fails the test."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "usage:" not in err, err
    return lines[0]


def _bad_invocations(env, tmp: Path) -> list[tuple[str, list[str], int, str]]:
    """(id, argv, exit code, text of the one stderr line) for every kind of user error."""
    (tmp / "bad.yaml").write_text("model: [unclosed\ndata: {task: rte}\n")
    (tmp / "a_file").write_text("x")
    corpus = tmp / "corpus.txt"
    corpus.write_text("the cat sat on the mat. " * 40)
    out_dir = tmp / "out_folder"
    out_dir.mkdir(exist_ok=True)
    gen = ["generate", "--model", str(env["base"]), "--prompt", "hi"]
    ev = ["eval", "--model", str(env["base"]), "--data.task", "rte", "--data.data_dir", str(env["rte"])]
    return [
        ("recipe-yaml", ["train", "--recipe", str(tmp / "bad.yaml")], 2, "is not valid YAML (expected ',' or ']'"),
        ("method-args-yaml", train_argv(env, "v1", "--method_args", "{r: 8"), 2, "'{r: 8' is not valid YAML"),
        ("method-args-list", train_argv(env, "v2", "--method_args", "[1, 2]"), 2, "method_args must be a YAML mapping"),
        ("bad-int", train_argv(env, "v3", "--train.epochs", "two"), 2, "invalid int value: 'two'"),
        ("lr-nan", train_argv(env, "v4", "--train.lr", "nan"), 2, "lr must be a finite number > 0, got nan"),
        ("lr-inf", train_argv(env, "v5", "--train.lr", "inf"), 2, "lr must be a finite number > 0, got inf"),
        ("missing-model", [*train_argv(env, "v6"), "--model", str(tmp / "nope")], 2,
         f"model {str(tmp / 'nope')!r} does not exist"),
        ("batch-too-big", train_argv(env, "v7", "--train.batch_size", "1000"), 2,
         "has 16 examples, fewer than batch_size=1000"),
        ("out-dir-file", [*train_argv(env, "v8"), "--out_dir", str(tmp / "a_file")], 2, "is not a writable folder"),
        ("eval-output-folder", [*ev, "--output", str(out_dir)], 2, "--output: " + repr(str(out_dir)) + " is a folder"),
        ("eval-output-under-a-file", [*ev, "--output", str(tmp / "a_file" / "r.json")], 2, "is a file, not a folder"),
        ("generate-too-long", [*gen, "--max_new_tokens", "1000000000"], 2, "--max_new_tokens must be in 1..65536"),
        ("generate-temperature", [*gen, "--temperature", "0"], 2, "--temperature must be a finite number > 0"),
        ("unknown-flag", [*gen, "--nope", "1"], 2, "unrecognized arguments: --nope 1"),
        ("pretrain-out-file", ["pretrain", "--corpus", str(corpus), "--out", str(tmp / "a_file")], 2,
         "--out: " + repr(str(tmp / "a_file")) + " is a file, not a folder"),
        ("compare-out-file", ["compare", "--runs", str(tmp), "--out", str(tmp / "a_file")], 2, "is a file, not a folder"),
        ("serve-bad-limit", ["serve", "--model", str(env["base"]), "--max_body_bytes", "0"], 2,
         "--max_body_bytes must be >= 1, got 0"),
    ]  # fmt: skip


def test_every_bad_invocation_ends_with_one_line_and_no_folder(env, tmp_path, capsys):
    for case, argv, code, text in _bad_invocations(env, tmp_path):
        got, err = _run_main(argv, capsys)
        assert got == code, (case, err)
        line = _one_line_error(err)
        assert line.startswith(f"ssmtune {argv[0]}: error: ") and text in line, (case, line)
        # a refused run leaves no run folder behind
        assert not any((env["runs"] / f"v{i}").exists() for i in range(1, 9)), case


def test_ctrl_c_exits_130_with_how_to_resume(env, capsys, monkeypatch):
    import ssmtune.train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ssmtune.train, "fit", interrupted)  # Ctrl-C in the middle of training
    code, err = _run_main(train_argv(env, "ctrlc"), capsys)
    assert code == 130
    assert _one_line_error(err) == "ssmtune train: interrupted; rerun the same command to resume"


def test_resume_refusals_fallback_and_leftover_cleanup(env, tmp_path, capsys):
    """A rerun resumes past a damaged newest checkpoint (saying so), refuses an unsafe pickle and another --model
    with one line, and removes the temporary files an interrupted write left."""
    from ssmtune.train.checkpoint import list_checkpoints

    argv = train_argv(env, "ck", "--train.max_steps", "3", "--train.save_steps", "1", "--eval.mode", "none")
    assert _run_main(argv, capsys)[0] == 0
    run = env["runs"] / "ck"
    before, newest = list_checkpoints(run / "checkpoints")[-2:]
    # a damaged newest checkpoint and the leftovers of a write killed midway
    (newest / "trainable.safetensors").write_bytes(b"\x00" * 10)
    (run / ".tmp-best-999999").mkdir()
    (run / ".tmp-best-999999" / "adapter_model.safetensors").write_bytes(b"half")
    (run / ".tmp-results.json-999999").write_text("{")
    with pytest.warns(UserWarning, match="resuming from the previous complete checkpoint") as warned:
        code, err = _run_main(argv, capsys)
    assert code == 0, err
    want = (f"checkpoint {str(newest)!r} cannot be read (SafetensorError: Error while deserializing header: invalid "
            "JSON in header: EOF while parsing a value at line 1 column 0); resuming from the previous complete "
            "checkpoint")  # fmt: skip
    assert [str(w.message) for w in warned if "cannot be read" in str(w.message)] == [want]
    assert json.loads((run / "results.json").read_text())["resumed_from"] == int(before.name.split("-")[1])
    assert not list(run.glob(".tmp-*"))
    # an unsafe pickle in the newest checkpoint is refused, not run and not skipped
    torch.save({"step": 3, "path": Path("x")}, newest / "state.pt")
    code, err = _run_main(argv, capsys)
    assert code == 2 and "unsafe pickle" in _one_line_error(err)
    shutil.rmtree(newest)
    # another base model (same shape, other folder) cannot continue these checkpoints
    other = tmp_path / "other_base"
    shutil.copytree(env["base"], other)
    code, err = _run_main([*argv, "--model", str(other)], capsys)
    assert code == 2
    line = _one_line_error(err)
    assert "cannot resume" in line and f"--model: {str(env['base'])!r} -> {str(other)!r}" in line


def test_eval_json_parses_when_the_loss_is_nan(env, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    nan_model = tmp_path / "nan_model"
    shutil.copytree(env["base"], nan_model)
    weights = load_file(str(nan_model / "model.safetensors"))
    key = next(k for k in weights if k.endswith("norm_f.weight"))
    weights[key] = torch.full_like(weights[key], float("nan"))
    save_file(weights, str(nan_model / "model.safetensors"))
    out = tmp_path / "r.json"
    argv = ["eval", "--model", str(nan_model), "--data.task", "rte", "--data.data_dir", str(env["rte"]),
            "--eval.mode", "loss", "--output", str(out)]  # fmt: skip
    assert _run_main(argv, capsys)[0] == 0
    result = json.loads(out.read_text())  # strict JSON: no NaN token
    assert "NaN" not in out.read_text()
    assert result["loss"] is None and result["non_finite"]["loss"] == "nan"


@pytest.mark.parametrize("layout", ["rows", "cu_seqlens"])
def test_train_with_packing(env, capsys, layout):
    """--data.packing true packs into rows by default (a step of batch_size rows, as many examples as fit), or into
    one cu_seqlens row per batch; both train and evaluate."""
    argv = train_argv(env, f"packed-{layout}", "--data.packing", "true", "--data.packing_layout", layout,
                      "--max_length", "61", "--train.save_steps", "0")  # fmt: skip
    assert main(argv) == 0
    results = json.loads((env["runs"] / f"packed-{layout}" / "results.json").read_text())
    # 16 examples cut to 61 tokens: each fills a row of 64 (3 lead pads), so a step's 4 rows take 4 examples, as a
    # cu_seqlens batch does: 4 steps an epoch
    assert results["steps"] == 8
    capsys.readouterr()


def test_packed_rows_take_fewer_examples_than_batch_size():
    from types import SimpleNamespace as NS

    from ssmtune.cli.commands import check_enough_examples

    def args(packing, layout="rows"):
        return NS(data=NS(packing=packing, packing_layout=layout), train=NS(batch_size=8))

    check_enough_examples(3, args(True))  # batch_size counts rows: 3 long examples fill a step
    with pytest.raises(ValueError, match="has 3 examples, fewer than batch_size=8"):
        check_enough_examples(3, args(False))
    with pytest.raises(ValueError, match="has 3 examples, fewer than batch_size=8"):
        check_enough_examples(3, args(True, "cu_seqlens"))
    with pytest.raises(ValueError, match="has no examples"):
        check_enough_examples(0, args(True))
