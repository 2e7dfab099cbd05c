"""R1-R5 of docs RELIABILITY.md section 1: exact resume, data order, partial accumulation windows,
complete-state-or-refuse and config drift.

Crashes are real: the run SIGKILLs itself from inside (tests/reliability/_harness.py RUNNER) and the
resume is a fresh `tunesmith train --resume` process. Refusals (R4, R5) run `tunesmith.cli.main()`
in this process (tests/_cli.py invoke_cli), which is the same code path without the import cost.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cli import invoke_cli  # noqa: E402
from _harness import (  # noqa: E402
    adapter,
    assert_tensors_equal,
    checkpoint_steps,
    cli,
    killed,
    leftovers,
    records,
    rel_config,
    row_log,
    says,
    step_lines,
    write_config,
    write_jsonl,
)
from safetensors.torch import load_file  # noqa: E402

from tunesmith.recipes.state import REQUIRED  # noqa: E402
from tunesmith.training import checkpoint as ckpt  # noqa: E402
from tunesmith.training.plan import ShuffledPlan  # noqa: E402

torch.set_num_threads(1)

LOGGED = ("step", "epoch", "loss", "lr", "grad_norm", "tokens")  # everything but wall-clock fields


def _logged(lines: list[dict]) -> list[tuple]:
    return [tuple(r[k] for k in LOGGED) for r in lines]


def _by_data_step(rows: list[dict]) -> dict[int, list[list[str]]]:
    out: dict[int, list[list[str]]] = {}
    for r in rows:
        out.setdefault(r["data_step"], []).append(r["ids"])
    return out


def _checkpoint_snapshot(run: Path, step: int) -> dict:
    d = run / "checkpoints" / f"step-{step}"
    names = ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors")
    return {
        "manifest": json.loads((d / "manifest.json").read_text()),
        "state": json.loads((d / "state.json").read_text()),
        "tensors": {f: load_file(str(d / f)) for f in names},
    }


# --------------------------------------------------------------------------------------------- R1 / R2


@pytest.fixture(scope="module")
def r1(tmp_path_factory, tiny_llama):
    """A: uninterrupted. B: SIGKILL right after update 13, then --resume in a fresh process.
    C (control): the same crash, resumed with the RNG restore disabled."""
    tmp = tmp_path_factory.mktemp("r1")
    cfg = write_config(tmp, rel_config(tmp, tiny_llama, max_steps=24, save_every=5))  # 8 steps/epoch: 3 epochs
    runs = tmp / "runs"
    ns = SimpleNamespace(tmp=tmp, cfg=cfg, a=runs / "A", b=runs / "B")
    ns.res_a = cli("train", cfg, "name=A", fault={"record_rows": str(tmp / "rows-A.jsonl")})
    ns.res_b1 = cli("train", cfg, "name=B", fault={"record_rows": str(tmp / "rows-B1.jsonl"), "kill_after_step": 13})
    ns.after_kill = SimpleNamespace(
        ckpts=checkpoint_steps(ns.b),
        lines=step_lines(ns.b),
        leftovers=leftovers(ns.b),
        step10=json.loads((ns.b / "checkpoints/step-10/state.json").read_text())
        if (ns.b / "checkpoints/step-10/state.json").exists()
        else None,
    )
    control_root = tmp / "control-runs"
    shutil.copytree(runs / "B", control_root / "B")
    ns.res_b2 = cli("train", cfg, "name=B", "--resume", fault={"record_rows": str(tmp / "rows-B2.jsonl")})
    ns.res_c = cli(
        "train",
        cfg,
        "name=B",
        f"output_dir={control_root}",
        "--resume",
        "--allow-drift",
        fault={"skip_rng_restore": True},
    )
    ns.c = control_root / "B"
    return ns


def test_r1_resume_after_sigkill_is_bit_exact(r1):
    assert r1.res_a.returncode == 0, r1.res_a.stderr[-3000:]
    assert killed(r1.res_b1), (r1.res_b1.returncode, r1.res_b1.stderr[-3000:])
    # The kill came right after update 13: its metrics line was written, nothing after it.
    assert [r["step"] for r in r1.after_kill.lines] == list(range(1, 14))
    assert r1.after_kill.ckpts == [5, 10] and r1.after_kill.leftovers == []
    # step-10 is mid-epoch in the second epoch (8 steps per epoch).
    assert r1.after_kill.step10 is not None
    step10 = r1.after_kill.step10
    assert (step10["step"], step10["data_step"], step10["epoch"]) == (10, 10, 1)

    assert r1.res_b2.returncode == 0, r1.res_b2.stderr[-3000:]
    assert "Resumed from" in r1.res_b2.stderr and says(r1.res_b2.stderr, "step-10 (step 10 of 24)")

    assert_tensors_equal(adapter(r1.b), adapter(r1.a))

    a_lines, b_lines = step_lines(r1.a), step_lines(r1.b)
    assert [r["step"] for r in b_lines] == list(range(1, 25))  # steps 11-13 were truncated, then relogged once
    assert _logged(b_lines[10:]) == _logged(a_lines[10:])  # loss, lr, grad_norm from step 11 on: exactly equal
    assert _logged(b_lines) == _logged(a_lines)
    assert len({r["lr"] for r in a_lines}) > 20  # warmup + cosine: the lr really changes every step

    # The checkpoints written after the resume are the ones A wrote: same bytes (manifest hashes), same state.
    assert checkpoint_steps(r1.a) == checkpoint_steps(r1.b) == [15, 20]
    for step in (15, 20):
        a, b = _checkpoint_snapshot(r1.a, step), _checkpoint_snapshot(r1.b, step)
        assert a["state"] == b["state"]
        assert a["manifest"] == b["manifest"]
        for name in a["tensors"]:
            assert_tensors_equal(a["tensors"][name], b["tensors"][name])


def test_r1_control_without_the_rng_restore_the_resume_differs(r1):
    """Dropout 0.1 draws random numbers: if the resume did not restore them, R1 would catch it."""
    assert r1.res_c.returncode == 0, r1.res_c.stderr[-3000:]
    assert says(r1.res_c.stderr, "step-10 (step 10 of 24)")
    a, c = adapter(r1.a), adapter(r1.c)
    assert any(not torch.equal(a[n], c[n]) for n in a)
    assert _logged(step_lines(r1.c))[:10] == _logged(step_lines(r1.a))[:10]
    assert step_lines(r1.c)[10]["loss"] != step_lines(r1.a)[10]["loss"]


def test_r2_rows_consumed_per_step_match_after_the_resume(r1):
    a = _by_data_step(row_log(r1.tmp / "rows-A.jsonl"))
    b1 = _by_data_step(row_log(r1.tmp / "rows-B1.jsonl"))
    b2 = _by_data_step(row_log(r1.tmp / "rows-B2.jsonl"))
    assert sorted(a) == list(range(1, 25)) and all(len(m) == 2 for m in a.values())  # GA=2: 2 micro-batches a step
    assert sorted(b1) == list(range(1, 14))  # killed after data step 13
    assert sorted(b2) == list(range(11, 25))  # the resume starts at data step 11: nothing skipped, nothing earlier
    stream_b = {**{k: v for k, v in b1.items() if k <= 10}, **b2}
    assert stream_b == a
    assert {k: b1[k] for k in (11, 12, 13)} == {k: b2[k] for k in (11, 12, 13)}  # lost steps replayed as they were

    plan = ShuffledPlan(64, 4, 2, seed=0)
    assert a == {k: [[f"r{i}" for i in mb] for mb in plan.micro_batches(k - 1)] for k in a}
    epochs = [[i for k in range(8 * e + 1, 8 * e + 9) for mb in a[k] for i in mb] for e in range(3)]
    for order in epochs:
        assert Counter(order) == Counter(f"r{i}" for i in range(64))  # every row exactly once per epoch
    assert epochs[1] != epochs[0] and epochs[2] != epochs[0]  # reshuffled every epoch


PLANS = [(64, 4, 2), (50, 4, 2), (7, 3, 1), (100, 8, 4), (33, 2, 3)]


@pytest.mark.parametrize("n_rows,batch,ga", PLANS)
def test_r2_plan_covers_each_row_once_per_epoch_and_reshuffles(n_rows, batch, ga):
    plan = ShuffledPlan(n_rows, batch, ga, seed=0)
    spe = plan.steps_per_epoch
    orders = []
    for epoch in range(4):
        order = []
        for step in range(epoch * spe, (epoch + 1) * spe):
            mbs = plan.micro_batches(step)
            assert 1 <= len(mbs) <= ga and all(1 <= len(m) <= batch for m in mbs)
            assert plan.epoch_of(step) == epoch
            order += [i for m in mbs for i in m]
        assert sorted(order) == list(range(n_rows)), f"epoch {epoch} does not cover every row exactly once"
        orders.append(order)
    assert all(o != orders[0] for o in orders[1:])
    assert ShuffledPlan(n_rows, batch, ga, seed=1).epoch_order(0) != orders[0]  # the seed matters


@pytest.mark.parametrize("n_rows,batch,ga", PLANS)
def test_r2_plan_is_a_pure_function_of_the_step(n_rows, batch, ga):
    steps = range(4 * ShuffledPlan(n_rows, batch, ga, seed=3).steps_per_epoch)
    continued = ShuffledPlan(n_rows, batch, ga, seed=3)
    stream = [continued.micro_batches(k) for k in steps]
    for k in steps:  # a fresh plan (a resumed process) asked for step k gives the same rows
        assert ShuffledPlan(n_rows, batch, ga, seed=3).micro_batches(k) == stream[k]
    jumping = ShuffledPlan(n_rows, batch, ga, seed=3)
    for k in [len(stream) - 1, 0, len(stream) // 2, 1, len(stream) - 1]:  # cache thrash across epochs
        assert jumping.micro_batches(k) == stream[k]


@pytest.mark.parametrize("n_rows", [64, 66, 80])
def test_r2_plan_shards_each_step_across_ranks(n_rows):
    plans = [ShuffledPlan(n_rows, 4, 2, seed=0, world_size=2, rank=r) for r in range(2)]
    for step in range(2 * plans[0].steps_per_epoch):
        mine = [[i for m in p.micro_batches(step) for i in m] for p in plans]
        assert not set(mine[0]) & set(mine[1])
        assert mine[0] + mine[1] == plans[0].step_rows(step)


def test_r2_a_short_last_step_may_leave_a_rank_without_rows():
    """65 rows, 16 per step: the last step has 1 row, so rank 1 gets none. fit() then runs a
    zero-weight pass on that rank so DDP's collectives stay matched (tests/reliability/test_distributed.py)."""
    plans = [ShuffledPlan(65, 4, 2, seed=0, world_size=2, rank=r) for r in range(2)]
    last = plans[0].steps_per_epoch - 1
    assert [len([i for m in p.micro_batches(last) for i in m]) for p in plans] == [1, 0]


