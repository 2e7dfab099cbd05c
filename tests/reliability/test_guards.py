"""N3, N5 (RELIABILITY.md section 2) and K4 (section 5): fp16 loss scaling, loss spikes, out of memory.

Faults are installed in-process: a gradient hook (inf gradient), the harness Probe (a loss multiplied
at chosen data steps), and a wrapped loss function that raises the out-of-memory error torch raises.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cli import invoke_cli  # noqa: E402
from _harness import (  # noqa: E402
    Probe,
    adapter,
    assert_tensors_equal,
    checkpoint_steps,
    fresh_accelerator_state,  # noqa: F401  (autouse fixture)
    records,
    rel_config,
    step_lines,
    write_config,
)

from tunesmith.config import config_from_dict  # noqa: E402
from tunesmith.errors import ConfigError, TrainingHalted  # noqa: E402
from tunesmith.recipes import building, causal_lm, fitting  # noqa: E402
from tunesmith.recipes.state import REQUIRED  # noqa: E402
from tunesmith.training import checkpoint as ckpt  # noqa: E402
from tunesmith.training.guards import SpikeDetector, is_oom  # noqa: E402
from tunesmith.training.precision import Precision  # noqa: E402

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------ N3


def _inf_gradient_at(monkeypatch, data_steps: set[int]) -> dict:
    """An inf gradient on one LoRA matrix at the given 1-based data steps; records the loss scale."""
    probe = Probe(monkeypatch)
    seen: dict = {"scale": {}}
    real_build = building.build

    def build(*args, **fns):
        s = real_build(*args, **fns)
        name, param = next((n, p) for n, p in s.model.named_parameters() if p.requires_grad)
        param.register_hook(lambda g: g * float("inf") if probe.data_step in data_steps else g)
        seen["s"] = s
        return s

    monkeypatch.setattr(building, "build", build)
    real_step = Precision.unscale

    def unscale(self, opt):
        seen["scale"][probe.data_step] = self.scaler.get_scale()
        real_step(self, opt)

    monkeypatch.setattr(Precision, "unscale", unscale)
    return seen


def test_n3_fp16_overflow_skips_the_step_and_halves_the_scale(tmp_path, tiny_llama, monkeypatch):
    cfg = config_from_dict(rel_config(tmp_path, tiny_llama, max_steps=6, save_every=4, precision="fp16"))
    seen = _inf_gradient_at(monkeypatch, {4})
    run = causal_lm.train(cfg)
    s = seen["s"]
    training = json.loads((run / "eval.json").read_text())["training"]
    # 7 attempts, 6 updates; the schedule advanced only on applied updates.
    assert (training["steps"], training["data_steps"], training["skipped_nonfinite"]) == (6, 7, 1)
    assert s.optim.scheduler.last_epoch == 6
    skipped = [r for r in records(run.path) if r.get("skipped")]
    assert [(r["data_step"], r["step"]) for r in skipped] == [(4, 3)]
    # The scale is halved once, at the overflow, and nowhere else.
    scales = seen["scale"]
    assert scales[5] == scales[4] / 2 and len({scales[d] for d in (1, 2, 3, 4)}) == 1
    assert len({scales[d] for d in (5, 6, 7)}) == 1
    # No replay: every data step took fresh rows of the epoch.
    rows = [s.optim.plan.step_rows(d) for d in range(7)]
    assert len({i for r in rows for i in r}) == 7 * 8

    # The checkpoint after the skip carries the halved scale; resuming from it is exact (atol=0).
    state = json.loads((run / "checkpoints" / "step-4" / "state.json").read_text())
    assert state["grad_scaler"]["scale"] == scales[5]
    uninterrupted = adapter(run.path)
    seen_resume = _inf_gradient_at(monkeypatch, set())
    causal_lm.train(cfg, resume=True)
    assert seen_resume["scale"][6] == scales[5]  # restored, not a fresh 65536
    assert_tensors_equal(adapter(run.path), uninterrupted)


def test_n3_fp16_without_the_fault_applies_every_step(tmp_path, tiny_llama):
    """Control: the tiny model in fp16 does not overflow by itself, so the skip above is the fault's."""
    run = causal_lm.train(config_from_dict(rel_config(tmp_path, tiny_llama, max_steps=6, precision="fp16")))
    training = json.loads((run / "eval.json").read_text())["training"]
    assert (training["steps"], training["data_steps"], training["skipped_nonfinite"]) == (6, 6, 0)


# ------------------------------------------------------------------------------------------------ N5


