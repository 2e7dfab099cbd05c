"""The run report (report.html) and `tunesmith runs`, on a tiny run; a headless-Chromium check that the
page renders offline (skipped, with the reason, where Chromium is not installed)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest
from _cli import run_cli
from conftest import write_config

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_llama):
    from conftest import instruction_rows, write_jsonl

    tmp = tmp_path_factory.mktemp("report")
    train = write_jsonl(tmp / "train.jsonl", instruction_rows(48))
    val = write_jsonl(tmp / "val.jsonl", instruction_rows(12, seed=1))
    cfg = {
        "name": "tiny",
        "output_dir": str(tmp / "runs"),
        "model": {"name": str(tiny_llama)},
        "peft": {"method": "lora", "r": 4, "dropout": 0.0},
        "data": {
            "train": str(train),
            "validation": str(val),
            "format": "instruction",
            "max_length": 128,
            "overlength": "drop",
        },
        "train": {"max_steps": 8, "lr": 1e-2, "batch_size": 4, "warmup_ratio": 0.0},
        "eval": {"every": 4, "batch_size": 8, "max_new_tokens": 4, "samples": 2},
    }
    res = run_cli("train", write_config(tmp, cfg))
    assert res.returncode == 0, res.stderr
    return tmp / "runs" / "tiny"


def test_a_finished_run_writes_a_self_contained_report(finished_run):
    html = (finished_run / "report.html").read_text()
    assert "<h2>Before / after (held-out data)</h2>" in html and "validation" in html
    assert len(re.findall(r'<img alt="chart" src="data:image/png;base64,', html)) >= 1
    assert not re.search(r'(src|href)="(https?:)?//', html)  # nothing fetched: it opens offline
    assert "<script" not in html.lower()
    report = json.loads((finished_run / "eval.json").read_text())
    assert f"{report['finetuned']['validation']['loss']:.4f}" in html


def test_text_from_data_and_models_is_escaped(finished_run, tmp_path):
    from tunesmith.report.html import build
    from tunesmith.rundir import RunDir

    copy = tmp_path / "tiny"
    shutil.copytree(finished_run, copy)
    report = json.loads((copy / "eval.json").read_text())
    report["samples"][0]["finetuned"] = "<script>alert(1)</script><img src=x onerror=alert(2)>"
    (copy / "eval.json").write_text(json.dumps(report))
    html = build(RunDir(copy))
    assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<img src=x" not in html


def test_runs_lists_each_run_with_its_metric(finished_run):
    res = run_cli("runs", finished_run.parent, env={**os.environ, "COLUMNS": "200"})
    assert res.returncode == 0, res.stderr
    line = next(x for x in res.stdout.splitlines() + res.stderr.splitlines() if "│ tiny" in x)
    assert "finished" in line and "rougeL" in line  # an instruction run's headline metric


def render_in_chromium(page, tmp_path) -> str:
    """Loads the page in headless Chromium: no console errors, and a screenshot in which a chart was
    drawn. Returns the DOM."""
    from PIL import Image

    url = page.resolve().as_uri()
    common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files"]
    dom = subprocess.run(
        [*common, "--enable-logging=stderr", "--v=0", "--dump-dom", url], capture_output=True, text=True, timeout=120
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "Uncaught" not in dom.stderr and "CONSOLE" not in dom.stderr  # no console errors
    shot = tmp_path / f"{page.stem}.png"
    res = subprocess.run(
        [*common, f"--screenshot={shot}", "--window-size=1100,1600", url], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    colours = Image.open(shot).convert("RGB").getcolors(maxcolors=1_000_000) or []
    # Text alone is black on white; matplotlib's default blue line means a chart was drawn.
    assert len(colours) > 50
    assert any(abs(r - 31) < 12 and abs(g - 119) < 12 and abs(b - 180) < 12 for _, (r, g, b) in colours)
    return dom.stdout


@pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium); .ci/run installs it where it can"
)
def test_report_renders_in_headless_chromium_with_its_charts(finished_run, tmp_path):
    dom = render_in_chromium(finished_run / "report.html", tmp_path)
    assert "Before / after" in dom and dom.count("<table") >= 2


def test_compare_overlays_runs_and_renders(finished_run, tmp_path):
    from tunesmith.report.compare import PANELS
    from tunesmith.report.html import read_records, series
    from tunesmith.rundir import RunDir

    second = tmp_path / "runs" / "tiny2"
    shutil.copytree(finished_run, second)
    # The second run as a DP run with a retention set: epsilon by step, forgetting at each evaluation.
    records = [json.loads(x) for x in (second / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        if "loss" in r and "step" in r:
            r["epsilon"] = 0.5 * r["step"]
        if isinstance(r.get("eval"), dict):
            r["eval"]["forgetting_ratio"] = 1.0 + 0.01 * r["step"]
    (second / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    report = json.loads((second / "eval.json").read_text())
    report.update(epsilon=3.25, finetuned={**report["finetuned"], "forgetting": {"ratio": 1.0825}})
    (second / "eval.json").write_text(json.dumps(report))
    found = series(read_records(RunDir(second)))
    assert found["epsilon"][-1] == (8, 4.0) and {"forgetting ratio", "validation loss"} <= set(found) <= set(PANELS) | {
        "learning rate"
    }
    assert "epsilon" not in series(read_records(RunDir(finished_run)))
    out = tmp_path / "compare.html"
    res = run_cli("compare", finished_run, second, "--out", out)
    assert res.returncode == 0, res.stderr
    html = out.read_text()
    assert html.count('src="data:image/png;base64,') == 1 and "<th>tiny</th><th>tiny2</th>" in html
    assert "<tr><td>epsilon</td><td>-</td><td>3.2500</td></tr>" in html
    assert "<tr><td>worst forgetting ratio</td><td>-</td><td>1.0825</td></tr>" in html
    loss = json.loads((finished_run / "eval.json").read_text())["finetuned"]["validation"]["loss"]
    assert f"→ {loss:.4f}</td>" in html  # base -> fine-tuned, side by side
    one = run_cli("compare", finished_run)
    assert one.returncode == 2 and "at least two" in one.stderr
    if CHROMIUM:  # where Chromium is missing, the skipped report test above says so
        dom = render_in_chromium(out, tmp_path)
        assert "Validation metrics" in dom and dom.count("<tr>") >= 5