# ------------------------------------------------------------------------------------------------ R3


def test_r3_kill_inside_an_accumulation_window(tmp_path, tiny_llama):
    """GA=4: SIGKILL after micro-batch 1 of update 8 (micro-batch 30 is about to be collated)."""
    cfg = write_config(tmp_path, rel_config(tmp_path, tiny_llama, grad_accum=4, max_steps=12, save_every=3))
    runs = tmp_path / "runs"
    res_a = cli("train", cfg, "name=A", fault={"record_rows": str(tmp_path / "rows-A.jsonl")})
    assert res_a.returncode == 0, res_a.stderr[-3000:]
    res_b1 = cli("train", cfg, "name=B", fault={"record_rows": str(tmp_path / "rows-B1.jsonl"), "kill_on_collate": 30})
    assert killed(res_b1), (res_b1.returncode, res_b1.stderr[-3000:])

    b1 = row_log(tmp_path / "rows-B1.jsonl")
    assert len(b1) == 29 and b1[-1]["data_step"] == 8  # 7 full windows of 4, then 1 micro-batch of the 8th
    assert [r["step"] for r in step_lines(runs / "B")] == list(range(1, 8))
    # Checkpoints exist only at update boundaries: complete windows, optimizer stepped exactly `step` times.
    assert checkpoint_steps(runs / "B") == [3, 6] and leftovers(runs / "B") == []
    for step in (3, 6):
        path = runs / "B" / "checkpoints" / f"step-{step}"
        ckpt.verify(path, REQUIRED)
        state = json.loads((path / "state.json").read_text())
        assert state["step"] == state["data_step"] == step
        adam_steps = {v for k, v in state["optimizer"]["scalars"].items() if k.endswith(".step")}
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
        adam_steps |= {float(t) for k, t in opt_tensors.items() if k.endswith(".step")}
        assert adam_steps == {float(step)}

    res_b2 = cli("train", cfg, "name=B", "--resume", fault={"record_rows": str(tmp_path / "rows-B2.jsonl")})
    assert res_b2.returncode == 0, res_b2.stderr[-3000:]
    assert says(res_b2.stderr, "step-6 (step 6 of 12)")
    a, b2 = row_log(tmp_path / "rows-A.jsonl"), row_log(tmp_path / "rows-B2.jsonl")
    assert len(a) == 48
    assert b2[:5] == b1[24:29]  # exactly the lost micro-batches (window 7 and the first of window 8) again
    assert b1[:24] + b2 == a
    assert_tensors_equal(adapter(runs / "B"), adapter(runs / "A"))
    assert _logged(step_lines(runs / "B")) == _logged(step_lines(runs / "A"))