def test_n5_detector_flags_exactly_the_spike_in_a_noisy_trace():
    rng = random.Random(0)
    trace = [2.0 * (1 + rng.uniform(-0.1, 0.1)) for _ in range(1000)]
    trace[500] *= 20
    detector = SpikeDetector(factor=5.0, window=50)
    assert [step for step, loss in enumerate(trace) if detector.check(loss, step)] == [500]
    # A falling loss (the normal shape of training) is never a spike; a rise of 5x the median is.
    falling = SpikeDetector(5.0, 50)
    assert not any(falling.check(5.0 * 0.995**k * (1 + rng.uniform(-0.1, 0.1)), k) for k in range(1000))
    control = SpikeDetector(factor=30.0, window=50)  # a factor above the spike: nothing flagged
    assert [s for s, loss in enumerate(trace) if control.check(loss, s)] == []


def test_n5_skip_policy_leaves_the_state_untouched(tmp_path, tiny_llama, monkeypatch):
    cfg = config_from_dict(rel_config(tmp_path, tiny_llama, max_steps=16, on_spike="skip"))
    probe = Probe(monkeypatch, scale_loss_at={14}, factor=50.0)
    run = causal_lm.train(cfg)
    spikes = [r for r in records(run.path) if "spike" in r]
    assert [(r["data_step"], r["applied"]) for r in spikes] == [(14, False)]
    assert len(spikes[0]["rows"]) == 8
    keys = ("params", "optimizer", "lr", "scheduler")
    assert {k: probe.before[15][k] for k in keys} == {k: probe.before[14][k] for k in keys}
    assert json.loads((run / "eval.json").read_text())["training"]["data_steps"] == 17


def test_n5_warn_policy_applies_the_step(tmp_path, tiny_llama, monkeypatch):
    cfg = config_from_dict(rel_config(tmp_path, tiny_llama, max_steps=16))
    probe = Probe(monkeypatch, scale_loss_at={14}, factor=50.0)
    run = causal_lm.train(cfg)
    assert [(r["data_step"], r["applied"]) for r in records(run.path) if "spike" in r] == [(14, True)]
    assert probe.before[15]["params"] != probe.before[14]["params"]
    assert json.loads((run / "eval.json").read_text())["training"]["data_steps"] == 16


def test_n5_rollback_after_three_spikes_restores_and_never_feeds_those_rows(tmp_path, tiny_llama, monkeypatch):
    cfg = config_from_dict(
        rel_config(tmp_path, tiny_llama, max_steps=20, save_every=4, on_spike="rollback", spike_window=10)
    )
    probe = Probe(monkeypatch, scale_loss_at={14, 15, 16}, factor=50.0)
    fed: list[tuple[int, list[str]]] = []  # (data step, row ids) of every training micro-batch
    probed_build = building.build

    def build(*args, **fns):
        collate = fns["collate"]
        fns["collate"] = lambda rows: (fed.append((probe.data_step, [r.id for r in rows])), collate(rows))[1]
        return probed_build(*args, **fns)

    monkeypatch.setattr(building, "build", build)
    run = causal_lm.train(cfg)
    s = probe.s
    spiked = {d: [s.data.rows["train"][i].id for i in s.optim.plan.step_rows(d - 1)] for d in (14, 15, 16)}
    bad = {i for ids in spiked.values() for i in ids}
    back = [r for r in records(run.path) if "rollback" in r]
    assert [(r["rollback"], r["step"]) for r in back] == [("step-12", 12)]
    assert sorted(back[0]["excluded"]) == sorted(bad)
    excluded = json.loads((run / "excluded_rows.json").read_text())["rows"]
    assert sorted(s.data.rows["train"][i].id for i in excluded) == sorted(bad)
    # After the rollback (the 4th feed of data step 13 onwards), no spiking row is fed again.
    first_after = next(k for k, (d, _) in enumerate(fed) if d == 13 and k > 0 and fed[k - 1][0] == 16)
    assert not bad & {i for _, ids in fed[first_after:] for i in ids}
    # The run still makes max_steps updates, and the checkpoint it rolled back to was left intact.
    assert [r["step"] for r in step_lines(run.path)] == list(range(1, 21))
    assert json.loads((run / "eval.json").read_text())["training"]["rollbacks"] == 1
    ckpt.verify(run / "checkpoints" / "step-20", REQUIRED)


def test_n5_rollback_needs_checkpoints():
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"data": {"train": "x.jsonl"}, "train": {"on_spike": "rollback"}})
    assert "needs save_every" in caught.value.render()


