"""Forgetting: retention perplexity before, at every evaluation and after; selection under max_increase."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import write_jsonl
from safetensors.torch import load_file

from tunesmith.config import config_from_dict
from tunesmith.errors import ConfigError
from tunesmith.evaluation.forgetting import forgetting, over_limit, worst_ratio
from tunesmith.recipes import building, causal_lm, loop


def test_forgetting_against_hand_computed_values():
    report = forgetting({"wiki": 10.0, "news": 20.0}, {"wiki": 11.0, "news": 19.0})
    assert report == {
        "wiki": {"before": 10.0, "after": 11.0, "ratio": 1.1, "change": 1.0},
        "news": {"before": 20.0, "after": 19.0, "ratio": 0.95, "change": -1.0},
    }
    assert worst_ratio(report) == 1.1
    assert over_limit(1.1, 0.05) and not over_limit(1.04, 0.05) and not over_limit(1.05, 0.05)
    assert over_limit(math.nan, 0.05)  # a diverged model is never within the limit
    assert not over_limit(1.5, None) and not over_limit(None, 0.05)


def test_retention_config_forms_and_errors():
    base = {"data": {"train": "x.jsonl"}}
    sets = [{"name": "wiki", "data": "w.jsonl"}]
    assert config_from_dict({**base, "retention": sets}).retention.sets[0].name == "wiki"  # the list form
    block = config_from_dict({**base, "retention": {"sets": sets, "max_increase": 0.05, "stop_when_exceeded": True}})
    assert block.retention.max_increase == 0.05 and block.retention.stop_when_exceeded
    with pytest.raises(ConfigError, match="need at least one retention set"):
        config_from_dict({**base, "retention": {"max_increase": 0.05}})
    with pytest.raises(ConfigError, match="stop_when_exceeded needs max_increase"):
        config_from_dict({**base, "retention": {"sets": sets, "stop_when_exceeded": True}})
    with pytest.raises(ConfigError):
        config_from_dict({**base, "retention": {"sets": sets, "max_increase": 0}})


@pytest.fixture
def retention_cfg(tmp_path, tiny_config):
    general = write_jsonl(
        tmp_path / "data" / "general.jsonl",
        [{"text": f"plain general text number {i} about weather and towns"} for i in range(12)],
    )
    return {
        **tiny_config,
        "retention": {"sets": [{"name": "general", "data": str(general)}]},
        "eval": {**tiny_config["eval"], "every": 2, "samples": 0},
        "train": {**tiny_config["train"], "lr": 5e-2},
    }


def test_forgetting_is_logged_at_every_evaluation_and_in_eval_json(retention_cfg):
    run = causal_lm.train(config_from_dict(retention_cfg))
    evals = [
        r["eval"]
        for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        if "eval" in r and not r.get("final")
    ]
    assert [e["forgetting"]["general"]["before"] for e in evals]  # steps 2 and 4 (6 is the final eval)
    report = json.loads((run / "eval.json").read_text())
    before = report["base"]["retention"]["general"]["perplexity"]
    after = report["finetuned"]["retention"]["general"]["perplexity"]
    sets = report["finetuned"]["forgetting"]["sets"]["general"]
    assert sets["before"] == pytest.approx(before, rel=1e-6) and sets["after"] == pytest.approx(after, rel=1e-6)
    assert sets["ratio"] == pytest.approx(after / before) and sets["change"] == pytest.approx(after - before)
    assert report["finetuned"]["forgetting"]["ratio"] == pytest.approx(after / before)
    for e in evals:
        assert e["forgetting_ratio"] == pytest.approx(e["forgetting"]["general"]["after"] / before, rel=1e-6)


def _scripted(monkeypatch, losses: dict[int, float], ratios: dict[int, float]):
    """Evaluations report the given loss and forgetting ratio at each step (the selection logic alone)."""
    seen = {"step": 0}
    real_log = loop.RunDir.log

    def log(self, record):
        if "loss" in record and "step" in record:
            seen["step"] = record["step"]
        real_log(self, record)

    monkeypatch.setattr(loop.RunDir, "log", log)
    monkeypatch.setattr(
        causal_lm,
        "train_eval",
        lambda s, split: {"loss": losses[seen["step"]], "forgetting_ratio": ratios[seen["step"]]},
    )


def _trainable_at(run, step: int) -> list[torch.Tensor]:
    tensors = load_file(str(run / "checkpoints" / f"step-{step}" / "trainable.safetensors"))
    return [tensors[k] for k in sorted(tensors)]


def _adapter(run) -> list[torch.Tensor]:
    tensors = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    return [tensors[k] for k in sorted(tensors)]


@pytest.mark.parametrize("limit, best", [(0.05, 2), (None, 6)])
def test_best_checkpoint_is_chosen_among_evaluations_under_the_limit(retention_cfg, monkeypatch, limit, best):
    """Loss improves at every evaluation, but forgetting passes the limit after step 2."""
    _scripted(monkeypatch, losses={2: 3.0, 4: 2.0, 6: 1.0}, ratios={2: 1.01, 4: 1.2, 6: 1.3})
    cfg = {
        **retention_cfg,
        "train": {**retention_cfg["train"], "save_every": 2, "save_total_limit": 5, "early_stopping": {"patience": 10}},
        "retention": {**retention_cfg["retention"], "max_increase": limit},
    }
    run = causal_lm.train(config_from_dict(cfg))
    assert all(torch.equal(a, b) for a, b in zip(_adapter(run), _trainable_at(run, best)))
    assert not all(torch.equal(a, b) for a, b in zip(_adapter(run), _trainable_at(run, 8 - best)))


def test_stop_when_exceeded_stops_at_the_first_evaluation_over_the_limit(retention_cfg, monkeypatch, capsys):
    _scripted(monkeypatch, losses={2: 3.0, 4: 2.0, 6: 1.0}, ratios={2: 1.01, 4: 1.2, 6: 1.3})
    cfg = {
        **retention_cfg,
        "retention": {**retention_cfg["retention"], "max_increase": 0.05, "stop_when_exceeded": True},
    }
    run = causal_lm.train(config_from_dict(cfg))
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == [1, 2, 3, 4]
    assert "forgetting over retention.max_increase at step 4" in capsys.readouterr().err.replace("\n", "")


def test_replay_plan_mixes_the_fraction_into_every_step():
    from tunesmith.training.plan import ReplayPlan

    plan = ReplayPlan(100, 40, 0.2, batch_size=4, grad_accum=2, seed=0)
    assert plan.k == 2  # 8 task rows + 2 replayed = 20% of each step
    for step in range(30):
        rows = plan.step_rows(step)
        replayed = [i for i in rows if i >= 100]
        full = step % plan.steps_per_epoch < plan.steps_per_epoch - 1  # the epoch's last step is short
        assert (len(rows) == 10 or not full) and len(replayed) == 2 and len(set(replayed)) == 2 and max(replayed) < 140
    seen = {i for step in range(30) for i in plan.step_rows(step) if i >= 100}
    assert len(seen) > 20  # the pool is sampled across steps, not the same rows each time
    assert ReplayPlan(100, 40, 0.2, 4, 2, seed=0).step_rows(17) == plan.step_rows(17)  # a pure function of the step
    task = [i for step in range(plan.steps_per_epoch) for i in plan.step_rows(step) if i < 100]
    assert sorted(task) == list(range(100))  # task rows: each once per epoch, as without replay


def test_replay_run_feeds_general_text_and_l2sp_pulls_toward_the_start(retention_cfg, tmp_path, monkeypatch):
    replay = write_jsonl(
        tmp_path / "data" / "replay.jsonl",
        [{"text": f"replayed general sentence {i} on ordinary topics"} for i in range(30)],
    )
    fed = []
    real_build = building.build

    def build(*args, **fns):
        collate = fns["collate"]
        fns["collate"] = lambda rows: (fed.extend(r.id for r in rows), collate(rows))[1]
        return real_build(*args, **fns)

    monkeypatch.setattr(building, "build", build)
    base = {**retention_cfg, "eval": {**retention_cfg["eval"], "every": None}, "peft": {"method": "full"}}
    replay_block = {"data": str(replay), "fraction": 0.2}
    cfg = {**base, "name": "replay", "retention": {**base["retention"], "replay": replay_block}}
    run = causal_lm.train(config_from_dict(cfg))
    replayed = [i for i in fed if "replay.jsonl" in i]
    assert len(replayed) == 6 and len(fed) == 6 * 5  # 1 of every 5 rows fed is replayed text (4 task + 1)
    assert json.loads((run / "data_report.json").read_text())["replay"]["rows"] == 30

    def distance(name: str, l2sp: float) -> float:
        retention = {**base["retention"], "l2sp": l2sp}
        out = causal_lm.train(config_from_dict({**base, "name": name, "retention": retention}))
        from transformers import AutoModelForCausalLM

        tuned = AutoModelForCausalLM.from_pretrained(out / "model")
        start = AutoModelForCausalLM.from_pretrained(retention_cfg["model"]["name"])
        return sum(float((a - b).pow(2).sum()) for a, b in zip(tuned.parameters(), start.parameters()))

    assert distance("l2sp", 50.0) < 0.8 * distance("plain", 0.0)
