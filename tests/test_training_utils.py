"""Training helpers the README makes promises about: the flat-loss warning (also across a resume), the
weight-decay exclusions (none on biases and norms) and the learning-rate schedules."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _cli import invoke_cli
from conftest import instruction_rows, write_config, write_jsonl
from reliability._harness import fresh_accelerator_state, records  # noqa: F401 (autouse fixture)

from tunesmith.config import TrainConfig
from tunesmith.training.optim import build_optimizer, build_scheduler
from tunesmith.training.watch import Watch


def run_watch(watch: Watch, steps, loss) -> list[tuple[int, str]]:
    """Feed `loss(step)` for each step; the (step, warning) pairs that came out."""
    return [(s, m) for s in steps if (m := watch.step(s, loss(s)))]


# ------------------------------------------------------------------------------------ flat-loss warning


def test_a_flat_loss_warns_once_a_fifth_of_the_way_in():
    said = run_watch(Watch(500), range(1, 501), lambda s: 2.0 + 0.001 * (s % 3))
    assert [s for s, _ in said] == [100]  # a fifth of 500 updates; said once
    assert "flat" in said[0][1] and "train.lr" in said[0][1]


def test_a_short_run_waits_fifty_steps():
    assert [s for s, _ in run_watch(Watch(120), range(1, 121), lambda s: 2.0)] == [50]


def test_a_falling_loss_does_not_warn():
    assert run_watch(Watch(500), range(1, 501), lambda s: 3.0 / (1 + 0.01 * s)) == []


def test_a_loss_that_fell_and_came_back_is_not_called_flat():
    """The rule looks at the first fifth: a later return to the starting loss is something else."""
    loss = {s: 2.0 if s <= 20 else 1.0 for s in range(1, 101)} | {s: 2.0 for s in range(101, 501)}
    assert run_watch(Watch(500), range(1, 501), loss.__getitem__) == []


@pytest.mark.parametrize("stop_at", [5, 30, 99])
def test_the_flat_warning_survives_a_resume(stop_at):
    """Resumed at `stop_at`, the watch continues from its checkpointed state (round-tripped through JSON
    like state.json): the warning comes at the same step as in an uninterrupted run."""
    first = Watch(500)
    assert run_watch(first, range(1, stop_at + 1), lambda s: 2.0) == []
    resumed = Watch(500)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert [s for s, _ in run_watch(resumed, range(stop_at + 1, 501), lambda s: 2.0)] == [100]


def test_a_warning_given_before_the_checkpoint_is_not_repeated_after_the_resume():
    first = Watch(500)
    assert len(run_watch(first, range(1, 201), lambda s: 2.0)) == 1
    resumed = Watch(500)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert run_watch(resumed, range(201, 501), lambda s: 2.0) == []


def test_a_checkpoint_without_watch_state_resumes_quietly():
    """Checkpoints written before the watch was saved: no baseline, so no flat warning (never a wrong one)."""
    resumed = Watch(500)
    resumed.load_state_dict(None)
    assert run_watch(resumed, range(31, 501), lambda s: 2.0) == []


def test_overfitting_evaluations_survive_a_resume():
    first = Watch(100)
    run_watch(first, range(1, 6), lambda s: 3.0 - 0.1 * s)
    assert first.evaluated(5, 1.0) is None
    run_watch(first, range(6, 11), lambda s: 3.0 - 0.1 * s)
    assert first.evaluated(10, 1.1) is None
    resumed = Watch(100)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    run_watch(resumed, range(11, 21), lambda s: 1.0 - 0.01 * s)
    assert "overfitting" in resumed.evaluated(20, 1.2)


def test_a_resumed_run_warns_that_its_loss_is_flat(tmp_path, tiny_config):
    """Through the CLI: 20 updates with a checkpoint, then --resume to 60. The loss cannot move (lr 1e-10, the
    whole data set in every batch), so the warning is due at step 50, after the resume."""
    write_jsonl(tmp_path / "data" / "train.jsonl", instruction_rows(8))
    tiny_config["train"].update(max_steps=20, save_every=20, lr=1e-10, batch_size=8, schedule="constant")
    tiny_config["eval"].update(before_after=False, samples=0, max_rows=2, generate_rows=1, max_new_tokens=1)
    cfg = write_config(tmp_path, tiny_config)
    assert invoke_cli("train", cfg).returncode == 0
    assert invoke_cli("train", cfg, "--resume", "train.max_steps=60").returncode == 0
    warnings = [r for r in records(tmp_path / "runs" / "tiny") if "warning" in r]
    assert [r["step"] for r in warnings] == [50] and "flat" in warnings[0]["warning"]


# ------------------------------------------------------------------------------------ weight decay


class Small(torch.nn.Module):
    """A matrix with a bias, an embedding, a norm and a frozen matrix: the kinds of parameters a model has."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(5, 4)
        self.proj = torch.nn.Linear(4, 4)
        self.norm = torch.nn.LayerNorm(4)
        self.frozen = torch.nn.Linear(4, 4, bias=False).requires_grad_(False)