# ------------------------------------------------------------------------------------------------ K4


def _oom_from(monkeypatch, data_step: int, above_rows: int) -> Probe:
    """`RuntimeError("CUDA out of memory.")` from data step `data_step` on, for batches over `above_rows`."""
    probe = Probe(monkeypatch)
    real_build = building.build

    def build(*args, **fns):
        loss_sum = fns["loss_sum"]

        def oom(model, batch):
            if model.training and probe.data_step >= data_step and batch["input_ids"].shape[0] > above_rows:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return loss_sum(model, batch)

        fns["loss_sum"] = oom
        return real_build(*args, **fns)

    monkeypatch.setattr(building, "build", build)
    return probe


def test_k4_oom_halves_the_micro_batch_and_keeps_the_effective_batch(tmp_path, tiny_llama, monkeypatch):
    base = rel_config(tmp_path, tiny_llama, max_steps=6, save_every=3)
    base["peft"]["dropout"] = 0.0
    _oom_from(monkeypatch, 3, above_rows=2)
    run = causal_lm.train(config_from_dict(base))
    backoff = [r for r in records(run.path) if "oom_backoff" in r]
    assert [(r["data_step"], r["oom_backoff"]) for r in backoff] == [(3, 2)]
    assert "effective batch unchanged, 8 rows" in backoff[0]["warning"]
    assert json.loads((run / "checkpoints" / "step-3" / "state.json").read_text())["micro_batch_size"] == 2
    finished = adapter(run.path)
    # A resume from step-3 keeps the backed-off size: no second out-of-memory, and the same weights.
    shutil.rmtree(run / "checkpoints" / "step-6")
    causal_lm.train(config_from_dict(base), resume=True)
    assert [(r["data_step"], r["oom_backoff"]) for r in records(run.path) if "oom_backoff" in r] == [(3, 2)]
    assert_tensors_equal(adapter(run.path), finished)
    monkeypatch.undo()
    reference = causal_lm.train(
        config_from_dict({**base, "name": "small", "train": {**base["train"], "batch_size": 2, "grad_accum": 4}})
    )
    got, want = adapter(run.path), adapter(reference.path)
    assert sorted(got) == sorted(want)
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7)
    assert [r["step"] for r in step_lines(run.path)] == list(range(1, 7))


def test_k4_oom_at_one_row_halts_with_the_checkpoint_intact(tmp_path, tiny_llama, monkeypatch):
    cfg = write_config(tmp_path, rel_config(tmp_path, tiny_llama, max_steps=6, save_every=2))
    _oom_from(monkeypatch, 3, above_rows=0)
    assert invoke_cli("train", cfg).returncode == 3
    run = tmp_path / "runs" / "rel"
    assert json.loads((run / "run.json").read_text())["status"] == "halted"
    assert checkpoint_steps(run) == [2]
    ckpt.verify(run / "checkpoints" / "step-2", REQUIRED)
    assert [r["oom_backoff"] for r in records(run) if "oom_backoff" in r] == [2, 1]


def test_k4_other_runtime_errors_are_not_mistaken_for_oom():
    assert is_oom(RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    assert is_oom(
        RuntimeError(
            "DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes. "
            "Error code 12 (Cannot allocate memory)"
        )
    )
    assert not is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_k4_backoff_off_reraises(tmp_path, tiny_llama, monkeypatch):
    _oom_from(monkeypatch, 2, above_rows=0)
    with pytest.raises(RuntimeError, match="out of memory"):
        causal_lm.train(config_from_dict(rel_config(tmp_path, tiny_llama, max_steps=4, oom_backoff=False)))


def test_n5_spikes_that_rollback_cannot_fix_halt_the_run(tmp_path, tiny_llama, monkeypatch):
    """Spikes tied to the step, not its rows, come back after every rollback: halt instead of looping."""
    cfg = config_from_dict(
        rel_config(
            tmp_path, tiny_llama, max_steps=20, save_every=4, on_spike="rollback", spike_window=10, max_rollbacks=2
        )
    )
    Probe(monkeypatch, scale_loss_at={14, 15, 16}, factor=50.0)
    real_rollback = fitting.rollback
    monkeypatch.setattr(
        fitting, "rollback", lambda s, rows, updates, data_step: real_rollback(s, [], updates, data_step)
    )
    with pytest.raises(TrainingHalted, match="persist after 2 rollbacks"):
        causal_lm.train(cfg)