# ------------------------------------------------------------------------------------------------ R4


@pytest.fixture(scope="module")
def one_checkpoint(tmp_path_factory, tiny_llama):
    """A run of 3 updates whose only checkpoint is step-3; resumed below with max_steps=6."""
    tmp = tmp_path_factory.mktemp("r4")
    cfg = write_config(tmp, rel_config(tmp, tiny_llama, max_steps=3, save_every=3))
    assert invoke_cli("train", cfg).returncode == 0
    run = tmp / "runs" / "rel"
    pristine = tmp / "pristine"
    shutil.copytree(run, pristine)
    return SimpleNamespace(cfg=cfg, run=run, pristine=pristine)


def _restore(fx) -> None:
    shutil.rmtree(fx.run)
    shutil.copytree(fx.pristine, fx.run)


@pytest.mark.parametrize(
    "piece", ["trainable.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json", "manifest.json"]
)
def test_r4_resume_refuses_a_checkpoint_missing_a_piece(one_checkpoint, piece):
    fx = one_checkpoint
    _restore(fx)
    (fx.run / "checkpoints" / "step-3" / piece).unlink()
    metrics_before = (fx.run / "metrics.jsonl").read_bytes()
    res = invoke_cli("train", fx.cfg, "--resume", "train.max_steps=6")
    code, err = res.returncode, res.stderr
    assert code == 2, err
    assert "Refusing to resume" in err and "step-3" in err and f"missing {piece}" in err
    assert "--fallback" in err
    assert (fx.run / "metrics.jsonl").read_bytes() == metrics_before  # not one step trained
    assert checkpoint_steps(fx.run) == [3] and leftovers(fx.run) == []


