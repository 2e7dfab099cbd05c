"""`tunesmith ui` over HTTP (Starlette's test client) on a tiny finished run: pages, live stream, security
(token, cross-site requests, paths), bad input, and launching/stopping/resuming a real `tunesmith train`."""

from __future__ import annotations

import json
import shutil
import socket
import time

import pytest
from _cli import invoke_cli, run_cli
from conftest import instruction_rows, write_config, write_jsonl

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from tunesmith.report.numbers import fmt  # noqa: E402
from tunesmith.ui.app import create_app  # noqa: E402
from tunesmith.ui.guard import Access  # noqa: E402

LOCAL = "http://127.0.0.1:7860"


def tiny_cfg(tmp, tiny_llama, name="tiny", steps=8) -> dict:
    train = write_jsonl(tmp / "data" / "train.jsonl", instruction_rows(48))
    val = write_jsonl(tmp / "data" / "val.jsonl", instruction_rows(12, seed=1))
    return {
        "name": name,
        "output_dir": str(tmp / "runs"),
        "model": {"name": str(tiny_llama)},
        "peft": {"method": "lora", "r": 4, "dropout": 0.0},
        "data": {"train": str(train), "validation": str(val), "format": "instruction", "max_length": 128},
        "train": {"max_steps": steps, "lr": 1e-2, "batch_size": 4, "warmup_ratio": 0.0},
        "eval": {"every": 4, "batch_size": 8, "max_new_tokens": 4, "samples": 2},
    }


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory, tiny_llama):
    tmp = tmp_path_factory.mktemp("ui")
    for name in ("tiny", "tiny-b"):
        res = run_cli("train", write_config(tmp, tiny_cfg(tmp, tiny_llama, name)))
        assert res.returncode == 0, res.stderr
    return tmp / "runs"


def client(root, host="127.0.0.1", token=None) -> tuple[TestClient, Access]:
    access = Access(host, 7860, token)
    base = f"http://{host}:7860"
    return TestClient(create_app(root, access), base_url=base, follow_redirects=False), access


def post(c, access, url, body, **headers):
    return c.post(url, json=body, headers={"X-Tunesmith-CSRF": access.csrf, "Origin": LOCAL, **headers})


def test_runs_page_lists_each_run_with_its_metric(runs_root):
    c, _ = client(runs_root)
    page = c.get("/")
    assert page.status_code == 200
    assert 'href="/runs/tiny"' in page.text and 'href="/runs/tiny-b"' in page.text
    report = json.loads((runs_root / "tiny" / "eval.json").read_text())
    assert f"<td>{fmt(report['finetuned']['validation']['rougeL'])}</td>" in page.text  # the task metric
    assert "finished" in page.text
    assert "/runs/tiny-b" not in c.get("/?status=running").text  # the filter


