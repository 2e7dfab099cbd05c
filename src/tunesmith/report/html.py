"""`tunesmith report RUN`: one self-contained HTML page per run (also written when a run finishes).

Everything is inside the file: plots are PNGs (matplotlib) embedded as data URIs, there are no
scripts, fonts or stylesheets to fetch, so the page opens offline. Every text that comes from data
or from a model (samples, config values, labels) is HTML-escaped: a row or an output saying
"<script>" is shown, never run.
"""

from __future__ import annotations

import base64
import io
import json
import platform
import time
from html import escape

from tunesmith.report.numbers import change, fmt, stage_rows, verdict_rows
from tunesmith.rundir import RunDir

STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
td:first-child,th:first-child,td.l{text-align:left}th{background:#f3f3f3}.good{color:#1a7f37}.bad{color:#c62828}
pre{background:#f7f7f7;padding:1em;overflow:auto;max-height:28em}img{max-width:100%}h2{margin-top:1.6em}"""


def png(fig) -> str:
    """A matplotlib figure as an <img> with the PNG inside (a data URI): the page needs no other file."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return f'<img alt="chart" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def read_records(run: RunDir) -> list[dict]:
    """metrics.jsonl's records; a damaged line (a run killed mid-write) is skipped, so the page still renders."""
    path = run / "metrics.jsonl"
    out = []
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return [r for r in out if isinstance(r, dict)]


def series(records: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """Every curve a run logged, as (step, value) points: losses, lr, and when present epsilon,
    forgetting and the validation task metric."""
    steps = [r for r in records if "loss" in r and "step" in r]
    evals = [r for r in records if isinstance(r.get("eval"), dict) and not r.get("final")]

    def of(rows, get):
        return [(r["step"], get(r)) for r in rows if isinstance(get(r), (int, float))]

    out = {
        "train loss": of(steps, lambda r: r["loss"]),
        "validation loss": of(evals, lambda r: r["eval"].get("loss")),
        "learning rate": of(steps, lambda r: r.get("lr")),
        "epsilon": of(steps, lambda r: r.get("epsilon")),
        "forgetting ratio": of(evals, lambda r: r["eval"].get("forgetting_ratio")),
    }
    for metric in ("accuracy", "rougeL", "bleu4", "coverage", "perplexity"):
        out[f"validation {metric}"] = of(evals, lambda r, m=metric: r["eval"].get(m))
    return {name: points for name, points in out.items() if points}


def curves(records: list[dict]) -> list[str]:
    """Training loss and lr by step; validation metrics, forgetting and epsilon when logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = series(records)
    out = []
    if "train loss" in found:
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.4))
        a.plot(*zip(*found.pop("train loss")), label="train loss")
        if "validation loss" in found:
            a.plot(*zip(*found.pop("validation loss")), "o-", label="validation loss")
        a.set_xlabel("step")
        a.legend()
        b.plot(*zip(*found.pop("learning rate", [(0, 0)])), color="tab:green")
        b.set_xlabel("step")
        b.set_ylabel("learning rate")
        fig.tight_layout()
        out.append(png(fig))
    for name, points in found.items():
        fig, ax = plt.subplots(figsize=(5.5, 3))
        ax.plot(*zip(*points), "o-")
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        fig.tight_layout()
        out.append(png(fig))
    return out


def table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def verdict(report: dict) -> str:
    rows = []
    for split, metric, b, f, higher in verdict_rows(report):
        moved = change(b, f, higher)
        cls = "good" if moved.endswith("✓") else "bad" if moved.endswith("✗") else ""
        rows.append([escape(split), escape(metric), fmt(b), fmt(f), f'<span class="{cls}">{moved}</span>'])
    base = report.get("base", {})
    note = f"<p>base: {escape(base['note'])}</p>" if "note" in base else ""
    return table(["split", "metric", "base", "fine-tuned", "change"], rows) + note


def samples(report: dict) -> str:
    rows = [
        [f'<span class="l">{escape(str(s.get(k))[:600])}</span>' for k in ("prompt", "base", "finetuned", "reference")]
        for s in report.get("samples", [])
    ]
    return table(["prompt", "base", "fine-tuned", "reference"], rows) if rows else "<p>No samples.</p>"


def confusion(report: dict) -> str:
    cm = report.get("finetuned", {}).get("validation", {}).get("confusion_matrix")
    if not cm:
        return ""
    rows = [[escape(lab), *row] for lab, row in zip(cm["labels"], cm["matrix"])]
    return "<h2>Confusion matrix (validation; rows: truth)</h2>" + table(["", *map(escape, cm["labels"])], rows)


def build(run: RunDir) -> str:
    report, info = run.read_json("eval.json", {}), run.read_json("run.json", {})
    title = escape(run.path.name)
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>tunesmith: {title}</title>",
        f"<style>{STYLE}</style></head><body><h1>Run {title}</h1>",
        run_table(report, info),
        "<h2>Before / after (held-out data)</h2>",
        verdict(report),
        *privacy_section(report),
        *audit_section(report),
        *stages_section(report),
        "<h2>Curves</h2>",
        *curves(read_records(run)),
        confusion(report),
        "<h2>Sample outputs</h2>",
        samples(report),
        "<h2>Data report</h2>",
        f"<pre>{escape(json.dumps(run.read_json('data_report.json', {}), indent=2))}</pre>",
        "<h2>Resolved config</h2>",
        f"<pre>{escape((run / 'config.yaml').read_text() if (run / 'config.yaml').exists() else '')}</pre>",
        f"<p>Written {time.strftime('%Y-%m-%d %H:%M:%S')} by tunesmith report.</p></body></html>",
    ]
    return "\n".join(parts)


def run_table(report: dict, info: dict) -> str:
    """The run at a glance: task, status, steps, wall time, device and machine."""
    started, finished = info.get("started"), info.get("finished")
    took = f"{finished - started:.0f} s" if started and finished else "-"
    row = [
        escape(str(report.get("task", info.get("task")))),
        escape(str(info.get("status"))),
        escape(str(info.get("steps"))),
        took,
        escape(str(info.get("device"))),
        escape(f"{platform.machine()}, {platform.python_version()}"),
    ]
    return table(["task", "status", "steps", "wall time", "device", "machine"], [row])


def privacy_section(report: dict) -> list[str]:
    privacy = report.get("privacy")
    if not privacy:
        return []
    row = [
        escape(str(privacy.get("guarantee"))),
        fmt(privacy.get("epsilon")),
        f"{privacy.get('delta'):.3g}",
        fmt(privacy.get("noise_multiplier")),
        fmt(privacy.get("sample_rate")),
        privacy.get("steps"),
    ]
    return ["<h2>Privacy</h2>", table(["guarantee", "epsilon", "delta", "noise", "sample rate", "steps"], [row])]


def audit_section(report: dict) -> list[str]:
    if not report.get("audit"):
        return []
    return ["<h2>Canary exposure (bits)</h2>", f"<pre>{escape(json.dumps(report['audit'], indent=2))}</pre>"]


def stages_section(report: dict) -> list[str]:
    if not report.get("stages"):
        return []
    header, body = stage_rows(report["stages"])
    return [
        "<h2>Stages: the final task's metrics after each stage</h2>",
        table(header, [[escape(stage), escape(task), *map(fmt, numbers)] for stage, task, *numbers in body]),
    ]


def write_report(run_path) -> str:
    run = RunDir.open(run_path)
    run.write_text("report.html", build(run))
    return str(run / "report.html")
