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
    return config_from_dict(
        {
            "seed": seed,
            "train": train_section or {"batch_size": 2},
            "data": {"train": str(train), "format": fmt, **data},
        }
    )


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


# --- #10: relabelled text is leakage and a label conflict ---------------------------------------------------


def test_relabelled_validation_text_is_leakage_and_a_conflict(tmp_path, capsys):
    train_rows = labelled(20)
    train = write_jsonl(tmp_path / "train.jsonl", train_rows)
    flipped = {"text": train_rows[3]["text"].upper(), "label": "pos" if train_rows[3]["label"] == "neg" else "neg"}
    val_rows = labelled(4, prefix="v") + [flipped, dict(train_rows[5])]
    val = write_jsonl(tmp_path / "val.jsonl", val_rows)
    ex = load_examples(cfg_of(train, "classification", validation=str(val)))
    assert [e.text for e in ex.splits["validation"]] == [f"v text {i}" for i in range(4)]
    assert ex.report["validation_overlap_removed"] == 2
    assert ex.report["label_conflicts"] == {"validation": {"rows": 1, "where": [f"{val}:5"]}}
    assert any("validation" in w and "label" in w for w in ex.report["warnings"])
    err = capsys.readouterr().err
    assert "warning" in err and f"{val}:5" in err


def test_conflicting_duplicates_inside_train_are_reported(tmp_path, capsys):
    rows = labelled(20)
    rows.insert(7, {"text": rows[2]["text"], "label": "pos" if rows[2]["label"] == "neg" else "neg"})
    rows.append(dict(rows[4]))  # a plain duplicate: dropped, not a conflict
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    val = write_jsonl(tmp_path / "val.jsonl", labelled(4, prefix="v"))
    ex = load_examples(cfg_of(train, "classification", validation=str(val)))
    assert ex.report["train_duplicates"] == {"exact_duplicates": 1, "normalized_duplicates": 0}
    assert ex.report["label_conflicts"] == {"train": {"rows": 2, "where": [f"{train}:3", f"{train}:8"]}}
    assert len(ex.splits["train"]) == 21
    assert f"{train}:3" in capsys.readouterr().err


# --- #8: unseen labels are reported by count and position, never by value -----------------------------------


def test_unseen_label_error_gives_positions_not_label_text(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", labelled(10))
    val = write_jsonl(
        tmp_path / "val.jsonl",
        [
            {"text": "v1", "label": "pos"},
            {"text": "v2", "label": SECRET},
            {"text": "v3", "label": SECRET + "2"},
            {"text": "v4", "label": SECRET},
        ],
    )
    with pytest.raises(DataError) as info:
        load_examples(cfg_of(train, "classification", validation=str(val)))
    err = info.value
    assert SECRET not in str(err)
    assert "3 row(s)" in err.title and "2 label(s)" in err.title
    assert err.problems == [f"{val}:2", f"{val}:3", f"{val}:4"]


# --- hostile input: validation identical to train -------------------------------------------------------------


def test_validation_all_overlap_says_so(tmp_path):
    rows = instruction_rows(12)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    val = write_jsonl(tmp_path / "val.jsonl", rows[:5])
    with pytest.raises(DataError) as info:
        load_examples(cfg_of(train, validation=str(val)))
    assert "validation" in info.value.title
    assert "all 5 rows also appear in train" in info.value.title


# --- hostile input: one label, strong imbalance -----------------------------------------------------------------


def test_single_label_classifier_refused(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": f"t {i}", "label": SECRET} for i in range(20)])
    with pytest.raises(DataError) as info:
        load_examples(cfg_of(train, "classification"))
    assert "one label" in info.value.title and SECRET not in str(info.value)
    # Naming two labels in data.labels does not help: train must show both.
    with pytest.raises(DataError):
        load_examples(cfg_of(train, "classification", labels=[SECRET, "other"]))


def test_strong_imbalance_warns(tmp_path, capsys):
    rows = [{"text": f"t {i}", "label": "neg" if i % 40 else "pos"} for i in range(80)]  # 2 pos of 80
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    val = write_jsonl(tmp_path / "val.jsonl", labelled(4, prefix="v"))
    ex = load_examples(cfg_of(train, "classification", validation=str(val)))
    assert ex.report["warnings"] == ["imbalanced labels: one label is 97.5% of train (78 of 80 rows)"]
    assert "imbalanced labels" in capsys.readouterr().err
    balanced = load_examples(
        cfg_of(write_jsonl(tmp_path / "b.jsonl", labelled(80)), "classification", validation=str(val))
    )
    assert "warnings" not in balanced.report


def test_report_is_json_serialisable(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", labelled(20) + [{"text": "t text 0", "label": "pos"}])
    ex = load_examples(cfg_of(train, "classification"))
    assert json.loads(json.dumps(ex.report))["label_conflicts"]["train"]["rows"] == 2
