"""Helpers shared by the security tests (RELIABILITY.md section 4): the CLI in a subprocess with a
clean environment, the refusal check, and one finished tiny run whose copies tests tamper with."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from _cli import run_cli
from conftest import instruction_rows, write_config, write_jsonl

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src"
PKG = SRC / "tunesmith"


def _env(extra: dict | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    for key, value in (extra or {}).items():
        if value is None:
            env.pop(key, None)  # None: make sure the child does not inherit it
        else:
            env[key] = value
    return env


def cli(*args, cwd=None, env=None, timeout=600) -> subprocess.CompletedProcess:
    """`tunesmith <args>` in a fresh process with `_env(env)`."""
    return run_cli(*args, cwd=cwd, env=_env(env), timeout=timeout)


def flat(text: str) -> str:
    """Console output wrapped by rich, joined back: whitespace runs become one space."""
    return re.sub(r"\s+", " ", text)


def refused(res: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 2, our `error:` line, no traceback, and every needle in stderr."""
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert "error:" in res.stderr and "Traceback" not in res.stderr, res.stderr[-3000:]
    for needle in needles:
        assert needle in res.stderr, (needle, res.stderr[-3000:])


def base_config(model: Path, **train) -> dict:
    """Relative data and output paths: a copy of the directory is a complete, independent run."""
    return {
        "name": "tiny",
        "output_dir": "runs",
        "seed": 0,
        "model": {"name": str(model)},
        "peft": {"method": "lora", "r": 4, "dropout": 0.0},
        "data": {
            "train": "data/train.jsonl",
            "validation": "data/val.jsonl",
            "format": "instruction",
            "max_length": 128,
            "overlength": "drop",
        },
        "train": {"max_steps": 4, "lr": 1e-2, "batch_size": 4, "warmup_ratio": 0.0, **train},
        "eval": {"batch_size": 8, "max_new_tokens": 4, "samples": 0, "before_after": False, "generate_rows": 1},
    }


def write_data(root: Path) -> None:
    write_jsonl(root / "data" / "train.jsonl", instruction_rows(48))
    write_jsonl(root / "data" / "val.jsonl", instruction_rows(12, seed=1))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama) -> Path:
    """One finished 4-step run with checkpoints step-2 and step-4; tests tamper with copies of it."""
    root = tmp_path_factory.mktemp("trained")
    write_data(root)
    write_config(root, base_config(tiny_llama, save_every=2))
    res = cli("train", "config.yaml", cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in (root / "runs/tiny/checkpoints").iterdir()) == ["step-2", "step-4"]
    return root


@pytest.fixture
def work(trained, tmp_path) -> Path:
    w = tmp_path / "w"
    shutil.copytree(trained, w, symlinks=True)
    return w


def newest(work: Path) -> Path:
    return work / "runs/tiny/checkpoints/step-4"


def fix_manifest(ckpt: Path, name: str) -> None:
    """Make the manifest agree with a tampered file, so only a later check can catch it."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"][name] = hashlib.sha256((ckpt / name).read_bytes()).hexdigest()
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