def test_weight_decay_skips_biases_and_norms():
    model = Small()
    opt = build_optimizer(model, TrainConfig(weight_decay=0.5, lr=0.1))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["weight_decay"]: sorted(names[id(p)] for p in g["params"]) for g in opt.param_groups}
    assert groups == {0.5: ["embed.weight", "proj.weight"], 0.0: ["norm.bias", "norm.weight", "proj.bias"]}


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_a_step_without_gradient_shrinks_only_the_matrices(optimizer):
    """Decoupled decay moves a matrix by lr * weight_decay of itself; a bias or norm must not move at all."""
    model = Small()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, TrainConfig(weight_decay=0.5, lr=0.1, optimizer=optimizer))
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    opt.step()
    after = dict(model.named_parameters())
    for name in ("embed.weight", "proj.weight"):
        torch.testing.assert_close(after[name].detach(), before[name] * (1 - 0.1 * 0.5))
    for name in ("proj.bias", "norm.weight", "norm.bias", "frozen.weight"):
        assert torch.equal(after[name].detach(), before[name]), name


# ------------------------------------------------------------------------------------ learning-rate schedules

# peak lr 0.1, 2 warmup updates of 6: warmup is (step + 1) / (warmup + 1) of the peak, then the schedule
EXPECTED_LR = {
    "constant": [0.1 / 3, 0.2 / 3, 0.1, 0.1, 0.1, 0.1],
    "linear": [0.1 / 3, 0.2 / 3, 0.1, 0.075, 0.05, 0.025],
    "cosine": [
        0.1 / 3,
        0.2 / 3,
        0.1,
        0.1 * (0.5 + 0.5 * math.cos(math.pi / 4)),
        0.05,
        0.1 * (0.5 + 0.5 * math.cos(3 * math.pi / 4)),
    ],
}


def lrs_per_update(cfg, total: int) -> list[float]:
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("schedule", list(EXPECTED_LR))
def test_schedule_lr_per_update(schedule):
    cfg = TrainConfig(lr=0.1, warmup_steps=2, schedule=schedule)
    assert lrs_per_update(cfg, 6) == pytest.approx(EXPECTED_LR[schedule])


def test_warmup_ratio_counts_updates_of_the_run():
    cfg = TrainConfig(lr=0.1, warmup_ratio=0.34, schedule="constant")  # round(0.34 * 6) = 2 updates
    assert lrs_per_update(cfg, 6) == pytest.approx(EXPECTED_LR["constant"])


@pytest.mark.parametrize("schedule", ["linear", "constant"])
def test_the_training_loop_uses_the_schedule(tmp_path, tiny_config, schedule):
    """metrics.jsonl logs the rate each update used: the same values through the real loop."""
    tiny_config["train"].update(lr=0.1, warmup_steps=2, warmup_ratio=0.0, schedule=schedule, max_steps=6)
    tiny_config["eval"].update(before_after=False, samples=0, max_rows=2, generate_rows=1, max_new_tokens=1)
    assert invoke_cli("train", write_config(tmp_path, tiny_config)).returncode == 0
    logged = [r["lr"] for r in records(tmp_path / "runs" / "tiny") if "loss" in r]
    assert logged == pytest.approx(EXPECTED_LR[schedule])
