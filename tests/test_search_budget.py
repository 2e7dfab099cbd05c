"""`tunesmith search CONFIG --budget`: a wall-clock budget across trials, on the tiny Llama."""

from __future__ import annotations

import datetime as dt
import json

import optuna
import pytest
import yaml
from _cli import main_in_process
from conftest import write_config

from tunesmith.errors import UserError
from tunesmith.search.budget import Clock, parse_budget


def budget_config(tiny_config, max_steps: int = 4) -> dict:
    tiny_config["train"].update(max_steps=max_steps, schedule="constant")
    tiny_config["eval"].update(samples=0, before_after=False, max_rows=2, generate_rows=1, max_new_tokens=2)
    tiny_config["search"] = {"space": {"train.lr": {"log_uniform": [1e-4, 5e-2]}}, "heartbeat_s": 1}
    return tiny_config


def load_study(tmp_path) -> optuna.Study:
    folder = tmp_path / "runs" / "tiny-search"
    return optuna.load_study(study_name="tiny", storage=f"sqlite:///{folder.resolve() / 'study.db'}")


def outputs(tmp_path) -> tuple[str, dict]:
    folder = tmp_path / "runs" / "tiny-search"
    return (folder / "trials.md").read_text(), yaml.safe_load((folder / "study.yaml").read_text())["budget"]


def err_text(capsys) -> str:
    return " ".join(capsys.readouterr().err.split())


def quick_probe(monkeypatch, estimate_s: float = 1.0) -> None:
    """Tests of what happens after the check replace the probe by a fixed estimate: on a loaded machine a
    real probe's seconds vary, and only its own test needs them."""
    from tunesmith.search import budget

    monkeypatch.setattr(
        budget,
        "probe",
        lambda cfg, folder: {
            "steps": 3,
            "seconds": estimate_s,
            "step_s": 0.0,
            "planned_steps": 4,
            "estimate_s": estimate_s,
        },
    )


# -- parsing and the rule for the next trial -------------------------------------------------------------


@pytest.mark.parametrize(
    "text, seconds", [("90s", 90), ("45m", 2700), ("1.5h", 5400), ("2h30m", 9000), ("1h2m3s", 3723), (" 10M ", 600)]
)
def test_budget_durations_parse(text, seconds):
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("text", ["45", "", "m", "-5m", "45 minutes", "30m2h", "0m", "0h0s", "1.5.0h"])
def test_bad_budget_durations_are_refused(text):
    with pytest.raises(UserError):
        parse_budget(text)


def _study_with_complete_trials(*seconds: float) -> optuna.Study:
    study = optuna.create_study()
    for s in seconds:
        t = optuna.trial.create_trial(value=1.0)
        t.datetime_start = dt.datetime(2025, 1, 1)
        t.datetime_complete = t.datetime_start + dt.timedelta(seconds=s)
        study.add_trial(t)
    return study


def test_the_next_trial_starts_only_when_the_mean_complete_trial_fits_the_time_left():
    study = _study_with_complete_trials(10, 20)
    clock = Clock(study, shared=False, budget=100.0)
    clock.carried = 80.0  # 20 s left, the mean trial takes 15 s
    assert clock.next_fits() and clock.estimate == 15.0 and clock.ended is None
    clock.carried = 90.0  # 10 s left
    assert not clock.next_fits()
    assert "next trial (~15.0s, mean of 2 complete trial(s)) would not fit in the 10.0s left" in clock.ended
    clock.carried = 100.2
    assert not clock.next_fits() and clock.ended.startswith("the budget is spent (1m40s used)")
    clock.carried = 90.0
    clock.save()  # the time spent is the study's: a re-run carries it on
    assert Clock(study, shared=False, budget=100.0).carried == pytest.approx(90.0, abs=0.5)
    assert Clock(study, shared=True, budget=100.0).carried == 0.0  # a shared study's workers start afresh


# -- the command ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "budget, message",
    [("soon", "--budget 'soon' is not a duration"), ("0s", "leaves no time for a trial"), ("45", "is not a duration")],
)
def test_an_unparsable_budget_exits_2_before_anything_runs(tiny_config, tmp_path, capsys, budget, message):
    path = write_config(tmp_path, budget_config(tiny_config))
    assert main_in_process("search", path, "--budget", budget) == 2
    assert message in err_text(capsys)
    assert not (tmp_path / "runs").exists()  # no study, no probe, no trial


def test_a_budget_shorter_than_the_probed_trial_exits_2_before_any_trial(tiny_config, tmp_path, capsys):
    """5000 planned steps cannot fit in 15 s: the 3-step probe measures the seconds per step."""
    path = write_config(tmp_path, budget_config(tiny_config, max_steps=5000))
    assert main_in_process("search", path, "--budget", "15s", "--trials", "3") == 2
    err = err_text(capsys)
    assert "--budget 15.0s cannot fit one trial" in err and "5000 planned steps" in err and "timed probe" in err
    assert len(load_study(tmp_path).trials) == 0 and not (tmp_path / "runs" / "tiny-search" / "trials").exists()
    probe = tmp_path / "runs" / "tiny-search" / "probe" / "tiny-probe"
    assert json.loads((probe / "run.json").read_text())["steps"] == 3  # the probe, not a trial


