"""ssmtune's packages import one way: each module may import its own package and the layers below it, never above.

    6  cli, serve, bench         the programs: command line (``ssmtune demo`` included), HTTP server, benchmarks
    5  data, train, eval         datasets, the training loop, evaluation
    4  methods                   the PEFT methods; each registers itself when ``ssmtune`` imports ``ssmtune.methods``
    3  core                      PeftModel, the registry, injection, per-row routing, adapter files
    2  models                    Mamba / Mamba-2 models, their loading and the mixers' state-hook contract
    1  ops, tokenizer, builtin   kernels and their references, the tokenizer, the built-in toy corpus (WordNet)
    0  utils                     atomic file writes: every layer may use them

``ssmtune/__init__.py`` is the public API and may import anything. Packages of one layer do not import each other,
except the pairs in ``SIBLING_IMPORTS`` (one direction each). No module imports a private name (``_x``) from another
package: what two packages share moves down a layer and becomes public.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "ssmtune"

LAYERS = {
    "utils": 0,
    "ops": 1, "tokenizer": 1, "builtin": 1,
    "models": 2,
    "core": 3,
    "methods": 4,
    "data": 5, "train": 5, "eval": 5,
    "cli": 6, "serve": 6, "bench": 6,
}  # fmt: skip
# (importer, imported) packages of one layer that may import each other in this direction only.
SIBLING_IMPORTS = {
    ("eval", "data"),  # evaluation tokenizes a task's examples with the data pipeline
    ("train", "data"),  # the loop plans packed rows' steps from their collator (PackedRowsCollator.plan)
    ("cli", "serve"),  # `ssmtune serve` starts the server
    ("cli", "bench"),  # `ssmtune bench` runs the harness
    ("bench", "serve"),  # the serving benchmark drives the engine
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _package(module: str) -> str | None:
    """``ssmtune.core.io`` -> ``core``; ``ssmtune`` itself (the public API) -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module, imported names) of every ssmtune import in the file, lazy ones included."""
    module = _module_name(path)
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] == "ssmtune"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "ssmtune":
                continue
            names = [a.name for a in node.names]
            if not node.module:  # `from . import x`: x is a module of the package
                out += [(node.lineno, f"{target}.{n}", []) for n in names]
            else:
                out.append((node.lineno, target, names))
    return out


MODULES = sorted(ROOT.rglob("*.py"))


def test_every_package_has_a_layer():
    packages = {_package(_module_name(p)) for p in MODULES} - {None}
    missing = sorted(packages - set(LAYERS))
    assert not missing, f"packages without a layer in tests/test_layers.py: {missing}; add them to LAYERS"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module_name(p))
def test_imports_go_down(path):
    module = _module_name(path)
    pkg = _package(module)
    if pkg is None:
        return  # ssmtune/__init__.py: the public API
    errors = []
    for line, target, names in _imports(path):
        if _package(target) is None:
            # `from ssmtune import ops` imports the subpackage ssmtune.ops: checked as such below
            subpackages = [n for n in names if n in LAYERS]
            if any(n != "__version__" and n not in LAYERS for n in names):
                errors.append(f"{module}:{line} imports {names} from the top-level ssmtune package (public API)")
            targets = [f"ssmtune.{n}" for n in subpackages]
        else:
            targets = [target]
        for target in targets:
            tpkg = _package(target)
            if tpkg == pkg or tpkg not in LAYERS or pkg not in LAYERS:
                continue
            lo, hi = LAYERS[pkg], LAYERS[tpkg]
            if hi > lo or (hi == lo and (pkg, tpkg) not in SIBLING_IMPORTS):
                errors.append(
                    f"{module}:{line} (layer {lo}, {pkg}) imports {target} (layer {hi}, {tpkg}): "
                    + ("a layer above" if hi > lo else "a sibling of the same layer")
                )
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module_name(p))
def test_no_private_names_across_packages(path):
    module = _module_name(path)
    pkg = _package(module)
    errors = []
    for line, target, names in _imports(path):
        tpkg = _package(target)
        if tpkg == pkg:
            continue
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        private += [p for p in target.split(".") if p.startswith("_") and not p.startswith("__")]
        if private:
            errors.append(f"{module}:{line} (package {pkg}) imports private {private} from {target} ({tpkg})")
    assert not errors, "\n".join(errors)


def test_the_parser_resolves_relative_and_lazy_imports():
    """A check that finds nothing must be able to find something."""
    found = {t for _, t, _ in _imports(ROOT / "models" / "mamba.py")}
    assert "ssmtune.models.hooks" in found and "ssmtune.ops" in found
    assert ("ssmtune.models.loading", ["save_pretrained"]) in [
        (t, n) for _, t, n in _imports(ROOT / "models" / "lm.py")
    ]
