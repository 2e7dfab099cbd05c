"""The DP recipe as the privacy block's defaults (Li et al. 2021, Yu et al. 2021): what it sets, what an
explicit config keeps, and that the run samples its large expected batch in small micro-batches."""

from __future__ import annotations

import pytest
from conftest import instruction_rows, write_jsonl

from tunesmith.config import config_from_dict, stage_config
from tunesmith.config.guard_rails import RECIPE_BATCH, RECIPE_CLIP, RECIPE_TRAIN
from tunesmith.errors import DataError
from tunesmith.recipes import causal_lm
from tunesmith.rundir import RunDir


def config(train: dict | None = None, privacy: dict | None = None, **extra) -> dict:
    return {
        "data": {"train": "train.jsonl"},
        "train": train or {},
        "privacy": {"target_epsilon": 8, **(privacy or {})},
        **extra,
    }


def test_unset_train_keys_take_the_recipe_and_set_ones_are_kept():
    cfg = config_from_dict(config())
    assert (
        (cfg.train.lr, cfg.train.epochs, cfg.train.schedule) == (1e-3, 10.0, "linear") == tuple(RECIPE_TRAIN.values())
    )
    assert (cfg.privacy.expected_batch_size, cfg.privacy.max_grad_norm) == (RECIPE_BATCH, RECIPE_CLIP) == (1024, 0.1)
    assert cfg.privacy.applied == {
        "privacy.expected_batch_size": 1024,
        "train.lr": 1e-3,
        "train.epochs": 10.0,
        "train.schedule": "linear",
    }
    mine = config_from_dict(config(train={"lr": 5e-3, "schedule": "cosine"}))
    assert (mine.train.lr, mine.train.schedule, mine.train.epochs) == (5e-3, "cosine", 10.0)
    assert set(mine.privacy.applied) == {"privacy.expected_batch_size", "train.epochs"}
    plain = config_from_dict({k: v for k, v in config().items() if k != "privacy"})  # control: no DP, no recipe
    assert (plain.train.lr, plain.train.epochs, plain.train.schedule) == (2e-4, 1.0, "cosine")


def test_the_recipe_can_be_turned_off_and_its_adam_lr_is_not_given_to_sgd():
    off = config_from_dict(config(privacy={"recipe_defaults": False}))
    assert (off.train.lr, off.train.epochs, off.train.schedule) == (2e-4, 1.0, "cosine")
    assert off.privacy.applied == {"privacy.expected_batch_size": 1024}
    sgd = config_from_dict(config(train={"optimizer": "sgd"}))
    assert sgd.train.lr == 2e-4 and sgd.train.epochs == 10.0


def test_an_explicit_grad_accum_keeps_the_non_private_step_unless_the_batch_is_set_too():
    accum = config_from_dict(config(train={"batch_size": 4, "grad_accum": 2}))
    assert accum.privacy.expected_batch_size is None and "privacy.expected_batch_size" not in accum.privacy.applied
    both = config_from_dict(config(train={"grad_accum": 2}, privacy={"expected_batch_size": 64}))
    assert both.privacy.expected_batch_size == 64


def test_the_resolved_config_round_trips_and_a_non_private_stage_gets_no_recipe():
    cfg = config_from_dict(config(stages=[{"name": "warm", "data": {"train": "other.jsonl"}, "train": {"epochs": 2}}]))
    again = config_from_dict(cfg.model_dump(mode="json"))  # config.yaml of the run, read back on resume
    assert again.train == cfg.train and again.privacy.expected_batch_size == 1024
    stage = stage_config(cfg, 0)
    assert stage.privacy is None
    assert (stage.train.lr, stage.train.epochs, stage.train.schedule) == (2e-4, 2.0, "cosine")
    final = stage_config(cfg, 1)
    assert (final.train.lr, final.train.epochs, final.train.schedule) == (1e-3, 10.0, "linear")


@pytest.fixture
def small_run(tmp_path, tiny_llama):
    train = write_jsonl(tmp_path / "data" / "train.jsonl", instruction_rows(64))
    val = write_jsonl(tmp_path / "data" / "val.jsonl", instruction_rows(8, seed=1))
    return {
        "name": "recipe",
        "output_dir": str(tmp_path / "runs"),
        "model": {"name": str(tiny_llama)},
        "peft": {"method": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
        "data": {
            "train": str(train),
            "validation": str(val),
            "format": "instruction",
            "max_length": 128,
            "overlength": "drop",
        },
        "train": {"batch_size": 4},
        "eval": {"batch_size": 8, "max_new_tokens": 4, "samples": 0, "before_after": False},
        "privacy": {"target_epsilon": 8, "expected_batch_size": 32},
    }


def test_the_expected_batch_is_sampled_in_micro_batches_and_the_recipe_is_printed(small_run, capsys):
    cfg = config_from_dict(small_run)
    s = causal_lm.setup(cfg, RunDir.create(cfg, resume=False, overwrite=True))
    assert (
        s.optim.plan.sample_rate == 32 / 64 and s.optim.plan.steps_per_epoch == 2 and s.optim.total_steps == 20
    )  # 10 epochs
    sizes = [[len(m) for m in s.optim.plan.micro_batches(k)] for k in range(20)]
    assert all(n <= 4 for step in sizes for n in step)  # memory: micro-batches of train.batch_size
    assert 28 <= sum(map(sum, sizes)) / 20 <= 36  # about 32 rows a step
    out = capsys.readouterr()
    printed = out.out + out.err
    assert "DP recipe" in printed and "train.lr 0.001" in printed and "train.schedule linear" in printed
    assert "32 samples per step expected, in micro-batches of 4 rows" in printed


def test_an_expected_batch_larger_than_the_data_is_refused_before_the_model_loads(small_run, monkeypatch):
    from tunesmith import models

    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: pytest.fail("the model was loaded"))
    del small_run["privacy"]["expected_batch_size"]  # the recipe's 1,024 on 64 rows
    cfg = config_from_dict(small_run)
    with pytest.raises(DataError) as err:
        causal_lm.setup(cfg, RunDir.create(cfg, resume=False, overwrite=True))
    assert "1,024 expected rows" in err.value.title and "64 training rows" in err.value.title
