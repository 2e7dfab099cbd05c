"""A hub id as `model.name`, with no network: found in a local hub cache (the layout huggingface_hub
writes: models--org--name/snapshots/<commit>/ and refs/main), or refused at once with exit 2.

"Unreachable" is a hub endpoint on a closed local port: every request is refused immediately, so the
time measured is tunesmith's (retries with backoff), not the network's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _cli import run_cli
from conftest import instruction_rows, write_config, write_jsonl

SRC = Path(__file__).resolve().parents[1] / "src"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens there


def fake_hub_cache(cache: Path, model_dir: Path, repo: str = "tiny-org/tiny-llama") -> Path:
    folder = cache / ("models--" + repo.replace("/", "--"))
    shutil.copytree(model_dir, folder / "snapshots" / COMMIT)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(COMMIT)
    return cache


def _env(tmp_path: Path, offline: bool, cache: Path | None = None) -> dict:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TUNESMITH_HOME": str(tmp_path / "ts-home"),
        "HF_HUB_CACHE": str(cache or tmp_path / "empty-cache"),
        "HF_ENDPOINT": UNREACHABLE,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("TRANSFORMERS_OFFLINE", None)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def train(tmp_path: Path, name: str, env: dict) -> subprocess.CompletedProcess:
    write_jsonl(tmp_path / "data" / "train.jsonl", instruction_rows(24))
    write_jsonl(tmp_path / "data" / "val.jsonl", instruction_rows(6, seed=1))
    write_config(
        tmp_path,
        {
            "name": "hub",
            "output_dir": "runs",
            "model": {"name": name},
            "peft": {"method": "lora", "r": 4, "dropout": 0.0},
            "data": {
                "train": "data/train.jsonl",
                "validation": "data/val.jsonl",
                "max_length": 128,
                "overlength": "drop",
            },
            "train": {"max_steps": 1, "batch_size": 4},
            "eval": {"before_after": False, "samples": 0, "generate_rows": 1, "max_new_tokens": 2},
        },
    )
    return run_cli("train", "config.yaml", cwd=tmp_path, env=env, timeout=600)


TIMED = r"""
import json, sys, time
from tunesmith.config import ModelConfig
from tunesmith.errors import UserError
from tunesmith.models import load_tokenizer, resolve
mcfg = ModelConfig(name=sys.argv[1])
start = time.monotonic()
try:
    load_tokenizer(resolve(mcfg), mcfg)
    error = None
except UserError as err:
    error = str(err)
print("RESULT " + json.dumps({"seconds": time.monotonic() - start, "error": error}))
"""


def timed_load(name: str, env: dict) -> dict:
    """Seconds from resolving `name` to its tokenizer (or its error), imports excluded."""
    res = subprocess.run([sys.executable, "-c", TIMED, name], env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in res.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, res.stderr[-3000:]
    return {**json.loads(lines[-1][7:]), "log": res.stderr}


@pytest.mark.parametrize("offline", [True, False], ids=["offline", "hub-unreachable"])
def test_a_hub_id_in_the_local_cache_trains(tmp_path, tiny_llama, offline):
    cache = fake_hub_cache(tmp_path / "hub", tiny_llama)
    res = train(tmp_path, "tiny-org/tiny-llama", _env(tmp_path, offline, cache))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Retrying" not in res.stderr, res.stderr[-3000:]
    assert "Setting accelerator" not in res.stdout + res.stderr  # DeepSpeed is installed, not imported
    assert (tmp_path / "runs" / "hub" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("offline", [True, False], ids=["offline", "hub-unreachable"])
def test_an_unknown_hub_id_fails_at_once_naming_tunesmith_models(tmp_path, offline):
    env = _env(tmp_path, offline)
    timed = timed_load("nosuch-org/nosuch-model", env)
    assert timed["error"] and "tunesmith models" in timed["error"], timed
    assert timed["seconds"] < 5, timed  # huggingface_hub's retries alone take ~25 s (1+2+4+8+8)
    assert "Retrying" not in timed["log"], timed["log"][-3000:]
    res = train(tmp_path, "nosuch-org/nosuch-model", env)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "error: Model not found: nosuch-org/nosuch-model" in res.stderr
    assert "tunesmith models" in res.stderr and "Retrying" not in res.stderr, res.stderr[-3000:]
    assert ("HF_HUB_OFFLINE is set" in res.stderr) == offline, res.stderr[-3000:]


def test_a_mistyped_embedded_name_suggests_the_embedded_one(tmp_path):
    timed = timed_load("smollm2-135m", _env(tmp_path, offline=True))
    assert "Did you mean the embedded 'smollm2-135m-instruct'?" in timed["error"], timed
