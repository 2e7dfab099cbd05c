"""RELIABILITY.md S6: canary exposure on a tiny model, without DP (the control that shows the audit
detects memorisation), with sample-level DP and with user-level DP at epsilon 8."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from _cli import run_cli
from conftest import write_config, write_jsonl

from tunesmith.privacy import canaries as cn


def test_exposure_by_interpolation_against_hand_computed_ranks():
    refs = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    exp = cn.exposures({1: np.array([0.5, 4.5, 9.0])}, refs)[1]
    # ranks 1, 5 and 9 among 8 references: log2(8) - log2(rank)
    assert exp.tolist() == pytest.approx([3.0, 3.0 - np.log2(5), 3.0 - np.log2(9)])


def test_secrets_are_distinct_and_canary_rows_fit_each_format():
    from tunesmith.config import DataConfig
    from tunesmith.data.formats import to_example

    inserted, refs = cn.draw([1, 4], 3, 100, seed=0)
    everything = [s for v in inserted.values() for s in v] + refs
    assert len(set(everything)) == len(everything) == 106 and all(len(s) == 6 for s in everything)
    for fmt in ("text", "instruction", "prompt_completion", "chat", "summarization", "concepts"):
        dcfg = DataConfig(train="x.jsonl", format=fmt)
        ex = to_example("t:1", cn.canary_row(dcfg, cn.secret_text("123456"), 0), dcfg, None)
        assert "1 2 3 4 5 6" in (ex.completion or ex.text)


@pytest.fixture
def text_run(tmp_path, tiny_llama):
    rng = random.Random(0)
    words = "the quick brown fox jumps over lazy dog one two three four five six seven".split()
    rows = [{"text": " ".join(rng.choice(words) for _ in range(rng.randint(4, 9)))} for _ in range(200)]
    cfg = {
        "name": "base",
        "output_dir": str(tmp_path / "runs"),
        "model": {"name": str(tiny_llama)},
        "peft": {"method": "full"},
        "data": {
            "train": str(write_jsonl(tmp_path / "train.jsonl", rows)),
            "format": "text",
            "max_length": 64,
            "overlength": "drop",
        },
        "train": {"epochs": 10, "lr": 1e-2, "batch_size": 16, "warmup_ratio": 0.0, "log_every": 50},
        "eval": {"batch_size": 64, "samples": 0, "before_after": False},
    }
    run = tmp_path / "runs" / "base"
    run.mkdir(parents=True)
    write_config(tmp_path, cfg).replace(run / "config.yaml")  # the audit reads only the run's config
    return run


def test_canary_exposure_without_dp_with_sample_and_user_level_dp(text_run):
    run = text_run
    res = run_cli("audit", run, "--canaries")
    assert res.returncode == 0, res.stderr
    result = json.loads((run / "audit.json").read_text())
    mean = {name: {int(r): x["mean"] for r, x in v["exposure"].items()} for name, v in result["variants"].items()}
    assert result["references"] == 10_000 and len(result["variants"]["no_dp"]["exposure"]["16"]["values"]) == 10
    # Without DP, 16 copies are memorised: the audit can see memorisation (the control).
    assert mean["no_dp"][16] > mean["no_dp"][1] + 5
    # User-level DP at epsilon 8 covers all 16 copies of a secret: at most 2 bits above a single copy.
    assert result["variants"]["dp_user"]["epsilon"] <= 8.0
    assert mean["dp_user"][16] <= mean["dp_user"][1] + 2
    # Sample-level DP bounds one row; 16 rows leak less than without DP, with no 2-bit promise.
    assert mean["dp"][16] < mean["no_dp"][16] - 2
    eval_json = json.loads((run / "eval.json").read_text())
    assert set(eval_json["audit"]) == {"no_dp", "dp", "dp_user"}  # exposure is in the run's report
    assert "Canary exposure" in res.stderr + res.stdout


def test_audit_refuses_a_classifier_run(tmp_path):
    from tunesmith.audit import audit
    from tunesmith.errors import UserError

    run = tmp_path / "runs" / "clf"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("name: clf\ndata: {train: x.jsonl, format: classification}\n")
    with pytest.raises(UserError, match="generative task"):
        audit(str(run), [1], 1, 10)