def test_run_page_shows_verdict_curves_data_tables_and_escaped_samples(runs_root, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(runs_root / "tiny", root / "tiny")
    report = json.loads((root / "tiny" / "eval.json").read_text())
    report["samples"][0]["finetuned"] = "<script>alert(1)</script>"
    (root / "tiny" / "eval.json").write_text(json.dumps(report))
    page = client(root)[0].get("/runs/tiny").text
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert 'id="verdict"' in page and "rougeL" in page
    curves = json.loads(page.split('id="curves-data">')[1].split("</script>")[0])
    assert len(curves["train loss"][0]) == 8 and "validation loss" in curves
    assert "<h3>Token lengths</h3>" in page and "<h3>Rows</h3>" in page
    histogram = json.loads(page.split('id="histogram-data">')[1].split("</script>")[0])
    assert sum(histogram["train"][1]) == json.loads((root / "tiny" / "data_report.json").read_text())["rows"]["train"]


def test_a_damaged_metrics_line_is_skipped_and_the_pages_render(runs_root, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(runs_root / "tiny", root / "tiny")
    shutil.copytree(runs_root / "tiny-b", root / "tiny-b")
    with open(root / "tiny" / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "loss": 1.2, "ti')  # a run killed mid-write
    c = client(root)[0]
    page = c.get("/runs/tiny")
    assert page.status_code == 200 and "train loss" in page.text
    assert c.get("/compare?run=tiny&run=tiny-b").status_code == 200


def test_compare_shows_both_runs(runs_root):
    page = client(runs_root)[0].get("/compare?run=tiny&run=tiny-b")
    assert page.status_code == 200
    assert "<th>tiny</th>" in page.text and "<th>tiny-b</th>" in page.text and "data:image/png" in page.text


def test_a_finished_run_stream_says_it_ended(runs_root):
    body = client(runs_root)[0].get("/runs/tiny/events").text
    assert "event: end" in body and '"status": "finished"' in body


def test_try_it_streams_what_tunesmith_generate_answers_for_both_models(runs_root, tmp_path):
    c, access = client(runs_root)
    assert 'id="try-text"' in c.get("/runs/tiny").text and 'id="try-base"' in c.get("/runs/tiny").text
    prompt = "one two three"
    for which, extra in (("base", ["--base"]), ("finetuned", [])):
        res = post(c, access, "/runs/tiny/try", {"text": prompt, "model": which})
        assert res.status_code == 200 and res.headers["content-type"].startswith("text/plain")
        cli = run_cli("generate", runs_root / "tiny", "--prompt", prompt, "--max-new-tokens", "128", *extra)
        assert cli.returncode == 0 and res.text.strip() == cli.stdout.strip(), which
    dashed = post(c, access, "/runs/tiny/try", {"text": "--help", "model": "base"})  # a text, not an option
    cli = run_cli("generate", runs_root / "tiny", "--prompt=--help", "--max-new-tokens", "128", "--base")
    assert dashed.status_code == 200 and dashed.text.strip() == cli.stdout.strip() and "Usage" not in dashed.text
    for body in ({"text": "  ", "model": "base"}, {"text": "x" * 5000}, {"text": "hi", "model": "other"}, ["hi"]):
        assert post(c, access, "/runs/tiny/try", body).status_code == 400, body
    # the command's error reaches the page, after the marker the page shows in red
    root = tmp_path / "runs"
    shutil.copytree(runs_root / "tiny", root / "tiny")
    (root / "tiny" / "adapter" / "adapter_model.safetensors").write_bytes(b"not weights")
    c, access = client(root)
    res = post(c, access, "/runs/tiny/try", {"text": prompt})
    assert res.status_code == 200 and "\n\u241eerror:" in res.text and "safetensors" in res.text


def test_off_loopback_every_request_needs_the_token(runs_root):
    c, _ = client(runs_root, host="10.1.2.3", token="s3cret")
    assert c.get("/").status_code == 401
    assert c.get("/?token=wrong").status_code == 401
    first = c.get("/?token=s3cret")
    assert first.status_code == 303 and "token" not in first.headers["location"]  # the URL loses it
    assert c.get("/").status_code == 200  # the cookie from then on
    assert (
        TestClient(c.app, base_url="http://10.1.2.3:7860")
        .get("/", headers={"Authorization": "Bearer s3cret"})
        .status_code
        == 200
    )


def test_loopback_refuses_other_host_names(runs_root):
    c, _ = client(runs_root)
    assert c.get("/", headers={"host": "attacker.example:7860"}).status_code == 421


def test_cross_site_posts_are_refused(runs_root):
    c, access = client(runs_root)
    assert post(c, access, "/api/validate", {"yaml": "name: x"}).status_code == 200
    assert post(c, access, "/api/validate", {"yaml": "name: x"}, Origin="http://evil.example").status_code == 403
    assert post(c, access, "/api/validate", {"yaml": ""}, **{"Sec-Fetch-Site": "cross-site"}).status_code == 403
    no_token = c.post("/api/validate", json={"yaml": ""}, headers={"Origin": LOCAL})
    assert no_token.status_code == 403
    assert post(c, access, "/runs/tiny/stop", {}, **{"X-Tunesmith-CSRF": "guess"}).status_code == 403


def test_paths_outside_the_runs_folder_are_refused(runs_root, tmp_path):
    outside = tmp_path / "elsewhere"
    shutil.copytree(runs_root / "tiny", outside)
    root = tmp_path / "runs"
    root.mkdir()
    (root / "link").symlink_to(outside)
    c = client(root)[0]
    for url in ("/runs/link", "/runs/..%2Felsewhere", "/runs/%2Fetc", "/runs/%2E%2E", "/compare?run=link&run=link"):
        assert c.get(url).status_code == 404, url
    assert c.get("/new?source=..%2Felsewhere").status_code == 404


def test_a_config_with_three_errors_shows_each_with_its_path_and_does_not_launch(runs_root, tmp_path):
    c, access = client(tmp_path)
    data = write_jsonl(tmp_path / "train.jsonl", instruction_rows(8))
    bad = (
        f"name: bad-run\ndata: {{train: {data}}}\ntrain:\n  lr: -1\n  batch_size: 0\npeft:\n  method: lora\n  r: zero\n"
    )
    out = post(c, access, "/api/validate", {"yaml": bad}).json()
    assert not out["ok"] and len(out["problems"]) == 3
    assert {p.split(":")[0] for p in out["problems"]} == {"train.lr", "train.batch_size", "peft.r"}
    refused = post(c, access, "/api/launch", {"yaml": bad})
    assert refused.status_code == 422 and not (tmp_path / "bad-run").exists()


def test_the_data_preview_shows_first_rows_and_the_report_before_anything_runs(tmp_path, tiny_llama):
    import yaml

    (tmp_path / "runs").mkdir()
    c, access = client(tmp_path / "runs")
    cfg = tiny_cfg(tmp_path, tiny_llama, "peek")
    out = post(c, access, "/api/preview", {"yaml": yaml.safe_dump(cfg)}).json()
    assert out["ok"], out
    first = instruction_rows(48)[0]
    assert out["rows"]["train"][0]["completion"] == first["output"] and len(out["rows"]["train"]) == 5
    assert first["input"] in out["rows"]["train"][0]["prompt"][-1]["content"]
    sections = {title: rows for title, _, rows in out["sections"]}
    assert ["train", 48] in sections["Rows"] and "Token lengths" in sections
    assert not (tmp_path / "runs" / "peek").exists() and not list((tmp_path / "runs" / ".ui").glob("*.yaml"))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "x", "output": "y"}, "{oops", {"nothing": 1}])
    out = post(c, access, "/api/preview", {"yaml": yaml.safe_dump({**cfg, "data": {**cfg["data"], "train": str(bad)}})})
    assert not out.json()["ok"] and f"{bad}:2" in out.json()["error"] and f"{bad}:3" in out.json()["error"]


