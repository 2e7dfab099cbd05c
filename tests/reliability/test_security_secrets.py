"""RELIABILITY.md S5: secrets never persist in output, logs or the run directory; the byte grep
finds a canary written on purpose (the control)."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import yaml
from _security import base_config, cli, refused, write_data
from conftest import instruction_rows, write_config, write_jsonl

# --------------------------------------------------------------------------------------------------
# S5 Secrets never persist
# --------------------------------------------------------------------------------------------------


def canary(prefix: str = "hf_CANARY") -> str:
    rng = random.SystemRandom()
    return prefix + "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(30))


def grep_bytes(needles: list[bytes], blobs: dict[str, bytes]) -> list[str]:
    return [f"{where}: {n.decode()}" for where, blob in blobs.items() for n in needles if n in blob]


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def test_s5_canaries_never_reach_output_logs_or_the_run_directory(tmp_path, tiny_llama):
    c_env, c_flag, c_field, c_url, c_err, c_drift = (canary() for _ in range(6))
    c_row = canary("ROWCANARY")  # not secret-shaped: redaction cannot hide a leak of row text
    rows = instruction_rows(48)
    rows.append({"instruction": "reverse the words " + " ".join([c_row] * 60), "output": "x"})  # overlength: dropped
    rows.append({"instruction": c_row, "output": [c_row]})  # wrong type: a bad row, skipped
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    with open(tmp_path / "data" / "train.jsonl", "a") as f:
        f.write('{"instruction": "' + c_row + '", "output": \n')  # malformed JSON: a bad row, skipped
    write_jsonl(tmp_path / "data" / "val.jsonl", instruction_rows(12, seed=1))
    cfg = base_config(tiny_llama, max_steps=2, save_every=1)
    cfg["data"].update(prompt=f"Answer briefly. {c_field}", on_error="skip", max_bad_fraction=0.2)
    cfg["eval"].update(samples=1, before_after=True)
    # A credential inside a URL field: a shared Optuna database (train keeps it in the resolved config).
    cfg["search"] = {
        "space": {"train.lr": {"log_uniform": [1e-4, 1e-2]}},
        "storage": f"postgresql://optuna:{c_url}@db.example.org/studies",
    }
    write_config(tmp_path, cfg)
    env = {"HF_TOKEN": c_env}

    results = {
        "train": cli("train", "config.yaml", f"data.system_prompt=Be terse. {c_flag}", cwd=tmp_path, env=env),
        "data check": cli(
            "data", "check", "config.yaml", f"data.system_prompt=Be terse. {c_flag}", cwd=tmp_path, env=env
        ),
        "bad override key": cli("train", "config.yaml", f"data.{c_err}=1", cwd=tmp_path, env=env),
        "bad override": cli("train", "config.yaml", c_err, cwd=tmp_path, env=env),
        "drift": cli(
            "train", "config.yaml", f"data.system_prompt=Be terse. {c_drift}", "--resume", cwd=tmp_path, env=env
        ),
    }
    assert results["train"].returncode == 0, results["train"].stderr[-3000:]
    assert results["data check"].returncode == 0, results["data check"].stderr[-3000:]
    refused(results["bad override key"], "unknown key")
    refused(results["bad override"], "expected dotted.key=value")
    refused(results["drift"], "configuration changed", "data.system_prompt")

    run = tmp_path / "runs" / "tiny"
    blobs = {
        f"{name} {stream}": getattr(res, stream).encode()
        for name, res in results.items()
        for stream in ("stdout", "stderr")
    }
    blobs.update(files_under(run))
    assert any("checkpoints/step-2/" in k for k in blobs) and any(k.endswith("metrics.jsonl") for k in blobs)
    secrets_ = [c_env, c_flag, c_field, c_url, c_err, c_drift]
    needles = [c.encode() for c in secrets_ + [c_row]] + [c[len("hf_CANARY") :].encode() for c in secrets_]
    needles += [c_row[len("ROWCANARY") :].encode(), b"CANARY"]
    assert grep_bytes(needles, blobs) == []

    # the values did reach tunesmith: redacted in place, not silently dropped
    snap = yaml.safe_load((run / "config.yaml").read_text())
    assert snap["data"]["system_prompt"] == "Be terse. <redacted>"
    assert snap["data"]["prompt"] == "Answer briefly. <redacted>"
    assert snap["search"]["storage"] == "postgresql://<redacted>@db.example.org/studies"
    report = json.loads((run / "data_report.json").read_text())
    assert report["bad_rows"] == {"malformed_json": 1, "wrong_type": 1}
    assert report["tokens"]["train"]["dropped_overlength"] == 1
    assert "<redacted>" in results["drift"].stderr


def test_s5_control_the_grep_finds_a_canary_written_on_purpose(tmp_path):
    c, row = canary(), canary("ROWCANARY")
    (tmp_path / "runs" / "ckpt").mkdir(parents=True)
    (tmp_path / "runs" / "ckpt" / "blob.bin").write_bytes(b"\x00\x01" + c.encode() + b"\xff")
    (tmp_path / "runs" / "log.txt").write_text(f"row text: {row}\n")
    blobs = files_under(tmp_path / "runs")
    hits = grep_bytes([c.encode(), row.encode(), b"CANARY"], blobs)
    assert len(hits) == 4 and any("blob.bin" in h for h in hits) and any("log.txt" in h for h in hits), hits
    assert grep_bytes([canary().encode()], blobs) == []  # a different canary is not found


def test_s5_resume_with_the_same_secret_bearing_config_is_not_drift(tmp_path, tiny_llama):
    write_data(tmp_path)
    cfg = base_config(tiny_llama, max_steps=1, save_every=1)
    cfg["data"]["system_prompt"] = f"Be terse. {canary()}"
    write_config(tmp_path, cfg)
    first = cli("train", "config.yaml", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    again = cli("train", "config.yaml", "--resume", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
