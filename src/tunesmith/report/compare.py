"""`tunesmith compare RUN RUN ...`: one self-contained HTML page for several runs.

Every curve the runs logged (training and validation loss, epsilon, forgetting, the validation task
metric) is overlaid in one panel per curve, and the runs' numbers stand side by side: the task metrics
before and after fine-tuning, epsilon, the worst forgetting ratio, status and time. A search writes one
for its trials and a staged run one for its stages.
"""

from __future__ import annotations

from html import escape
from pathlib import Path

from tunesmith.report.html import STYLE, png, read_records, series, table
from tunesmith.report.numbers import SHOWN, fmt
from tunesmith.rundir import RunDir

PANELS = (
    "train loss",
    "validation loss",
    "epsilon",
    "forgetting ratio",
    "validation accuracy",
    "validation rougeL",
    "validation bleu4",
    "validation coverage",
    "validation perplexity",
)


def overlay(curves: dict[str, dict]) -> str:
    """One panel per curve name that any run has, every run's line in it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [p for p in PANELS if any(p in c for c in curves.values())]
    if not names:
        return "<p>No curves were logged.</p>"
    cols = min(2, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(11, 3.4 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for run, found in curves.items():
            if name in found:
                ax.plot(*zip(*found[name]), "-" if name == "train loss" else "o-", label=run, markersize=3)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.tight_layout()
    return png(fig)


def numbers(runs: list[RunDir]) -> list[list[str]]:
    """Rows of the side-by-side table: metric (base -> fine-tuned), epsilon, forgetting, status, time."""
    reports = [run.read_json("eval.json", {}) for run in runs]
    infos = [run.read_json("run.json", {}) for run in runs]
    val = [(r.get("base", {}).get("validation", {}), r.get("finetuned", {}).get("validation", {})) for r in reports]
    rows = []
    for m in SHOWN:
        if any(isinstance(ft.get(m), (int, float)) for _, ft in val):
            rows.append([escape(m), *(f"{fmt(b.get(m))} → {fmt(ft.get(m))}" for b, ft in val)])
    extra = {
        "epsilon": [r.get("epsilon") for r in reports],
        "worst forgetting ratio": [r.get("finetuned", {}).get("forgetting", {}).get("ratio") for r in reports],
    }
    for name, values in extra.items():
        if any(v is not None for v in values):
            rows.append([name, *map(fmt, values)])
    rows.append(["status", *(escape(run.status()) for run in runs)])  # "killed" when its process is gone
    rows.append(
        [
            "seconds",
            *(
                fmt(round(i["finished"] - i["started"], 1)) if i.get("finished") and i.get("started") else "-"
                for i in infos
            ),
        ]
    )
    return rows


def check_out(out: Path, overwrite: bool) -> None:
    """Where `tunesmith compare --out` may write: never into a run directory (its files are the contract
    between commands), never over a file without --overwrite, and only into a folder that exists."""
    from tunesmith.errors import UserError

    target = Path(out).expanduser().resolve()
    for folder in target.parents:
        if (folder / "config.yaml").is_file():
            raise UserError(f"--out {out}: inside the run directory {folder}; write the page elsewhere")
    if target.is_dir():
        raise UserError(f"--out {out}: a directory; name an HTML file")
    if not target.parent.is_dir():
        raise UserError(f"--out {out}: the folder {target.parent} is missing")
    if target.exists() and not overwrite:
        raise UserError(f"--out {out}: the file exists", hint="Pass --overwrite to replace it.")


def compare(run_paths: list, out, title: str | None = None) -> str:
    Path(out).write_text(compare_html(run_paths, title), encoding="utf-8")
    return str(out)


def compare_html(run_paths: list, title: str | None = None) -> str:
    runs = [RunDir.open(p) for p in run_paths]
    names = [run.path.name for run in runs]
    html = "\n".join(
        [
            f"<!doctype html><html><head><meta charset='utf-8'><title>tunesmith: compare</title><style>{STYLE}</style>"
            f"</head><body><h1>{escape(title or f'Compare {len(runs)} runs')}</h1>",
            overlay({run.path.name: series(read_records(run)) for run in runs}),
            "<h2>Validation metrics (base → fine-tuned)</h2>",
            table(["", *map(escape, names)], numbers(runs)),
            "</body></html>",
        ]
    )
    return html