def test_a_budget_that_fits_runs_and_a_rerun_counts_the_time_spent(tiny_config, tmp_path, capsys):
    path = write_config(tmp_path, budget_config(tiny_config))
    assert main_in_process("search", path, "--budget", "10m", "--trials", "1") == 0
    table, budget = outputs(tmp_path)
    study = load_study(tmp_path)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE]
    assert budget["budget_s"] == 600 and 0 < budget["used_s"] < 600 and budget["earlier_runs_s"] == 0
    assert budget["ended"] == "--trials 1 reached" and budget["trials"] == {"complete": 1}
    assert budget["probe"]["planned_steps"] == 4 and budget["trial_estimate_s"] > 0
    assert "Budget 10m00s: used" in table and "No further trial started: --trials 1 reached." in table
    spent = study.user_attrs["search_seconds"]
    assert spent == pytest.approx(budget["used_s"], abs=1.0)
    # A re-run goes on with the time the study has spent (no probe: the complete trials are the estimate).
    assert main_in_process("search", path, "--budget", "10m", "--trials", "2") == 0
    _, again = outputs(tmp_path)
    assert again["earlier_runs_s"] == pytest.approx(spent, abs=0.2) and again["used_s"] > spent
    assert again["probe"] is None and again["estimate_from"].startswith("mean of")
    # The study's shortest complete trial is the floor now: a budget under it cannot fit one trial.
    capsys.readouterr()
    assert main_in_process("search", path, "--budget", "0.1s", "--trials", "9") == 2
    assert "cannot fit one trial: the shortest complete trial of study 'tiny' took" in err_text(capsys)
    assert len(load_study(tmp_path).trials) == 2


def test_a_budget_stops_the_search_before_the_trials_are_reached(tiny_config, tmp_path, monkeypatch):
    quick_probe(monkeypatch)
    path = write_config(tmp_path, budget_config(tiny_config))
    assert main_in_process("search", path, "--budget", "20s", "--trials", "100") == 0
    table, budget = outputs(tmp_path)
    study = load_study(tmp_path)
    assert 1 <= len(study.trials) < 100 and sum(budget["trials"].values()) == len(study.trials)
    # The last trial either left too little time for another or was stopped at the deadline.
    assert ("would not fit in the" in budget["ended"]) or budget["ended"].startswith("the budget is spent")
    # It stopped because the time left could not hold another trial, by the deadline plus at most one
    # optimizer step, checkpoint and evaluation (generous: this machine's load varies).
    # Both numbers are rounded to 0.1 s in budget.json, and a tiny trial takes ~0.3 s: allow the rounding.
    assert 20 - budget["used_s"] < budget["trial_estimate_s"] + 0.1 and budget["used_s"] < 20 + 15
    assert f"No further trial started: {budget['ended']}." in table


def test_a_trial_training_at_the_deadline_is_stopped_and_never_counted_finished(tiny_config, tmp_path, monkeypatch):
    """The config as written trains 4 steps (the probe's estimate fits), but the search space makes every
    trial 20000 steps: the deadline falls inside trial 0, which commits a checkpoint and is recorded pruned."""
    quick_probe(monkeypatch)
    config = budget_config(tiny_config)
    config["train"]["save_every"] = 10_000
    config["search"]["space"]["train.max_steps"] = {"choice": [20_000]}
    path = write_config(tmp_path, config)
    assert main_in_process("search", path, "--budget", "8s", "--trials", "5") == 0
    study = load_study(tmp_path)
    assert len(study.trials) == 1
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED and trial.user_attrs["stopped"] == "deadline"
    with pytest.raises(ValueError):
        _ = study.best_trial  # no complete trial: nothing is reported as best
    run = tmp_path / "runs" / "tiny-search" / "trials" / "tiny-t000"
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "interrupted" and 0 < info["step"] < 20_000  # stopped as SIGTERM stops a run
    assert (run / "checkpoints" / f"step-{info['step']}").is_dir()
    assert not (tmp_path / "runs" / "tiny-search" / "best.yaml").exists()
    table, budget = outputs(tmp_path)
    assert "| 0 | pruned (deadline) |" in table and budget["trials"] == {"pruned at the deadline": 1}
    assert 8 <= budget["used_s"] < 8 + 15
    # Run again: the study's budget is spent, so no trial starts (the outputs are written again).
    assert main_in_process("search", path, "--budget", "8s", "--trials", "5") == 0
    _, again = outputs(tmp_path)
    assert len(load_study(tmp_path).trials) == 1 and again["ended"].startswith("the budget is spent")
    assert again["earlier_runs_s"] == pytest.approx(budget["used_s"], abs=0.2)
