"""Experiment trackers read back (TensorBoard event files, an MLflow store), and the live warnings."""

from __future__ import annotations

import json

import pytest

from tunesmith.config import config_from_dict
from tunesmith.recipes import causal_lm
from tunesmith.training.watch import Watch


def _steps(run_dir) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_tensorboard_and_mlflow_receive_what_metrics_jsonl_has(tiny_config):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tiny_config["log"] = {"trackers": ["tensorboard", "mlflow"]}
    tiny_config["eval"].update(every=3)
    run = causal_lm.train(config_from_dict(tiny_config), overwrite=True)
    logged = _steps(run.path)
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]

    events = EventAccumulator(str(next((run.path / "trackers").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    tb = {e.step: e.value for e in events.Scalars("loss")}
    assert sorted(tb) == [1, 2, 3, 4, 5, 6]
    assert all(tb[r["step"]] == pytest.approx(r["loss"], rel=1e-6) for r in logged)
    assert [e.step for e in events.Scalars("eval/loss")][:1] == [3]

    client = MlflowClient(tracking_uri=f"sqlite:///{(run.path / 'trackers' / 'mlflow.db').resolve()}")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert len(runs) == 1 and runs[0].data.params["train.lr"] == "0.01"
    history = {m.step: m.value for m in client.get_metric_history(runs[0].info.run_id, "loss")}
    assert all(history[r["step"]] == pytest.approx(r["loss"], rel=1e-6) for r in logged)


def test_no_tracker_writes_no_tracker_files(tiny_config):
    run = causal_lm.train(config_from_dict(tiny_config), overwrite=True)
    assert not (run.path / "trackers").exists()


def test_overfitting_warning_on_a_deliberately_overfitting_run(tiny_config, tmp_path):
    from conftest import instruction_rows, write_jsonl

    # 4 rows with arbitrary answers, learned by heart at a high rate: nothing carries over to validation.
    rows = [
        {**r, "output": f"{'seven three one' if i % 2 else 'two eight'} #{i}"}
        for i, r in enumerate(instruction_rows(4))
    ]
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    tiny_config["train"].update(max_steps=60, lr=5e-2, batch_size=4, schedule="constant")
    tiny_config["peft"]["r"] = 8
    tiny_config["eval"].update(every=5, samples=0, before_after=False, generate_rows=1, max_new_tokens=2)
    tiny_config["data"]["dedup"] = False
    run = causal_lm.train(config_from_dict(tiny_config), overwrite=True)
    records = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    warnings = [r["warning"] for r in records if "warning" in r]
    assert any("overfitting" in w for w in warnings), [r.get("eval", {}).get("loss") for r in records if "eval" in r]
    assert sum("overfitting" in w for w in warnings) == 1  # said once


def test_watch_flags_only_what_it_should():
    w = Watch(total_steps=100)
    assert all(w.step(i, 2.0 - i / 100) is None for i in range(1, 101))  # a falling loss is not flat
    for step, val in ((10, 1.5), (20, 1.4), (30, 1.3)):
        assert w.evaluated(step, val) is None  # validation falling with training: fine
    flat = Watch(total_steps=100)
    said = [m for i in range(1, 101) if (m := flat.step(i, 2.0))]
    assert len(said) == 1 and "flat" in said[0]
    over = Watch(total_steps=100)
    for i in range(1, 31):
        over.step(i, 2.0 - i / 20)
        if i % 10 == 0:
            message = over.evaluated(i, 1.0 + i / 100)
    assert message is not None and "overfitting" in message


def test_log_lines_carry_the_eta_and_the_last_evaluation(monkeypatch, capsys):
    from tunesmith.training import progress

    clock = iter([100.0, 130.0, 160.0])  # start, then two reads: 10 steps take 30 s
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    bar = progress.TrainProgress(total=100, start=0)
    assert bar.progress.disable  # pytest's stderr is not a terminal: log lines instead of a bar
    bar.eval(10, {"loss": 0.5, "accuracy": 81.25, "forgetting_ratio": 1.05})
    bar.step(10, loss=0.7, lr=1e-4, grad_norm=1.5, tokens_per_s=900.0, epsilon=2.5)
    line = capsys.readouterr().err.splitlines()[-1]
    assert line.startswith("step 10/100: loss 0.7000 lr 1.00e-04 gnorm 1.50 eps 2.5 900 tok/s")
    assert "| val loss 0.5 accuracy 81.25 forgetting_ratio 1.05" in line and line.endswith("eta 4m30s")
    assert bar.eta(100, 100) == ""