def test_r4_control_the_intact_checkpoint_resumes(one_checkpoint):
    fx = one_checkpoint
    _restore(fx)
    res = invoke_cli("train", fx.cfg, "--resume", "train.max_steps=6")
    assert res.returncode == 0, res.stderr
    assert [r["step"] for r in step_lines(fx.run)] == [1, 2, 3, 4, 5, 6]


def test_r4_refused_resume_leaves_run_json_as_it_was(one_checkpoint):
    """At 516e0f2 run.json was set to 'running' (and 'started' rewritten) before the checkpoint was checked."""
    fx = one_checkpoint
    _restore(fx)
    before = json.loads((fx.run / "run.json").read_text())
    (fx.run / "checkpoints" / "step-3" / "rng.safetensors").unlink()
    assert invoke_cli("train", fx.cfg, "--resume", "train.max_steps=6").returncode == 2
    assert json.loads((fx.run / "run.json").read_text()) == before


def test_r4_resume_without_any_checkpoint_does_not_duplicate_the_log(one_checkpoint):
    """Nothing to continue from: the resume starts over from step 0 (and says so), logging each step once."""
    fx = one_checkpoint
    _restore(fx)
    shutil.rmtree(fx.run / "checkpoints")  # e.g. killed before its first save
    res = invoke_cli("train", fx.cfg, "--resume", "train.max_steps=6")
    code, out = res.returncode, res.stdout + res.stderr
    assert code == 0, out
    assert says(out, "No usable checkpoint: training starts from step 0.")
    assert [r["step"] for r in step_lines(fx.run)] == [1, 2, 3, 4, 5, 6]


