"""Every recipe goes through the real CLI parser, names a registered method with valid options, and matches its generator."""

import importlib.util
from pathlib import Path

import pytest

from ssmtune.cli.args import PretrainArgs, TrainArgs, parse
from ssmtune.cli.commands import FULL, METHOD_ALIASES, make_adapter_configs
from ssmtune.core.registry import known_methods
from ssmtune.data import get_task

ROOT = Path(__file__).resolve().parents[1] / "recipes"
# recipes/builtin/ holds `ssmtune pretrain` recipes (checked by test_pretrain_recipe_parses); the rest are `train` ones.
PRETRAIN_RECIPES = sorted((ROOT / "builtin").glob("*.yaml"))
RECIPES = sorted(set(ROOT.rglob("*.yaml")) - set(PRETRAIN_RECIPES))
# Methods whose implementation lands separately; their recipes are checked fully once they are registered.
PENDING = {"additional_scan", "bitfit", "sdlora"}


@pytest.mark.parametrize("path", PRETRAIN_RECIPES, ids=lambda p: p.name)
def test_pretrain_recipe_parses(path):
    args = parse(PretrainArgs, ["--recipe", str(path), "--corpus", "c.txt", "--out", "o"], prog="ssmtune pretrain")
    assert args.shape.arch == ("mamba2" if "mamba2" in path.name else "mamba")
    assert args.train.precision == "bf16" and args.seq_len == 512


def _generator():
    spec = importlib.util.spec_from_file_location("recipes_generate", ROOT / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_layout_is_complete():
    gen = _generator()
    expected = {ROOT / m / t / f"{meth}.yaml" for m, t, meth in gen.layout()}
    # 100 for the Mamba checkpoints of the papers, 15 for five hybrid checkpoints (state_offset_h, initial_state, lora),
    # 11 for the Gated DeltaNet / KDA ones on RTE (three Qwen3.5 sizes with all three, Kimi-Linear without LoRA), 18
    # for the Qwen3.5 sizes on users' code and maths JSONL
    assert set(RECIPES) == expected and len(RECIPES) == 144


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_recipe_parses(path):
    gen = _generator()
    args = parse(TrainArgs, ["--recipe", str(path)], prog="ssmtune train")
    model, task, method = path.relative_to(ROOT).with_suffix("").parts
    assert path.read_text() == gen.render(model, task, method), "stale recipe: run python recipes/generate.py"
    lr, epochs, batch, _ = gen.hyper(model, task, method)
    assert (args.train.lr, args.train.epochs, args.train.batch_size) == (lr, epochs, batch)
    data_task = "jsonl" if task in gen.USER_TASKS else task
    assert isinstance(args.train.lr, float) and args.data.task == data_task and args.name == f"{model}-{task}-{method}"
    get_task(args.data.task)
    registry_name = METHOD_ALIASES.get(args.method, (args.method, {}))[0]
    if args.method != FULL and registry_name in PENDING and registry_name not in known_methods():
        pytest.skip(f"method {registry_name!r} is not registered yet")
    configs = make_adapter_configs(args.method, args.method_args)
    assert (configs is None) == (method == "full")


def test_sot_learning_rates_spot_check():
    """Values copied by hand from docs/methods.md §9, so a typo in the generator's tables shows up."""
    gen = _generator()
    assert gen.hyper("mamba-130m", "qqp", "state_offset_h")[:3] == (4e-5, 3, 4)
    assert gen.hyper("mamba-130m", "sst2", "additional_scan")[:3] == (1e-1, 10, 4)
    assert gen.hyper("mamba-1.4b", "spider", "initial_state")[:3] == (1e-3, 10, 2)
    assert gen.hyper("mamba-1.4b", "samsum", "full")[:3] == (4e-5, 10, 4)
    assert gen.hyper("mamba-130m", "mrpc", "bitfit")[:3] == (4e-3, 10, 4)


def test_old_lora_option_names_still_load():
    """Recipes written before the peft field names (alpha, dropout, layers) keep working, with a warning."""
    with pytest.warns(DeprecationWarning) as record:
        (cfg,) = make_adapter_configs("lora", {"r": 8, "alpha": 16, "layers": [0], "target_modules": ["x_proj"]})
    assert cfg.lora_alpha == 16 and cfg.layers_to_transform == [0]
    assert {str(w.message) for w in record} == {
        "LoraConfig.alpha is deprecated; use lora_alpha",
        "LoraConfig.layers is deprecated; use layers_to_transform",
    }
