"""Splits, leakage and label checks: the split seed, relabelled text, label conflicts, unseen labels,
validation emptied by overlap, one-label and imbalanced classifiers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import instruction_rows, write_jsonl
from tunesmith.config import config_from_dict
from tunesmith.data.prepare import load_examples
from tunesmith.errors import DataError

SECRET = "SECRETLABEL"


def cfg_of(train: Path, fmt: str = "instruction", seed: int = 0, train_section: dict | None = None, **data):
    return config_from_dict({"seed": seed, "train": train_section or {"batch_size": 2},
                             "data": {"train": str(train), "format": fmt, **data}})


def labelled(n: int, labels: tuple[str, ...] = ("neg", "pos"), prefix: str = "t") -> list[dict]:
    return [{"text": f"{prefix} text {i}", "label": labels[i % len(labels)]} for i in range(n)]


# --- #1: the split has its own seed; a learning curve keeps validation fixed -------------------------------


def test_split_seed_fixes_validation_across_run_seeds(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", instruction_rows(40))
    val = [[e.id for e in load_examples(cfg_of(path, seed=s, split_seed=7)).splits["validation"]] for s in range(3)]
    assert val[0] == val[1] == val[2]
    assert load_examples(cfg_of(path, seed=7)).report["split"].endswith("(seed 7)")
    # Unset, it follows the run's seed (as before).
    assert [e.id for e in load_examples(cfg_of(path, seed=7)).splits["validation"]] == val[0]
    assert [e.id for e in load_examples(cfg_of(path, seed=1)).splits["validation"]] != val[0]


def test_curve_points_score_the_same_validation_rows(tmp_path):
    from tunesmith.search.curve import run_config

    path = write_jsonl(tmp_path / "train.jsonl", instruction_rows(60))
    cfg = cfg_of(path, seed=3)  # no validation file: it is split off train
    seen = []
    for size in (8, None):
        for seed in (0, 1, 2):
            rcfg = run_config(cfg, tmp_path / "curve", size, seed, with_base=False)
            ex = load_examples(rcfg)
            seen.append([e.id for e in ex.splits["validation"]])
            assert rcfg.seed == seed and rcfg.data.sample_seed == seed
    assert len(seen[0]) == 6 and all(ids == seen[0] for ids in seen)
    # ... and the split is the one of the config's own seed.
    assert [e.id for e in load_examples(cfg).splits["validation"]] == seen[0]
