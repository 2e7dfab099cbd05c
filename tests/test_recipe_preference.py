"""Preference tuning end to end on a tiny Llama: a DPO run learns the held-out pairs' preference, resumes
exactly, trains under DP-SGD (each pair clipped: a pair is one row), and bad pairs or a bad model are
refused with file:line or the key, exit 2, before any weights load."""

from __future__ import annotations

import json
import random

import pytest
import torch
from _cli import invoke_cli
from conftest import crash_then_resume, write_config, write_jsonl
from safetensors.torch import load_file

from tunesmith import models
from tunesmith.config import config_from_dict
from tunesmith.recipes import preference

WORDS = ["one", "two", "three", "four", "five", "six"]


def pairs(n: int, seed: int) -> list[dict]:
    """Reverse the words: the reversed order is chosen, the words as given (plus one) rejected."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ws = [rng.choice(WORDS) for _ in range(rng.randint(2, 5))]
        out.append(
            {
                "id": f"p{seed}-{i}",
                "prompt": "reverse: " + " ".join(ws) + f" #{i}",
                "chosen": " ".join(reversed(ws)),
                "rejected": " ".join(ws + ws[:1]),
            }
        )
    return out


@pytest.fixture
def pref_config(tmp_path, tiny_llama):
    return {
        "name": "pref",
        "output_dir": str(tmp_path / "runs"),
        "seed": 0,
        "model": {"name": str(tiny_llama)},
        "peft": {"method": "lora", "r": 4, "dropout": 0.0},
        "data": {
            "train": str(write_jsonl(tmp_path / "data" / "train.jsonl", pairs(48, 0))),
            "validation": str(write_jsonl(tmp_path / "data" / "val.jsonl", pairs(16, 1))),
            "format": "preference",
            "max_length": 128,
        },
        "train": {"max_steps": 24, "lr": 5e-2, "batch_size": 4, "warmup_ratio": 0.0, "schedule": "constant"},
        "preference": {"beta": 0.5},
        "eval": {"batch_size": 8, "max_new_tokens": 4, "samples": 1, "generate_rows": 2},
    }


def test_a_dpo_run_learns_the_held_out_preference(pref_config):
    run = preference.train(config_from_dict(pref_config), overwrite=True).path
    report = json.loads((run / "eval.json").read_text())
    base, tuned = report["base"]["validation"], report["finetuned"]["validation"]
    assert base["loss"] == pytest.approx(0.6931, abs=1e-3) and base["reward_accuracy"] == 0  # base = reference
    assert tuned["loss"] < base["loss"] - 0.1 and tuned["reward_accuracy"] >= 75 and tuned["reward_margin"] > 0
    assert tuned["preference_accuracy"] > base["preference_accuracy"]
    assert tuned["logp_chosen"] - tuned["logp_rejected"] > base["logp_chosen"] - base["logp_rejected"]
    assert {"rougeL", "pairs"} <= set(tuned) and tuned["pairs"] == 16
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((run / "data_report.json").read_text())["rows"] == {"train": 48, "validation": 16}
    html = (run / "report.html").read_text()  # the report's before/after table carries the pair metrics
    assert all(f">{m}<" in html for m in ("preference_accuracy", "reward_accuracy", "reward_margin", "logp_chosen"))


@pytest.mark.parametrize("loss", ["ipo", "simpo"])
def test_ipo_and_simpo_runs_lower_their_loss(pref_config, loss):
    pref_config["preference"] = {"loss": loss, "beta": 0.5 if loss == "ipo" else 2.0}
    pref_config["train"]["max_steps"] = 12
    run = preference.train(config_from_dict(pref_config), overwrite=True).path
    report = json.loads((run / "eval.json").read_text())
    assert report["finetuned"]["validation"]["loss"] < report["base"]["validation"]["loss"]


def test_resume_after_a_crash_gives_the_uninterrupted_adapter(pref_config, monkeypatch):
    pref_config["train"].update(max_steps=6, save_every=2)
    pref_config["peft"]["dropout"] = 0.1  # the RNG state must be restored too
    pref_config["eval"].update(samples=0, generate_rows=None)
    cfg = config_from_dict(pref_config)
    uninterrupted = load_file(str(preference.train(cfg, overwrite=True).path / "adapter" / "adapter_model.safetensors"))
    resumed = load_file(
        str(crash_then_resume(preference.train, cfg, monkeypatch, 4) / "adapter" / "adapter_model.safetensors")
    )
    for name, t in uninterrupted.items():
        assert torch.equal(resumed[name], t), name


def test_dp_sgd_clips_each_pair_and_spends_epsilon(tmp_path, pref_config):
    pref_config["train"].update(max_steps=3)
    pref_config["eval"].update(samples=0, generate_rows=None)
    pref_config["privacy"] = {"target_epsilon": 8.0, "expected_batch_size": 16, "recipe_defaults": False}
    res = invoke_cli("train", write_config(tmp_path, pref_config))
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "runs" / "pref" / "eval.json").read_text())
    assert 0 < report["privacy"]["epsilon"] <= 8.0
    assert report["privacy"]["unit"] == "sample"  # a pair is one row: its clipping unit


@pytest.fixture
def no_weights(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(models, "load_causal_lm", refuse)


def test_bad_pairs_are_refused_with_file_and_line_before_any_weights_load(tmp_path, pref_config, no_weights):
    rows = pairs(8, 0)
    del rows[2]["rejected"]
    rows[5]["rejected"] = rows[5]["chosen"]
    rows[6]["chosen"] = "  "
    pref_config["data"]["train"] = str(write_jsonl(tmp_path / "bad.jsonl", rows))
    res = invoke_cli("train", write_config(tmp_path, pref_config))
    assert res.returncode == 2
    assert "bad.jsonl:3: missing column 'rejected'" in res.stderr
    assert "bad.jsonl:6: chosen and rejected are the same answer" in res.stderr
    assert "bad.jsonl:7: column 'chosen' is empty" in res.stderr


def test_a_classifier_model_packing_and_a_wrong_format_are_refused(tmp_path, pref_config, no_weights):
    from test_recipe_tasks import build_tiny_bert

    pref_config["model"]["name"] = str(build_tiny_bert(tmp_path / "bert"))
    res = invoke_cli("train", write_config(tmp_path, pref_config))
    assert res.returncode == 2 and "needs a causal LM" in res.stderr
    for override, says in (
        ("data.packing=true", "each pair is already one row"),
        ("data.format=instruction", "task 'preference' does not fit"),
        ("task=instruction", "does not fit data.format 'preference'"),
    ):
        extra = ["task=preference"] if override == "data.format=instruction" else []
        res = invoke_cli("train", write_config(tmp_path, pref_config), override, *extra)
        assert res.returncode == 2 and says in res.stderr, (override, res.stderr)


def test_sft_then_dpo_is_one_staged_config_whose_reference_is_the_sft_model(tmp_path, pref_config):
    from conftest import instruction_rows

    pref_config["stages"] = [
        {
            "name": "sft",
            "data": {
                "train": str(write_jsonl(tmp_path / "sft" / "train.jsonl", instruction_rows(24))),
                "validation": str(write_jsonl(tmp_path / "sft" / "val.jsonl", instruction_rows(6, seed=1))),
                "format": "instruction",
                "max_length": 128,
                "overlength": "drop",
            },
            "train": {"max_steps": 4},
        }
    ]
    pref_config["train"]["max_steps"] = 6
    pref_config["eval"].update(samples=0, generate_rows=None)
    res = invoke_cli("train", write_config(tmp_path, pref_config))
    assert res.returncode == 0, res.stderr
    runs = tmp_path / "runs"
    assert str(runs / "pref-stage1-sft" / "merged") in (runs / "pref" / "config.yaml").read_text()
    report = json.loads((runs / "pref" / "eval.json").read_text())
    assert [r["stage"] for r in report["stages"]] == ["sft", "final"]
    # the DPO stage's reference is the model it starts from (the SFT model): its base row has zero margins
    assert report["base"]["validation"]["reward_margin"] == pytest.approx(0, abs=1e-9)


def test_full_fine_tuning_takes_its_initial_weights_as_the_reference(pref_config):
    pref_config["peft"] = {"method": "full"}
    pref_config["train"].update(max_steps=8, lr=1e-4)
    pref_config["eval"].update(samples=0, generate_rows=None)
    run = preference.train(config_from_dict(pref_config), overwrite=True).path
    report = json.loads((run / "eval.json").read_text())
    assert report["base"]["validation"]["reward_margin"] == 0  # before any update: the model is its reference
    assert report["finetuned"]["validation"]["loss"] < report["base"]["validation"]["loss"]
    assert (run / "model" / "model.safetensors").is_file()
