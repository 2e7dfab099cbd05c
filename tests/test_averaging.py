"""`train.ema_decay` (training/averaging.py): evaluations and the saved model use the moving average of the
trainable weights, computed here by hand from the weights after each update; a resume continues it."""

from __future__ import annotations

import pytest
import torch
from reliability._harness import adapter, cli, fresh_accelerator_state, rel_config, write_config  # noqa: F401
from test_frozen_prefix import dp_tree

from tunesmith.config import config_from_dict
from tunesmith.errors import ConfigError, UserError
from tunesmith.recipes import classification, fitting
from tunesmith.recipes.state import trainable_state
from tunesmith.rundir import RunDir
from tunesmith.training.averaging import WeightAverage, average_weights

DECAY = 0.75


def test_the_average_follows_the_formula_and_the_block_restores_the_weights():
    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    start = model.weight.detach().clone()
    avg = WeightAverage(model, DECAY)
    assert set(avg.average) == {"weight"}  # frozen weights are not averaged
    with torch.no_grad():
        model.weight.add_(1.0)
    avg.update()
    torch.testing.assert_close(avg.average["weight"], DECAY * start + (1 - DECAY) * (start + 1))
    own = model.weight.detach().clone()
    with avg.applied():
        torch.testing.assert_close(model.weight.detach(), avg.average["weight"])
    assert torch.equal(model.weight.detach(), own)
    with pytest.raises(UserError, match="ZeRO-3 and FSDP"):
        average_weights(model, DECAY, gathers_in_forward=True)
    assert average_weights(model, None, gathers_in_forward=False) is None
    with pytest.raises(ConfigError, match="less than 1"):
        config_from_dict({"name": "x", "data": {"train": "t.jsonl"}, "train": {"ema_decay": 1.0}})


def test_evaluations_and_the_saved_weights_are_the_average_of_a_dp_run(tmp_path, tiny_llama, monkeypatch):
    tree = dp_tree(tmp_path, tiny_llama)
    tree["train"]["ema_decay"] = DECAY
    tree["eval"]["every"] = 2
    cfg = config_from_dict(tree)
    s = classification.setup(cfg, RunDir.create(cfg, resume=False, overwrite=True))
    hand, scored = [trainable_state(s)], []
    after_update, quick_eval = fitting.after_update, s.evaluation.quick_eval

    def record(s, done, progress, stop):
        hand.append({n: DECAY * hand[-1][n] + (1 - DECAY) * w for n, w in trainable_state(s).items()})
        return after_update(s, done, progress, stop)

    def scoring(s, split):
        scored.append((len(hand) - 1, trainable_state(s)))
        return quick_eval(s, split)

    monkeypatch.setattr(fitting, "after_update", record)
    s.evaluation.quick_eval = scoring
    summary = fitting.fit(s)
    assert summary["steps"] == len(hand) - 1 > 4 and len(scored) >= 2
    for step, weights in scored:
        for name, w in weights.items():
            torch.testing.assert_close(w, hand[step][name], rtol=1e-5, atol=1e-7, msg=f"step {step} {name}")
    final, last = trainable_state(s), hand[-1]
    for name, w in final.items():
        torch.testing.assert_close(w, last[name], rtol=1e-5, atol=1e-7, msg=name)
    assert any(not torch.equal(hand[-1][n], hand[-2][n]) for n in final)  # the average moved on each update


def test_resume_after_a_crash_continues_the_average(tmp_path, tiny_llama):
    tree = rel_config(tmp_path, tiny_llama, max_steps=30, save_every=10, save_total_limit=5)
    tree["train"]["ema_decay"] = DECAY
    cfg = write_config(tmp_path, tree)
    assert cli("train", cfg, "name=whole").returncode == 0
    assert cli("train", cfg, "name=crashed", fault={"kill_after_step": 15}).returncode == -9
    resumed = cli("train", cfg, "name=crashed", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    whole, crashed = adapter(tmp_path / "runs" / "whole"), adapter(tmp_path / "runs" / "crashed")
    assert all(torch.equal(whole[k], crashed[k]) for k in whole)
    plain = cli("train", cfg, "name=plain", "train.ema_decay=null")
    assert plain.returncode == 0
    assert any(not torch.equal(whole[k], v) for k, v in adapter(tmp_path / "runs" / "plain").items())
