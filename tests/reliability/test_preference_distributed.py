"""Preference tuning on two CPU processes (torchrun over gloo) gives the run of one process with the same
global batch: the same step losses, adapter and held-out pair metrics (each rank computes the reference
log-probs of its own copy of the data at setup, from the same base)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _harness import adapter, cli, step_lines  # noqa: E402
from conftest import write_jsonl  # noqa: E402
from test_distributed import torchrun  # noqa: E402
from test_recipe_preference import pairs  # noqa: E402


def test_two_processes_train_the_pairs_like_one(tmp_path, tiny_llama):
    cfg = {
        "name": "two",
        "output_dir": str(tmp_path / "runs"),
        "seed": 0,
        "model": {"name": str(tiny_llama)},
        "peft": {"method": "lora", "r": 4, "dropout": 0.0},  # no dropout: the ranks would draw other masks
        "data": {
            "train": str(write_jsonl(tmp_path / "train.jsonl", pairs(37, 0))),  # the last step is uneven
            "validation": str(write_jsonl(tmp_path / "val.jsonl", pairs(10, 1))),
            "format": "preference",
            "max_length": 128,
        },
        "preference": {"beta": 0.5},
        "train": {"max_steps": 6, "lr": 5e-2, "batch_size": 4, "warmup_ratio": 0.0},
        "eval": {"batch_size": 8, "max_new_tokens": 2, "samples": 0, "generate_rows": 2},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = torchrun(tmp_path, "train", path)
    assert res.returncode == 0, res.stderr[-4000:]
    one = cli("train", path, "name=one", "train.batch_size=8")
    assert one.returncode == 0, one.stderr[-3000:]
    runs = tmp_path / "runs"
    a, b = step_lines(runs / "two"), step_lines(runs / "one")
    assert [r["step"] for r in a] == list(range(1, 7))
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-5)
    got, want = adapter(runs / "two"), adapter(runs / "one")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5)  # summation order across ranks
    metrics = [json.loads((runs / n / "eval.json").read_text())["finetuned"]["validation"] for n in ("two", "one")]
    for key in ("loss", "reward_accuracy", "reward_margin", "preference_accuracy"):
        assert metrics[0][key] == pytest.approx(metrics[1][key], abs=1e-5), key