def test_r4_rotation_never_deletes_the_checkpoint_just_committed(tmp_path, tiny_llama, monkeypatch):
    """save_total_limit=1; the only checkpoint (step-6) is corrupt; --fallback starts over. Each new save
    must survive its own rotation, or a crash now leaves nothing but the corrupt step-6."""
    cfg = write_config(tmp_path, rel_config(tmp_path, tiny_llama, max_steps=6, save_every=2, save_total_limit=1))
    assert invoke_cli("train", cfg).returncode == 0
    run = tmp_path / "runs" / "rel"
    rng = run / "checkpoints" / "step-6" / "rng.safetensors"
    rng.write_bytes(rng.read_bytes()[:-8])
    real_save, kept = ckpt.write_checkpoint, {}

    def write_checkpoint(root, step, *args, **kwargs):
        final = real_save(root, step, *args, **kwargs)
        kept[step] = checkpoint_steps(run)
        return final

    monkeypatch.setattr(ckpt, "write_checkpoint", write_checkpoint)
    assert invoke_cli("train", cfg, "--resume", "--fallback", "train.max_steps=8").returncode == 0
    assert all(step in steps for step, steps in kept.items()), kept


# ------------------------------------------------------------------------------------------------ R5

DRIFTS = [
    ("train.batch_size=2", "train.batch_size"),
    ("train.grad_accum=4", "train.grad_accum"),
    ("train.lr=0.05", "train.lr"),
    ("peft.r=8", "peft.r"),
    ("peft.target_modules=[q_proj,v_proj]", "peft.target_modules"),
]


@pytest.mark.parametrize("override,key", DRIFTS)
def test_r5_resume_refuses_each_changed_setting(one_checkpoint, override, key):
    fx = one_checkpoint
    _restore(fx)
    metrics_before = (fx.run / "metrics.jsonl").read_bytes()
    res = invoke_cli("train", fx.cfg, "--resume", "train.max_steps=6", override)
    code, err = res.returncode, res.stderr
    assert code == 2, err
    assert "the configuration changed" in err and "--allow-drift" in err
    listed = [ln.strip()[2:] for ln in err.splitlines() if ln.strip().startswith("- ")]
    assert len(listed) == 1 and listed[0].startswith(f"{key}: "), listed  # max_steps is harmless: not listed
    assert (fx.run / "metrics.jsonl").read_bytes() == metrics_before


def test_r5_resume_names_every_changed_setting_at_once(one_checkpoint):
    fx = one_checkpoint
    _restore(fx)
    res = invoke_cli("train", fx.cfg, "--resume", *(o for o, _ in DRIFTS))
    code, err = res.returncode, res.stderr
    assert code == 2
    listed = sorted(ln.strip()[2:].split(":")[0] for ln in err.splitlines() if ln.strip().startswith("- "))
    assert listed == sorted(k for _, k in DRIFTS)


def _change_training_file(cfg_path: Path) -> None:
    import yaml

    train = Path(yaml.safe_load(cfg_path.read_text())["data"]["train"])
    rows = [json.loads(x) for x in train.read_text().splitlines()]
    rows[5]["output"] = "seven"
    write_jsonl(train, rows)


def test_r5_resume_refuses_a_changed_training_file(tmp_path, tiny_llama):
    cfg = write_config(tmp_path, rel_config(tmp_path, tiny_llama, max_steps=3, save_every=3))
    assert invoke_cli("train", cfg).returncode == 0
    run = tmp_path / "runs" / "rel"
    metrics_before = (run / "metrics.jsonl").read_bytes()
    _change_training_file(cfg)
    res = invoke_cli("train", cfg, "--resume", "train.max_steps=6")
    code, err = res.returncode, res.stderr
    assert code == 2, err
    assert "data changed" in err and "dataset fingerprint" in err and "--allow-drift" in err
    assert (run / "metrics.jsonl").read_bytes() == metrics_before


def test_r5_refused_data_change_leaves_run_json_as_it_was(tmp_path, tiny_llama):
    cfg = write_config(tmp_path, rel_config(tmp_path, tiny_llama, max_steps=3, save_every=3))
    assert invoke_cli("train", cfg).returncode == 0
    run = tmp_path / "runs" / "rel"
    before = json.loads((run / "run.json").read_text())
    _change_training_file(cfg)
    assert invoke_cli("train", cfg, "--resume", "train.max_steps=6").returncode == 2
    assert json.loads((run / "run.json").read_text()) == before


