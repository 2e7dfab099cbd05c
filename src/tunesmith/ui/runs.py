"""What the web UI shows of the run directories: read from the files a run writes, never from a recipe.

Every reader here tolerates a run that is being written or was damaged: a truncated or garbled line of
metrics.jsonl is skipped, a missing or unreadable JSON file reads as empty, so a page always renders.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from tunesmith.report.html import series
from tunesmith.report.numbers import headline, verdict_rows
from tunesmith.rundir import RunDir


def read_json(run: RunDir, name: str) -> dict:
    try:
        value = json.loads((run / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def records(run: RunDir, start: int = 0) -> tuple[list[dict], int]:
    """metrics.jsonl's records from byte `start`, and the offset to read on from. A last line without
    its newline may still be being written: it is left for the next read. Garbled lines are skipped."""
    try:
        with open(run / "metrics.jsonl", "rb") as f:
            f.seek(start)
            chunk = f.read()
    except OSError:
        return [], start
    complete = chunk[: chunk.rfind(b"\n") + 1]
    out = []
    for line in complete.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out, start + len(complete)


def config_tree(run: RunDir) -> dict:
    try:
        tree = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return tree if isinstance(tree, dict) else {}


def summary(run: RunDir) -> dict:
    """One row of the runs page."""
    info, report, tree = read_json(run, "run.json"), read_json(run, "eval.json"), config_tree(run)
    metric, base, ft = headline(report)
    forgetting = report.get("finetuned", {}).get("forgetting", {}).get("ratio")
    return {
        "name": run.path.name,
        "task": str(info.get("task") or report.get("task") or tree.get("task") or "-"),
        "model": str((tree.get("model") or {}).get("name", "-")),
        "status": run.status(),
        "steps": info.get("steps", info.get("step")),
        "metric": metric,
        "base": base,
        "finetuned": ft,
        "epsilon": report.get("epsilon"),
        "forgetting": forgetting,
        "started": info.get("started"),
    }


def list_runs(root: Path) -> list[dict]:
    """Every run directory under root (those with a config.yaml), newest first."""
    if not root.is_dir():
        return []
    found = [RunDir(p) for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    rows = [summary(r) for r in found if (r / "config.yaml").is_file()]
    return sorted(rows, key=lambda r: r["started"] or 0, reverse=True)


def progress(run: RunDir, recs: list[dict]) -> dict:
    """Where a run stands: step of total, tokens/s and an ETA from the steps logged so far."""
    info = read_json(run, "run.json")
    steps = [r for r in recs if "loss" in r and "step" in r and "time" in r]
    total = info.get("total_steps")
    out = {"status": run.status(), "step": steps[-1]["step"] if steps else 0, "total": total}
    if steps:
        out["tokens_per_s"] = steps[-1].get("tokens_per_s")
    if len(steps) >= 2 and total:
        first, last = steps[0], steps[-1]
        rate = (last["step"] - first["step"]) / max(1e-9, last["time"] - first["time"])
        if rate > 0 and out["status"] == "running":
            out["eta_s"] = round((total - last["step"]) / rate)
    return out


def warnings(recs: list[dict]) -> list[str]:
    return [str(r["warning"]) for r in recs if r.get("warning")]


def curves(recs: list[dict]) -> dict[str, list[list[float]]]:
    """The run's curves as {name: [[steps...], [values...]]}, the shape the page's charts take."""
    return {name: [list(xs), list(ys)] for name, pts in series(recs).items() for xs, ys in [zip(*pts)]}


def verdict(report: dict) -> list[dict]:
    rows = []
    for split, metric, b, f, higher in verdict_rows(report):
        better = None
        if isinstance(b, (int, float)) and isinstance(f, (int, float)) and higher is not None and b != f:
            better = (f > b) == higher
        rows.append({"split": split, "metric": metric, "base": b, "finetuned": f, "better": better})
    return rows


def data_sections(report: dict) -> list[tuple[str, list[str], list[list]]]:
    """The data report as tables a person reads: (title, header, rows) for each part it has."""
    out = []
    if isinstance(report.get("rows"), dict):
        out.append(("Rows", ["split", "rows"], [[k, v] for k, v in report["rows"].items()]))
    removed = [["bad rows (" + code + ")", n] for code, n in (report.get("bad_rows") or {}).items()]
    removed += [[k.replace("_", " "), _count(v)] for k, v in report.items() if k.endswith(("_duplicates", "_removed"))]
    removed += [[f"label conflicts in {k}", _count(v)] for k, v in (report.get("label_conflicts") or {}).items()]
    out.append(("Bad rows, duplicates and leakage", ["finding", "rows"], removed or [["none", 0]]))
    if isinstance(report.get("labels"), dict):
        splits = list(report["labels"])
        names = sorted({lab for c in report["labels"].values() for lab in c})
        out.append(
            (
                "Label balance",
                ["label", *splits],
                [[n, *(report["labels"][s].get(n, 0) for s in splits)] for n in names],
            )
        )
    tokens = report.get("tokens")
    if isinstance(tokens, dict):
        cols = ("min", "p50", "p95", "max")
        rows = [
            [s, *(t.get("token_lengths", {}).get(c) for c in cols)] for s, t in tokens.items() if isinstance(t, dict)
        ]
        out.append(("Token lengths", ["split", *cols], rows))
        counts = [
            [f"{s}: {k.replace('_', ' ')}", v]
            for s, t in tokens.items()
            if isinstance(t, dict)
            for k, v in t.items()
            if isinstance(v, int) and k != "rows" and v
        ]
        if counts:
            out.append(("Over-length and unusable rows", ["split: what", "rows"], counts))
    if report.get("warnings"):
        out.append(("Warnings", ["warning"], [[w] for w in report["warnings"]]))
    return out


def histogram(report: dict) -> dict[str, list]:
    """Token-length histograms as {split: [[bin starts...], [counts...]]} where the report has them."""
    tokens = report.get("tokens")
    if not isinstance(tokens, dict):
        return {}
    return {
        split: [t["length_histogram"]["edges"][:-1], t["length_histogram"]["counts"]]
        for split, t in tokens.items()
        if isinstance(t, dict) and isinstance(t.get("length_histogram"), dict)
    }


def _count(value) -> object:
    return len(value) if isinstance(value, (list, dict)) else value


def age(started: float | None) -> str:
    if not started:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(started))
