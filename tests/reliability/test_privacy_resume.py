"""RELIABILITY.md S9: the accountant's golden values, the budget, and epsilon across crash and resume."""

from __future__ import annotations

import json

import pytest
import torch
from _harness import adapter, cli, rel_config, write_config
from opacus.accountants import create_accountant

from tunesmith.config import Privacy
from tunesmith.privacy.dp import DPSGD

# Opacus accountants_test.py: sigma 1.5, q 0.04, delta 1e-5, over int(90 / 0.04) = 2250 steps (RDP) and
# int(90 // 0.04) = 2249 steps (PRV).
STEPS = int(90 // 0.04)


def engine(q: float = 0.04, **privacy) -> DPSGD:
    model = torch.nn.Linear(2, 2)
    pcfg = Privacy(**{"delta": 1e-5, **privacy})
    return DPSGD(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        pcfg,
        n_units=10_000,
        sample_rate=q,
        planned_steps=STEPS,
        seed=0,
    )


@pytest.mark.parametrize(
    "accountant, steps, golden", [("rdp", int(90 / 0.04), 7.32911117143), ("prv", int(90 // 0.04), 6.777395712150674)]
)
def test_accountant_golden_values_through_the_training_path(accountant, steps, golden):
    dp = engine(noise_multiplier=1.5, accountant=accountant)
    for step in range(steps):  # the same calls a training step makes
        dp.privatize(step)
    assert dp.steps_taken == steps
    assert dp.epsilon() == pytest.approx(golden, abs=1e-6)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
def test_noise_from_a_target_never_overshoots_it(accountant, target):
    dp = engine(target_epsilon=target, accountant=accountant)
    assert dp.epsilon(STEPS) <= target
    assert dp.budget_steps >= STEPS  # the planned run fits the budget
    assert dp.epsilon(dp.budget_steps + 1) > target  # and the budget is the last step that fits


def _dp_config(tmp_path, tiny_llama, **privacy) -> dict:
    cfg = rel_config(tmp_path, tiny_llama, max_steps=100, save_every=20, log_every=10, save_total_limit=10)
    cfg["peft"]["target_modules"] = ["q_proj", "v_proj"]
    cfg["privacy"] = {"target_epsilon": 8.0, "max_grad_norm": 0.5, **privacy}
    return cfg


def test_epsilon_after_crash_and_resume_equals_an_uninterrupted_run(tmp_path, tiny_llama):
    cfg = write_config(tmp_path, _dp_config(tmp_path, tiny_llama))
    whole = cli("train", cfg, "name=whole")
    assert whole.returncode == 0, whole.stderr
    crashed = cli("train", cfg, "name=crashed", fault={"kill_after_step": 60})
    assert crashed.returncode == -9
    run = tmp_path / "runs" / "crashed"
    state = json.loads((run / "checkpoints" / "step-40" / "state.json").read_text())
    assert state["privacy"]["history"] == [[state["privacy"]["noise_multiplier"], 8 / 64, 40]]  # JSON, not pickle
    assert not (run / "checkpoints" / "step-60").exists()
    resumed = cli("train", cfg, "name=crashed", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads((tmp_path / "runs" / "whole" / "eval.json").read_text())
    b = json.loads((run / "eval.json").read_text())
    assert a["privacy"]["steps"] == b["privacy"]["steps"] == 100
    assert b["epsilon"] == a["epsilon"] <= 8.0
    wa, wb = adapter(tmp_path / "runs" / "whole"), adapter(run)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # same rows, same noise: the same weights


def test_budget_stops_training_before_epsilon_is_exceeded(tmp_path, tiny_llama):
    cfg = _dp_config(tmp_path, tiny_llama, noise_multiplier=0.8, target_epsilon=2.0)
    res = cli("train", write_config(tmp_path, cfg))
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "runs" / "rel" / "eval.json").read_text())
    steps = report["privacy"]["steps"]
    assert steps < 100 and report["training"]["stopped_at_budget"]
    assert report["epsilon"] <= 2.0
    assert "Privacy budget" in res.stderr
    one_more = create_accountant("prv")
    one_more.history = [(0.8, 8 / 64, steps + 1)]
    assert one_more.get_epsilon(delta=report["delta"]) > 2.0


def test_resume_refuses_other_privacy_settings_or_no_accountant(tmp_path, tiny_llama):
    cfg = _dp_config(tmp_path, tiny_llama, noise_multiplier=1.0, target_epsilon=None)
    cfg["train"].update(max_steps=40)
    path = write_config(tmp_path, cfg)
    assert cli("train", path, fault={"kill_after_step": 30}).returncode == -9
    noisier = cli("train", path, "--resume", "--allow-drift", "privacy.noise_multiplier=1.2")
    assert noisier.returncode == 2 and "noise_multiplier" in noisier.stderr and "Traceback" not in noisier.stderr
    plain = cli("train", path, "--resume", "--allow-drift", "privacy=null")
    assert plain.returncode == 2 and "trained with privacy" in plain.stderr
    assert cli("train", path, "--resume").returncode == 0  # control: the same settings resume

    del cfg["privacy"]
    cfg["name"] = "plain"
    path = write_config(tmp_path, cfg)
    assert cli("train", path, fault={"kill_after_step": 30}).returncode == -9
    private = cli("train", path, "--resume", "--allow-drift", "privacy.noise_multiplier=1.0")
    assert private.returncode == 2 and "no privacy accountant state" in private.stderr