def test_the_form_starts_from_an_example_config_and_only_a_listed_one(runs_root, tmp_path):
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "tiny-example.yaml").write_text("name: from-example\ntrain: {lr: 0.001}\n")
    (tmp_path / "secret.yaml").write_text("token: hunter2\n")
    c = TestClient(create_app(runs_root, Access("127.0.0.1", 7860, None), tmp_path / "examples"), base_url=LOCAL)
    page = c.get("/new").text
    assert "<option >tiny-example.yaml</option>" in page
    assert "name: from-example" in c.get("/new?example=tiny-example.yaml").text
    for name in ("../secret.yaml", "secret.yaml", "%2Fetc%2Fpasswd"):
        assert c.get(f"/new?example={name}").status_code == 404, name


def test_key_help_comes_from_the_schema(runs_root):
    keys = {k["key"]: k for k in client(runs_root)[0].get("/api/keys").json()}
    assert "train.lr" in keys and keys["train.lr"]["help"]


def wait_for(check, timeout=180.0, every=0.5):
    end = time.time() + timeout
    while time.time() < end:
        if check():
            return True
        time.sleep(every)
    return False


def test_launch_stop_and_resume_a_real_run(tmp_path, tiny_llama):
    import yaml

    root = tmp_path / "runs"
    root.mkdir()
    cfg = tiny_cfg(tmp_path, tiny_llama, "live", steps=120)
    cfg["train"]["save_every"] = 10
    cfg["eval"]["every"] = 100
    c, access = client(root)
    res = post(c, access, "/api/launch", {"yaml": yaml.safe_dump(cfg)})
    assert res.status_code == 200, res.text
    run = root / "live"
    assert wait_for(lambda: any((run / "checkpoints").glob("step-*")) if (run / "checkpoints").exists() else False)
    assert "running" in c.get("/runs/live").text
    assert post(c, access, "/runs/live/stop", {}).status_code == 200
    assert wait_for(lambda: json.loads((run / "run.json").read_text()).get("status") == "interrupted", 60)
    assert post(c, access, "/runs/live/resume", {}).status_code == 200
    assert wait_for(lambda: json.loads((run / "run.json").read_text()).get("status") == "finished", 300)
    assert json.loads((run / "run.json").read_text())["steps"] == cfg["train"]["max_steps"]
    assert 'id="verdict"' in c.get("/runs/live").text


def test_the_command_refuses_a_missing_folder_and_a_busy_port(tmp_path):
    res = invoke_cli("ui", "--runs", tmp_path / "nope")
    assert res.returncode == 2 and "no such folder" in res.stderr + res.stdout
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = invoke_cli("ui", "--runs", tmp_path, "--port", port)
    assert res.returncode == 2 and "cannot listen" in res.stderr + res.stdout
    assert "Traceback" not in res.stderr + res.stdout


def test_search_and_curve_pages_show_what_the_commands_wrote(tmp_path, tiny_llama):
    """A real two-trial search and a two-point learning curve on the tiny model, then their pages."""
    from tunesmith.config import config_from_dict
    from tunesmith.search.curve import curve, parse_sizes
    from tunesmith.search.run import search

    tree = tiny_cfg(tmp_path, tiny_llama, "study", steps=3)
    tree["eval"].update(every=None, samples=0, before_after=False, max_rows=4, generate_rows=2, max_new_tokens=2)
    tree["search"] = {"space": {"train.lr": {"log_uniform": [1e-4, 1e-2]}}, "metric": "loss"}
    study = search(config_from_dict(tree), trials=2)
    result = curve(config_from_dict({**tree, "search": None}), parse_sizes("8,all"), [0], metric="loss")
    c, _ = client(tmp_path / "runs")
    listing = c.get("/").text
    assert 'href="/search/study-search"' in listing and 'href="/curve/study-curve"' in listing
    page = c.get("/search/study-search").text
    assert page.count('<tr class="trial">') == 2
    for t in study.trials:  # each trial's value as the table prints it (4 significant digits)
        assert f"<td>{t.value:.4g}</td>" in page
    assert '<img src="/search/study-search/history.png"' in page and "best.yaml" in page
    image = c.get("/search/study-search/history.png")
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    page = c.get("/curve/study-curve").text
    assert page.count("<tr><td>") == len(result["summary"]) and '<td class="l">base</td>' in page
    assert f"<td>{fmt(result['summary'][-1]['mean'])}</td>" in page
    assert c.get("/curve/study-curve/curve.png").content.startswith(b"\x89PNG")
    for url in ("/search/study-search/study.db", "/search/study-curve", "/curve/..%2Fx", "/search/nope"):
        assert c.get(url).status_code == 404, url
