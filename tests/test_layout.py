"""The module layout: no module reaches into another's private names.

Read from the source (ast), so a rename that leaves an old private import behind fails here, not in a review.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "tunesmith"


def modules() -> dict[str, ast.Module]:
    """Every module of the package by dotted name (tunesmith.config.load, tunesmith.report, ...)."""
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return out


def private_imports(tree: ast.Module, own: str) -> list[str]:
    """`from tunesmith.x import _name` (at any depth of the file) where tunesmith.x is another module."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tunesmith") and node.module != own:
            found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    return found


def test_no_module_imports_another_modules_private_names():
    found = {name: bad for name, tree in modules().items() if (bad := private_imports(tree, name))}
    assert found == {}


def test_the_private_import_check_sees_one():
    # Control: the check above can fail.
    tree = ast.parse("def f():\n    from tunesmith.report.numbers import _hidden, shown\n")
    assert private_imports(tree, "tunesmith.report.html") == ["tunesmith.report.numbers._hidden"]
    assert private_imports(tree, "tunesmith.report.numbers") == []
