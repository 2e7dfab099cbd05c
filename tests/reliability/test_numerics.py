"""N1, N2, N4 of docs RELIABILITY.md section 2: a non-finite step is skipped whole, persistent NaN
halts cleanly with the last good checkpoint intact, and an exploding gradient is clipped.

N3 (fp16 GradScaler) and N5 (loss spikes) are in test_guards.py.

NaN is injected by a forward hook on the model's final norm (training forward passes only), at
chosen 1-based data steps (`data_step` in metrics.jsonl). In-process runs install it by wrapping
`tunesmith.recipes.building.build`; the CLI runs use the same hook through _harness.RUNNER.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (  # noqa: E402
    Probe,
    _state,
    adapter,
    assert_tensors_equal,
    checkpoint_steps,
    cli,
    fresh_accelerator_state,  # noqa: F401  (autouse fixture)
    records,
    rel_config,
    step_lines,
    write_config,
)
from safetensors.torch import load_file  # noqa: E402

from tunesmith.config import config_from_dict  # noqa: E402
from tunesmith.errors import TrainingHalted  # noqa: E402
from tunesmith.recipes import causal_lm, fitting  # noqa: E402
from tunesmith.recipes.state import REQUIRED  # noqa: E402
from tunesmith.training import checkpoint as ckpt  # noqa: E402
from tunesmith.training.optim import lr_factor  # noqa: E402

torch.set_num_threads(1)


def _rows_of(s, data_step: int) -> list[str]:
    # One process: all of the step's rows.
    return [s.data.rows["train"][i].id for i in s.optim.plan.step_rows(data_step - 1)]


# ------------------------------------------------------------------------------------------------ N1


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_n1_a_nan_step_is_skipped_whole(tmp_path, tiny_llama, monkeypatch, precision):
    cfg = config_from_dict(rel_config(tmp_path, tiny_llama, max_steps=10, precision=precision))
    probe = Probe(monkeypatch, nan_at={7})
    run = causal_lm.train(cfg)
    s = probe.s
    after = _state(s)

    skipped = [r for r in records(run.path) if r.get("skipped")]
    assert len(skipped) == 1
    assert skipped[0]["skipped"] == "nonfinite" and skipped[0]["data_step"] == 7 and skipped[0]["step"] == 6
    assert skipped[0]["rows"] == _rows_of(s, 7) and len(skipped[0]["rows"]) == 8

    # max_steps updates were applied; the skipped one does not count, so 11 data steps were consumed.
    assert [r["step"] for r in step_lines(run.path)] == list(range(1, 11))
    training = json.loads((run / "eval.json").read_text())["training"]
    assert (training["steps"], training["data_steps"], training["skipped_nonfinite"]) == (10, 11, 1)
    assert s.optim.scheduler.last_epoch == 10 == after["scheduler"]

    # Data step 7 left weights, optimizer state and schedule bit-identical; the neighbours did not.
    keys = ("params", "optimizer", "lr", "scheduler")
    assert {k: probe.before[8][k] for k in keys} == {k: probe.before[7][k] for k in keys}
    for a, b in ((6, 7), (8, 9)):
        for k in ("params", "optimizer", "scheduler"):
            assert probe.before[a][k] != probe.before[b][k], (a, b, k)
    # The schedule did not advance: update 7 (data step 8) used the rate of the 7th update.
    lrs = [r["lr"] for r in step_lines(run.path)]
    assert lrs == pytest.approx([1e-2 * lr_factor(k, 3, 10, "cosine") for k in range(10)], rel=1e-12, abs=0)
    assert all(st["finite"] for st in probe.before.values()) and after["finite"]


# ------------------------------------------------------------------------------------------------ N2


def test_n2_persistent_nan_halts_and_keeps_the_last_good_checkpoint(tmp_path, tiny_llama):
    cfg = write_config(tmp_path, rel_config(tmp_path, tiny_llama, max_steps=12, save_every=2))
    run = tmp_path / "runs" / "rel"
    res = cli("train", cfg, fault={"nan_from": 5})
    assert res.returncode == 3, res.stderr[-3000:]
    assert "10 consecutive non-finite steps" in res.stderr and "Traceback" not in res.stderr
    assert json.loads((run / "run.json").read_text())["status"] == "halted"

    skipped = [r for r in records(run) if r.get("skipped")]
    assert [r["data_step"] for r in skipped] == list(range(5, 15)) and {r["step"] for r in skipped} == {4}
    assert [r["step"] for r in step_lines(run)] == [1, 2, 3, 4]

    # The newest committed checkpoint is the last good one, complete and finite.
    assert checkpoint_steps(run) == [2, 4]
    newest = run / "checkpoints" / "step-4"
    ckpt.verify(newest, REQUIRED)
    state = json.loads((newest / "state.json").read_text())
    assert (state["step"], state["data_step"], state["counters"]["skipped_nonfinite"]) == (4, 4, 0)
    for name in ("trainable.safetensors", "optimizer.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(str(newest / name)).values()), name

    # With the poison gone, --resume continues from step-4 and finishes like a clean run.
    res = cli("train", cfg, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Resumed from" in res.stderr and "Traceback" not in res.stderr
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    assert [r["step"] for r in step_lines(run)] == list(range(1, 13))
    clean = causal_lm.train(
        config_from_dict({**rel_config(tmp_path, tiny_llama, max_steps=12, save_every=2), "name": "clean"})
    )
    assert_tensors_equal(adapter(run), adapter(clean.path))


def test_n2_a_nan_evaluation_is_never_the_best(tmp_path, tiny_llama, monkeypatch):
    """Early stopping watches eval_loss every 2 updates; the first evaluation (update 2) is poisoned, the
    case where a naive `best is None or value < best` would keep NaN as the best for good."""
    cfg = config_from_dict(
        {
            **rel_config(tmp_path, tiny_llama, max_steps=8, lr=5e-2, warmup_steps=0, early_stopping={"patience": 10}),
            "eval": {
                "every": 2,
                "batch_size": 8,
                "samples": 0,
                "before_after": False,
                "generate_rows": 2,
                "max_new_tokens": 2,
            },
        }
    )
    probe = Probe(monkeypatch)
    real_eval, poison = fitting.evaluate_during_training, {"on": False}

    def evaluate_during_training(s, step, progress):
        if not poison.get("hooked"):
            norm = s.accelerator.unwrap_model(s.model).get_base_model().model.norm
            norm.register_forward_hook(lambda mod, i, out: out * float("nan") if poison["on"] else None)
            poison["hooked"] = True
        poison["on"] = step == 2
        try:
            return real_eval(s, step, progress)
        finally:
            poison["on"] = False

    monkeypatch.setattr(fitting, "evaluate_during_training", evaluate_during_training)
    run = causal_lm.train(cfg)
    evals = {r["step"]: r["eval"]["loss"] for r in records(run.path) if "eval" in r and not r.get("final")}
    assert sorted(evals) == [2, 4, 6, 8] and evals[2] is None  # NaN is written as null
    assert all(math.isfinite(evals[k]) for k in (4, 6, 8))
    stopper = probe.s.books.stopper
    assert stopper.best_step in (4, 6, 8) and stopper.best == min(evals[k] for k in (4, 6, 8))
    final = json.loads((run / "eval.json").read_text())["finetuned"]["validation"]["loss"]
    assert final == pytest.approx(stopper.best, rel=1e-5)  # the restored weights are the best finite ones


# ------------------------------------------------------------------------------------------------ N4


def _update_norm(before: dict, after: dict) -> float:
    return math.sqrt(sum(float(((after["weights"][n] - w).double() ** 2).sum()) for n, w in before["weights"].items()))


def test_n4_exploding_loss_logs_the_pre_clip_norm_and_stays_finite(tmp_path, tiny_llama, monkeypatch):
    cfg = config_from_dict(rel_config(tmp_path, tiny_llama, max_steps=6, max_grad_norm=1.0))
    probe = Probe(monkeypatch, scale_loss_at=3)
    run = causal_lm.train(cfg)
    norms = {r["step"]: r["grad_norm"] for r in step_lines(run.path)}
    assert sorted(norms) == [1, 2, 3, 4, 5, 6]
    assert norms[3] > 1e3  # the norm before clipping, not the clipped 1.0
    assert all(1.0 < norms[k] < 100 for k in norms if k != 3)  # the others are ordinary (and also clipped)
    assert all(st["finite"] for st in probe.before.values()) and _state(probe.s)["finite"]
    assert not [r for r in records(run.path) if r.get("skipped")]  # a finite explosion is clipped, not skipped


@pytest.mark.parametrize("max_grad_norm", [1.0, None])
def test_n4_clipping_bounds_the_sgd_update(tmp_path, tiny_llama, monkeypatch, max_grad_norm):
    """Plain SGD (the optimizer swapped in): the exploding step moves the weights by at most lr * 1.0.
    Without clipping (the control) the same step moves them by orders of magnitude more, and the
    run then halts on non-finite steps."""
    lr = 1e-2
    cfg = config_from_dict(
        rel_config(
            tmp_path, tiny_llama, max_steps=4, lr=lr, warmup_steps=0, schedule="constant", max_grad_norm=max_grad_norm
        )
    )
    probe = Probe(monkeypatch, scale_loss_at=3, sgd=True)
    if max_grad_norm:
        causal_lm.train(cfg)
    else:
        with pytest.raises(TrainingHalted):
            causal_lm.train(cfg)
    run = probe.s.run
    assert isinstance(probe.s.optim.optimizer.optimizer, torch.optim.SGD)
    update = _update_norm(probe.before[3], probe.before[4])
    grad_norm = {r["step"]: r["grad_norm"] for r in step_lines(run.path)}[3]
    assert grad_norm > 1e3
    if max_grad_norm:
        assert 0.5 * lr < update <= lr * max_grad_norm + 1e-6
    else:
        assert update == pytest.approx(lr * grad_norm, rel=1e-3) and update > 100 * lr