def test_r5_allow_drift_proceeds_and_records_the_drift(tmp_path, tiny_llama):
    cfg = write_config(tmp_path, rel_config(tmp_path, tiny_llama, max_steps=3, save_every=3))
    assert invoke_cli("train", cfg).returncode == 0
    run = tmp_path / "runs" / "rel"
    _change_training_file(cfg)
    overrides = ("train.batch_size=2", "train.grad_accum=4", "train.lr=0.05")
    res = invoke_cli("train", cfg, "--resume", "--allow-drift", "train.max_steps=6", *overrides)
    code, err = res.returncode, res.stderr
    assert code == 0, err
    assert says(err, "step-3 (step 3 of 6)")
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and info["steps"] == 6
    drift = info["drift"]
    changed = sorted(d.split(":")[0] for d in drift if not d.startswith("dataset"))
    assert changed == sorted(o.split("=")[0] for o in overrides)
    assert any(d.startswith("dataset fingerprint ") for d in drift)
    assert [r["step"] for r in step_lines(run)] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    "override,problem", [("peft.r=8", "(8, 32) in the model"), ("peft.target_modules=[q_proj,v_proj]", "unexpected ")]
)
def test_r5_allow_drift_with_a_changed_adapter_shape_fails_cleanly(tmp_path, tiny_llama, override, problem):
    """At 516e0f2 these crashed in state.load_trainable with a RuntimeError (shape) or KeyError (extra
    tensor): a traceback and exit 1 instead of a UserError."""
    cfg = write_config(tmp_path, rel_config(tmp_path, tiny_llama, max_steps=3, save_every=3))
    assert invoke_cli("train", cfg).returncode == 0
    metrics_before = (tmp_path / "runs" / "rel" / "metrics.jsonl").read_bytes()
    try:
        res = invoke_cli("train", cfg, "--resume", "--allow-drift", "train.max_steps=6", override)
    except (RuntimeError, KeyError, ValueError) as exc:  # what the CLI would print as a traceback
        pytest.fail(f"uncaught {type(exc).__name__}: {exc}")
    code, err = res.returncode, res.stderr
    assert code == 2, err
    assert "trainable.safetensors do not match the model" in err and problem in err
    assert (tmp_path / "runs" / "rel" / "metrics.jsonl").read_bytes() == metrics_before


def test_r5_allow_drift_lr_applies_from_the_first_resumed_update(tmp_path, tiny_llama):
    cfg = write_config(
        tmp_path, rel_config(tmp_path, tiny_llama, max_steps=3, save_every=3, warmup_steps=0, schedule="constant")
    )
    assert invoke_cli("train", cfg).returncode == 0
    assert invoke_cli("train", cfg, "--resume", "--allow-drift", "train.max_steps=6", "train.lr=0.05").returncode == 0
    lrs = {r["step"]: r["lr"] for r in step_lines(tmp_path / "runs" / "rel")}
    assert [lrs[s] for s in (1, 2, 3)] == [0.01] * 3
    assert [lrs[s] for s in (4, 5, 6)] == [0.05] * 3


# ------------------------------------------------------------------------------------ resume + skipped steps


def test_resume_does_not_duplicate_skipped_step_records(tmp_path, tiny_llama):
    """Data step 5 is non-finite right after the step-4 checkpoint; the run dies at update 6 and resumes."""
    cfg = write_config(tmp_path, rel_config(tmp_path, tiny_llama, max_steps=8, save_every=4))
    res = cli("train", cfg, fault={"nan_data_steps": [5], "kill_after_step": 6})
    assert killed(res), res.stderr[-2000:]
    res = cli("train", cfg, "--resume", fault={"nan_data_steps": [5]})
    assert res.returncode == 0, res.stderr[-2000:]
    run = tmp_path / "runs" / "rel"
    skipped = [r["data_step"] for r in records(run) if r.get("skipped")]
    assert json.loads((run / "eval.json").read_text())["training"]["skipped_nonfinite"] == 1
    assert skipped == [5]
