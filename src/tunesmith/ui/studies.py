"""Searches and learning curves in the runs folder, as `tunesmith search` and `tunesmith curve` wrote them:
a search folder (NAME-search/) holds study.yaml, trials.md, best.yaml and its plots; a curve folder
(NAME-curve/) holds curve.json and curve.png. Read tolerantly: a study still running has only some of them."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

FILES = {"search": ("history.png", "importance.png", "compare.html"), "curve": ("curve.png",)}


def kind(folder: Path) -> str | None:
    if (folder / "study.yaml").is_file() or (folder / "trials.md").is_file():
        return "search"
    return "curve" if (folder / "curve.json").is_file() else None


def list_studies(root: Path) -> list[dict]:
    """Every search and curve folder under root, newest first."""
    if not root.is_dir():
        return []
    found = [(p, kind(p)) for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    rows = [{"name": p.name, "kind": k, "modified": p.stat().st_mtime} for p, k in found if k]
    return sorted(rows, key=lambda r: r["modified"], reverse=True)


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def markdown_table(text: str) -> tuple[list[str], list[list[str]], str]:
    """The first pipe table of `text` as (header, rows) and whatever follows it."""
    lines = text.splitlines()
    table = [line for line in lines if line.startswith("|")]
    rest = "\n".join(line for line in lines if not line.startswith("|")).strip()
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table]
    cells = [row for row in cells if not all(set(c) <= {"-", ":"} for c in row)]  # the |---| rule
    return (cells[0], cells[1:], rest) if cells else ([], [], rest)


def search(folder: Path) -> dict:
    try:
        study = yaml.safe_load(_text(folder / "study.yaml")) or {}
    except yaml.YAMLError:
        study = {}
    header, rows, rest = markdown_table(_text(folder / "trials.md"))
    return {
        "study": study if isinstance(study, dict) else {},
        "header": header,
        "rows": rows,
        "budget": rest,
        "best": _text(folder / "best.yaml"),
        "files": [f for f in FILES["search"] if (folder / f).is_file()],
    }


def curve(folder: Path) -> dict:
    try:
        result = json.loads(_text(folder / "curve.json"))
    except ValueError:
        result = {}
    result = result if isinstance(result, dict) else {}
    return {
        "metric": result.get("metric", "-"),
        "summary": [s for s in result.get("summary", []) if isinstance(s, dict)],
        "baselines": result.get("baselines") or {},
        "files": [f for f in FILES["curve"] if (folder / f).is_file()],
    }
