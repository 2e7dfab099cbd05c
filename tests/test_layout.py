"""The module layout: imports run downward, and no module reaches into another's private names.

The layers, bottom first. A module may import its own layer and those below it, never one above:

    foundation     errors, security, config/, console, paths, the package root (its version): what every
                   part needs, importing nothing of tunesmith above it
    run directory  rundir (the contract between commands), config_drift (a run's config against a new one)
    data           data/: sources, formats, splits, tokenization, the token cache
    model parts    heads: a classifier's pooling and head (training.optim gives the head its own rate)
    training       training/: the step's machinery (steppers, precision, guards, checkpoints, schedule, progress)
    models         models, hub: finding and loading weights (models imports training.zero, which patches accelerate)
    evaluation     evaluation/, privacy/ (DP-SGD, sampling, canaries), inference (loading a finished run)
    report         report/: what a person reads about runs; the recipes print through it
    recipes        recipes/: a run, start to end
    commands       commands (the CLI's command bodies), search/, audit, predict, inputs: commands built on recipes;
                   ui/ (`tunesmith ui`), which starts commands as processes and imports no training code
    cli            cli, __main__

Read from the source (ast), lazy imports inside functions included: an import put off until call time is
still an arrow. A module that no layer names fails too, so a new file needs a decision.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "tunesmith"

LAYERS = (
    (
        "foundation",
        (
            "tunesmith",
            "tunesmith.errors",
            "tunesmith.security",
            "tunesmith.config",
            "tunesmith.console",
            "tunesmith.paths",
        ),
    ),
    ("run directory", ("tunesmith.rundir", "tunesmith.config_drift")),
    ("data", ("tunesmith.data",)),
    ("model parts", ("tunesmith.heads",)),
    ("training", ("tunesmith.training",)),
    ("models", ("tunesmith.models", "tunesmith.hub")),
    ("evaluation", ("tunesmith.evaluation", "tunesmith.privacy", "tunesmith.inference")),
    ("report", ("tunesmith.report",)),
    ("recipes", ("tunesmith.recipes",)),
    (
        "commands",
        (
            "tunesmith.commands",
            "tunesmith.search",
            "tunesmith.audit",
            "tunesmith.predict",
            "tunesmith.inputs",
            "tunesmith.ui",
            "tunesmith.serve",
            "tunesmith.gguf_export",
        ),
    ),
    ("cli", ("tunesmith.cli", "tunesmith.__main__")),
)


def modules(src: Path = SRC) -> dict[str, ast.Module]:
    """Every module of the package by dotted name (tunesmith.config.load, tunesmith.report, ...)."""
    out = {}
    for path in sorted(src.rglob("*.py")):
        parts = path.relative_to(src.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return out


def layer_of(module: str) -> int | None:
    """Index of the layer holding `module`: the longest name that is the module or a package above it (the
    root `tunesmith` only by itself, or it would hold everything)."""
    best, found = -1, None
    for index, (_, names) in enumerate(LAYERS):
        for name in names:
            covers = module == name or (name != "tunesmith" and module.startswith(name + "."))
            if covers and len(name) > best:
                best, found = len(name), index
    return found


def imported(tree: ast.Module, own: str, known: set[str]) -> set[str]:
    """The tunesmith modules a module imports (`from tunesmith.training import zero` is tunesmith.training.zero)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "tunesmith"}
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{own}: a relative import (tunesmith imports absolutely, so this check reads them)"
            if (node.module or "").split(".")[0] == "tunesmith":
                out |= {
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names
                }
    return out - {own}


def upward_imports(trees: dict[str, ast.Module]) -> list[str]:
    arrows = []
    for name, tree in trees.items():
        for target in sorted(imported(tree, name, set(trees))):
            low, high = layer_of(name), layer_of(target)
            if low is not None and high is not None and high > low:
                arrows.append(f"{name} ({LAYERS[low][0]}) -> {target} ({LAYERS[high][0]})")
    return arrows


def private_imports(tree: ast.Module, own: str) -> list[str]:
    """`from tunesmith.x import _name` (at any depth of the file) where tunesmith.x is another module."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tunesmith") and node.module != own:
            found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    return found


def test_every_module_has_a_layer():
    assert [name for name in modules() if layer_of(name) is None] == []


def test_imports_run_downward():
    assert upward_imports(modules()) == []


def test_the_layer_check_sees_an_upward_import_even_inside_a_function():
    # Control: the check above can fail (a lazy import in data/ of the recipes, and one at module level).
    trees = {
        "tunesmith.data.prepare": ast.parse("def f():\n    from tunesmith.recipes import causal_lm\n"),
        "tunesmith.config.load": ast.parse("import tunesmith.training.plan\n"),
        "tunesmith.recipes.causal_lm": ast.parse("from tunesmith.data import prepare\n"),
        "tunesmith.training.plan": ast.parse(""),
        "tunesmith.data": ast.parse(""),
    }
    assert upward_imports(trees) == [
        "tunesmith.data.prepare (data) -> tunesmith.recipes.causal_lm (recipes)",
        "tunesmith.config.load (foundation) -> tunesmith.training.plan (training)",
    ]
    assert layer_of("tunesmith.config_drift") == 1 and layer_of("tunesmith.config.load") == 0
    assert layer_of("tunesmith.newthing") is None


def test_no_module_imports_another_modules_private_names():
    found = {name: bad for name, tree in modules().items() if (bad := private_imports(tree, name))}
    assert found == {}


def test_the_private_import_check_sees_one():
    # Control: the check above can fail.
    tree = ast.parse("def f():\n    from tunesmith.report.numbers import _hidden, shown\n")
    assert private_imports(tree, "tunesmith.report.html") == ["tunesmith.report.numbers._hidden"]
    assert private_imports(tree, "tunesmith.report.numbers") == []


def test_the_ui_imports_no_training_code():
    """`tunesmith ui` reads run directories and starts CLI processes: a page never loads a model."""
    trees = {name: tree for name, tree in modules().items() if name.startswith("tunesmith.ui")}
    allowed = ("tunesmith.ui", "tunesmith.errors", "tunesmith.config", "tunesmith.security", "tunesmith.rundir")
    allowed += ("tunesmith.report",)
    reached = {t for name, tree in trees.items() for t in imported(tree, name, set(modules()))}
    assert reached and sorted(t for t in reached if not t.startswith(allowed)) == []
    outside = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                outside |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                outside.add(node.module.split(".")[0])
    assert outside and not outside & {"torch", "transformers", "peft", "accelerate", "opacus"}
