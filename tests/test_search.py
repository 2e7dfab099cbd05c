"""Hyperparameter search (tunesmith search) on the tiny Llama, and few-shot sampling (data.train_limit)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter

import optuna
import pytest
from _cli import cli_argv, invoke_cli, run_cli
from conftest import write_config

from tunesmith.config import config_from_dict
from tunesmith.data.formats import Example
from tunesmith.data.split import sample_k
from tunesmith.errors import UserError
from tunesmith.search.run import search, search_dir

# -- the search space ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "space, message",
    [
        ({"train.lrr": {"log_uniform": [1e-5, 1e-3]}}, "unknown config key(s) ['train.lrr']"),
        ({"nosuch.section.key": {"choice": [1]}}, "unknown config key"),
        ({"peft.r": {"choice": []}}, "choice needs at least one value"),
        ({"train.lr": {"uniform": [1e-3, 1e-5]}}, "low < high"),
        ({"train.lr": {"log_uniform": [0, 1e-3]}}, "log_uniform needs low > 0"),
        ({"train.lr": {"uniform": [1e-5, 1e-3], "choice": [1e-4]}}, "exactly one of"),
        ({"train.lr": {"gaussian": [0, 1]}}, "unknown key"),
        ({}, "at least one key"),
    ],
)
def test_bad_search_spaces_are_clear_config_errors(tiny_config, space, message):
    tiny_config["search"] = {"space": space}
    with pytest.raises(UserError) as err:
        config_from_dict(tiny_config)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "space",
    [
        {"train.lr": {"uniform": [1e-5, float("inf")]}},
        {"train.lr": {"log_uniform": [float("nan"), 1e-3]}},
        {"train.warmup_ratio": {"uniform": [float("-inf"), 0.1]}},
    ],
)
def test_search_bounds_refuse_inf_and_nan_like_every_other_section(tiny_config, space):
    # Optuna would draw from [1e-5, inf) without complaint; every other section refuses inf/nan (Strict)
    tiny_config["search"] = {"space": space}
    with pytest.raises(UserError) as err:
        config_from_dict(tiny_config)
    assert "finite number" in str(err.value)


def test_search_space_parses_every_kind_and_metric_direction(tiny_config):
    tiny_config["search"] = {
        "space": {
            "train.lr": {"log_uniform": [1e-5, 1e-3]},
            "peft.r": {"int": [2, 8]},
            "train.warmup_ratio": {"uniform": [0.0, 0.2]},
            "train.batch_size": {"choice": [2, 4]},
            "privacy.noise_multiplier": {"uniform": [0.5, 1.5]},
        }
    }
    cfg = config_from_dict(tiny_config)
    assert [d.kind for d in cfg.search.space.values()] == ["log_uniform", "integer", "uniform", "choice", "uniform"]
    assert cfg.search.objective("eval_loss") == ("loss", "minimize")
    assert cfg.search.objective("eval_accuracy") == ("accuracy", "maximize")


def test_search_without_a_search_block_is_refused(tiny_config):
    with pytest.raises(UserError, match="no search: block"):
        search(config_from_dict(tiny_config), 2)


# -- running a study -------------------------------------------------------------------------------------


def search_config(tiny_config) -> dict:
    tiny_config["train"].update(max_steps=8, schedule="constant")
    tiny_config["eval"].update(every=2, samples=0, before_after=False, max_rows=4, generate_rows=2, max_new_tokens=2)
    # lr from "barely moves" to "learns": the loss separates trials early, which the pruner needs.
    tiny_config["search"] = {
        "space": {"train.lr": {"log_uniform": [1e-5, 5e-2]}},
        "startup_trials": 2,
        "heartbeat_s": 1,
    }
    return tiny_config


def test_study_prunes_records_and_writes_the_best_config(tiny_config, tmp_path):
    cfg = config_from_dict(search_config(tiny_config))
    study = search(cfg, trials=6)
    states = Counter(t.state for t in study.trials)
    assert len(study.trials) == 6
    assert states[optuna.trial.TrialState.PRUNED] >= 1, states  # the median pruner stopped a trial
    assert states[optuna.trial.TrialState.COMPLETE] >= 2
    folder = search_dir(cfg)
    best = study.best_trial
    # The best trial's run directory holds its final validation loss: the value the study recorded.
    report = json.loads((folder / "trials" / f"tiny-t{best.number:03d}" / "eval.json").read_text())
    assert report["finetuned"]["validation"]["loss"] == pytest.approx(best.value)
    assert best.value == min(t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE)
    best_cfg = config_from_dict(__import__("yaml").safe_load((folder / "best.yaml").read_text()))
    assert best_cfg.train.lr == pytest.approx(best.params["train.lr"]) and best_cfg.search is None
    table = (folder / "trials.md").read_text()
    assert "pruned" in table and "complete" in table and table.count("\n| ") == 6
    assert (folder / "history.png").stat().st_size > 1000 and (folder / "importance.png").stat().st_size > 1000
    page = (folder / "compare.html").read_text()  # every trial's curves on one page, pruned ones too
    assert all(f"<th>tiny-t{n:03d}</th>" in page for n in range(6)) and "pruned" in page


def test_a_failed_trial_is_recorded_failed_and_the_study_goes_on(tiny_config, monkeypatch):
    cfg = config_from_dict(search_config(tiny_config))
    from types import SimpleNamespace

    from tunesmith import recipes

    real, calls = recipes.recipe_for(cfg).train, {"n": 0}

    def train(tcfg, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise UserError("this trial's settings do not fit")
        return real(tcfg, **kw)

    # search asks recipe_for for each trial's recipe: the seam where a trial can be made to fail
    monkeypatch.setattr(recipes, "recipe_for", lambda tcfg: SimpleNamespace(train=train))
    study = search(cfg, trials=3)
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.FAIL) == 1 and len(states) == 3
    assert study.best_trial.state == optuna.trial.TrialState.COMPLETE
    assert "do not fit" in study.trials[1].user_attrs["error"]


def test_a_killed_search_continues_the_same_study(tiny_config, tmp_path):
    config = search_config(tiny_config)
    # Trials long enough that the kill lands mid-training on a slow machine too (8 steps could finish
    # between two polls, leaving a finished run whose result the study never heard).
    config["train"]["max_steps"] = 60
    config["eval"]["every"] = 20
    path = write_config(tmp_path, config)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cli_argv("search", path, "--trials", "5"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
    )
    folder = tmp_path / "runs" / "tiny-search"
    deadline = time.time() + 120
    while time.time() < deadline:  # kill -9 while the second trial trains
        if (folder / "trials" / "tiny-t001" / "metrics.jsonl").exists():
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_run = folder / "trials" / "tiny-t001" / "run.json"
    assert json.loads(killed_run.read_text())["status"] == "running"  # the kill landed while it trained
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{folder.resolve() / 'study.db'}")
    before = len(study.trials)
    assert before == 2 and study.trials[1].state == optuna.trial.TrialState.RUNNING
    time.sleep(3.5)  # past the heartbeat grace period: the killed trial counts as failed
    res = run_cli("search", path, "--trials", "5", env=env)
    assert res.returncode == 0, res.stderr
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{folder.resolve() / 'study.db'}")
    numbers = [t.number for t in study.trials]
    # The study grew from where it was: the killed trial is kept (failed) and counts toward the 5.
    assert numbers == [0, 1, 2, 3, 4]
    assert study.trials[1].state == optuna.trial.TrialState.FAIL
    # Its run directory says so too (runs and compare pages read it), instead of "running" forever.
    assert json.loads(killed_run.read_text())["status"] == "killed"
    assert all(t.state != optuna.trial.TrialState.RUNNING for t in study.trials)
    assert "2 trials finished, running up to 5" in " ".join(res.stderr.split())
    # The re-run proposes new values: a sampler restarted from the same seed would repeat trials 0 and 1.
    lrs = [t.params["train.lr"] for t in study.trials]
    assert len(set(lrs)) == 5, lrs


# -- few-shot sampling -------------------------------------------------------------------------------------


def _labelled(counts: dict[str, int]) -> list[Example]:
    return [
        Example(f"f:{lab}{i}", f"{lab}{i}", text=f"{lab} {i}", label=lab) for lab, n in counts.items() for i in range(n)
    ]


def test_k_shot_sampling_is_stratified_deterministic_and_covers_every_label():
    rows = _labelled({"neg": 300, "pos": 600, "neu": 100})
    picked = sample_k(rows, 100, seed=3, stratify=True)
    assert Counter(e.label for e in picked) == {"neg": 30, "pos": 60, "neu": 10}
    assert [e.id for e in sample_k(rows, 100, 3, True)] == [e.id for e in picked]
    assert [e.id for e in sample_k(rows, 100, 4, True)] != [e.id for e in picked]
    tiny = sample_k(rows, 4, seed=0, stratify=True)  # neu's share is 0.4: still one of each label
    assert len(tiny) == 4 and set(Counter(e.label for e in tiny)) == {"neg", "pos", "neu"}
    assert len(sample_k(rows, 5000, 0, True)) == 1000


def test_train_limit_keeps_validation_unchanged_and_is_reported(tiny_config):
    from tunesmith.data.prepare import load_examples

    full = load_examples(config_from_dict(tiny_config))
    tiny_config["data"]["train_limit"] = 8
    few = load_examples(config_from_dict(tiny_config))
    assert len(few.splits["train"]) == 8
    assert [e.id for e in few.splits["validation"]] == [e.id for e in full.splits["validation"]]
    assert few.report["train_limit"] == {"k": 8, "from": 48, "kept": 8, "sample_seed": 0}


# -- learning curve ------------------------------------------------------------------------------------------


def test_curve_trains_each_size_and_seed_and_writes_table_and_plot(tiny_config, tmp_path):
    from tunesmith.search.curve import curve, parse_sizes

    tiny_config["train"].update(max_steps=3)
    tiny_config["eval"].update(samples=0, max_rows=4, generate_rows=2, max_new_tokens=2)
    result = curve(config_from_dict(tiny_config), parse_sizes("4,16,all"), [0, 1], metric="loss")
    assert [(p["size"], p["seed"]) for p in result["points"]] == [
        (4, 0),
        (4, 1),
        (16, 0),
        (16, 1),
        ("all", 0),
        ("all", 1),
    ]
    assert [s["rows"] for s in result["summary"]] == [4, 16, 48]
    first = result["summary"][0]
    values = [p["loss"] for p in result["points"][:2]]
    assert first["mean"] == pytest.approx(sum(values) / 2) and first["runs"] == 2
    assert len(result["baselines"]) == 1  # the base model, evaluated once
    folder = tmp_path / "runs" / "tiny-curve"
    assert (folder / "curve.png").stat().st_size > 1000 and "| all | 48 | 2 |" in (folder / "curve.md").read_text()
    runs = sorted(p.name for p in (folder / "runs").iterdir())
    assert runs == ["tiny-k16-s0", "tiny-k16-s1", "tiny-k4-s0", "tiny-k4-s1", "tiny-kall-s0", "tiny-kall-s1"]


def test_curve_cli_writes_its_table_plot_and_runs(tiny_config, tmp_path):
    """`tunesmith curve CFG --sizes 8,all`: one run per size, each point is its run's validation loss (the
    default metric, from train.early_stopping.metric), the base model evaluated once, files as documented."""
    tiny_config["train"].update(max_steps=2)
    tiny_config["eval"].update(samples=0, max_rows=4, generate_rows=1, max_new_tokens=1)
    assert invoke_cli("curve", write_config(tmp_path, tiny_config), "--sizes", "8,all").returncode == 0
    folder = tmp_path / "runs" / "tiny-curve"
    result = json.loads((folder / "curve.json").read_text())
    assert result["metric"] == "loss"
    assert [(p["size"], p["rows"], p["seed"]) for p in result["points"]] == [(8, 8, 0), ("all", 48, 0)]
    for point in result["points"]:
        report = json.loads((folder / "runs" / f"tiny-k{point['size']}-s0" / "eval.json").read_text())
        assert point["loss"] == report["finetuned"]["validation"]["loss"]
        assert ("base" in report) == (point["size"] == 8)  # the base model is evaluated by the first run only
    base = json.loads((folder / "runs" / "tiny-k8-s0" / "eval.json").read_text())["base"]["validation"]["loss"]
    assert list(result["baselines"].values()) == [base]
    assert [(s["size"], s["runs"], s["std"]) for s in result["summary"]] == [(8, 1, 0.0), ("all", 1, 0.0)]
    table = (folder / "curve.md").read_text()
    assert "| 8 | 8 | 1 |" in table and "| all | 48 | 1 |" in table and f"loss {base:.2f}" in table
    assert (folder / "curve.png").read_bytes().startswith(b"\x89PNG") and (folder / "curve.png").stat().st_size > 1000
    assert sorted(p.name for p in (folder / "runs").iterdir()) == ["tiny-k8-s0", "tiny-kall-s0"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--sizes", "8,0"], "--sizes takes positive integers"),
        (["--seeds", "0"], "--seeds must be at least 1"),
        (["--sizes", "8", "--metric", "nosuch"], "'nosuch' is not a validation metric"),
    ],
)
def test_curve_cli_refuses_bad_arguments(tiny_config, tmp_path, args, message):
    tiny_config["train"].update(max_steps=1)
    tiny_config["eval"].update(samples=0, max_rows=2, generate_rows=1, max_new_tokens=1, before_after=False)
    res = invoke_cli("curve", write_config(tmp_path, tiny_config), *args)
    assert res.returncode == 2
    assert message in " ".join(res.stderr.split())


def test_curve_sizes_are_checked():
    from tunesmith.search.curve import parse_sizes

    assert parse_sizes("8, 32,all") == [8, 32, None]
    for bad in ("0", "-4", "ten", ""):
        with pytest.raises(UserError):
            parse_sizes(bad)
