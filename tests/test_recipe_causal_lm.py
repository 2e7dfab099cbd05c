"""The causal-LM recipe end to end on a tiny random Llama: artifacts, learning, equivalences, resume."""

from __future__ import annotations

import json

import pytest
import torch
from _cli import run_cli
from conftest import write_config
from safetensors.torch import load_file

from tunesmith.config import config_from_dict
from tunesmith.recipes import causal_lm, fitting


def adapter_tensors(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_train_cli_writes_the_run_directory_and_lowers_validation_loss(tmp_path, tiny_config):
    tiny_config["train"].update(max_steps=24, schedule="constant")
    tiny_config["eval"]["every"] = 12
    res = run_cli("train", write_config(tmp_path, tiny_config), "train.lr=5e-2", "peft.r=8")
    assert res.returncode == 0, res.stderr
    run = tmp_path / "runs" / "tiny"
    for name in ("config.yaml", "data_report.json", "metrics.jsonl", "eval.json", "run.json", "adapter"):
        assert (run / name).exists(), name
    assert "lr: 0.05" in (run / "config.yaml").read_text()  # the override is in the resolved config
    report = json.loads((run / "eval.json").read_text())
    base, tuned = report["base"]["validation"]["loss"], report["finetuned"]["validation"]["loss"]
    assert tuned < base - 0.3, (base, tuned)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [x["step"] for x in lines if "loss" in x]
    assert steps == list(range(1, 25))
    assert any("eval" in x and x["step"] == 12 for x in lines)
    assert report["samples"] and {"prompt", "base", "finetuned", "reference"} <= set(report["samples"][0])
    assert "Before / after" in res.stderr or "Before / after" in res.stdout


def test_existing_run_needs_overwrite_or_resume(tmp_path, tiny_config):
    tiny_config["train"]["max_steps"] = 1
    cfg = write_config(tmp_path, tiny_config)
    assert run_cli("train", cfg).returncode == 0
    again = run_cli("train", cfg)
    assert again.returncode == 2 and "--overwrite" in again.stderr and "Traceback" not in again.stderr
    assert run_cli("train", cfg, "--overwrite").returncode == 0


def _train_in_process(cfg_dict, **overrides):
    cfg = config_from_dict(cfg_dict)
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        setattr(getattr(cfg, section), key, value)
    run = causal_lm.train(cfg, overwrite=True)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    return losses, adapter_tensors(run.path)


def test_gradient_accumulation_matches_one_big_batch(tiny_config):
    """8x1, 4x2 and 2x4 see the same rows per step; token-level normalisation makes them equal."""
    tiny_config["train"].update(max_steps=4, lr=1e-2)
    tiny_config["eval"]["before_after"] = False
    tiny_config["eval"]["samples"] = 0
    shapes = ((8, 1), (4, 2), (2, 4))
    results = [_train_in_process(tiny_config, train__batch_size=b, train__grad_accum=g) for b, g in shapes]
    ref_losses, ref_weights = results[0]
    for losses, weights in results[1:]:
        assert losses == pytest.approx(ref_losses, rel=1e-5)
        for name, t in ref_weights.items():
            torch.testing.assert_close(weights[name], t, rtol=1e-5, atol=1e-6)


class Interrupt(Exception):
    pass


def test_resume_after_a_crash_gives_the_uninterrupted_weights(tiny_config, monkeypatch):
    tiny_config["train"].update(max_steps=6, save_every=2, save_total_limit=2)
    tiny_config["peft"]["dropout"] = 0.1  # dropout draws random numbers: the RNG state must be restored
    tiny_config["eval"].update(every=3, samples=0)
    cfg = config_from_dict(tiny_config)
    uninterrupted = adapter_tensors(causal_lm.train(cfg, overwrite=True).path)

    real_save = fitting.save_checkpoint

    def crash_after_step_4(s, step, data_step):
        real_save(s, step, data_step)
        if step == 4:
            raise Interrupt

    monkeypatch.setattr(fitting, "save_checkpoint", crash_after_step_4)
    with pytest.raises(Interrupt):
        causal_lm.train(cfg, overwrite=True)
    monkeypatch.setattr(fitting, "save_checkpoint", real_save)
    ckpts = sorted(p.name for p in (cfg.run_dir / "checkpoints").iterdir())
    assert ckpts == ["step-2", "step-4"]
    resumed = adapter_tensors(causal_lm.train(cfg, resume=True).path)
    for name, t in uninterrupted.items():
        assert torch.equal(resumed[name], t), name
    records = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # nothing logged twice after the resume


def test_resume_refuses_a_changed_config(tmp_path, tiny_config):
    tiny_config["train"].update(max_steps=2, save_every=1)
    cfg = write_config(tmp_path, tiny_config)
    assert run_cli("train", cfg).returncode == 0
    res = run_cli("train", cfg, "--resume", "train.lr=0.5", "peft.r=8")
    assert res.returncode == 2
    assert "train.lr" in res.stderr and "peft.r" in res.stderr


def test_early_stopping_restores_the_best_weights(tiny_config):
    # min_delta larger than any change: only the first evaluation counts as an improvement.
    tiny_config["train"].update(max_steps=20, lr=0.05, early_stopping={"patience": 2, "min_delta": 100.0})
    tiny_config["eval"].update(every=2, samples=0)
    run = causal_lm.train(config_from_dict(tiny_config), overwrite=True)
    report = json.loads((run / "eval.json").read_text())
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval" in r]
    mid = [e["eval"]["loss"] for e in evals if not e.get("final")]
    assert report["training"]["stopped_early"] and report["training"]["steps"] == 6  # evals at 2, 4, 6
    assert mid[0] != pytest.approx(mid[-1], rel=1e-4)  # the weights did move after step 2
    assert report["finetuned"]["validation"]["loss"] == pytest.approx(mid[0], rel=1e-5)


def test_full_finetuning_saves_a_model_directory(tiny_config, tmp_path):
    tiny_config["peft"] = {"method": "full"}
    tiny_config["train"].update(max_steps=2, lr=1e-3)
    run = causal_lm.train(config_from_dict(tiny_config), overwrite=True)
    assert (run / "model" / "model.safetensors").exists() and not (run / "adapter").exists()
    res = run_cli("generate", run.path, "--prompt", "reverse the words", "--max-new-tokens", "4")
    assert res.returncode == 0, res.stderr


def test_bad_rows_stop_the_run_before_the_model_loads_or_are_skipped_and_counted(tmp_path, tiny_config, tiny_llama):
    from conftest import instruction_rows

    rows = [json.dumps(r) for r in instruction_rows(40)]
    rows[4] = rows[4][:25]  # line 5: truncated JSON
    rows[9] = json.dumps({"instruction": "reverse the words", "input": "one"})  # line 10: no output column
    data = tmp_path / "bad.jsonl"
    data.write_bytes(
        ("\n".join(rows[:14]) + "\n").encode()
        + b'{"instruction": "x \xff y", "output": "z"}\n'
        + ("\n".join(rows[15:]) + "\n").encode()
    )
    tiny_config["data"]["train"] = str(data)
    tiny_config["model"]["name"] = str(tmp_path / "no-such-model")  # proves nothing loads before the data check
    res = run_cli("train", write_config(tmp_path, tiny_config))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    for line, reason in ((5, "malformed JSON"), (10, "missing column 'output'"), (15, "invalid UTF-8 byte 0xff")):
        assert f"bad.jsonl:{line}: {reason}" in res.stderr
    assert "3 bad row(s)" in res.stderr

    tiny_config["model"]["name"] = str(tiny_llama)
    tiny_config["data"].update(on_error="skip", max_bad_fraction=0.1)
    tiny_config["train"]["max_steps"] = 2
    res = run_cli("train", write_config(tmp_path, tiny_config))
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "runs" / "tiny" / "data_report.json").read_text())
    assert report["bad_rows"] == {"malformed_json": 1, "missing_column": 1, "invalid_utf8": 1}
    assert report["rows"]["train"] == 37
