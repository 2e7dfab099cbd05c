"""Limits checked before any weights load: an optimizer step larger than the training set, and
data.max_length's cap."""

from __future__ import annotations

import pytest
from conftest import instruction_rows, write_jsonl

from tunesmith.config import config_from_dict
from tunesmith.errors import ConfigError, DataError, UserError


def cfg_of(train, fmt: str = "instruction", train_section: dict | None = None, **data):
    return config_from_dict(
        {"train": train_section or {"batch_size": 2}, "data": {"train": str(train), "format": fmt, **data}}
    )


def labelled(n: int, prefix: str = "t") -> list[dict]:
    return [{"text": f"{prefix} text {i}", "label": ("neg", "pos")[i % 2]} for i in range(n)]


@pytest.mark.parametrize("fmt", ["instruction", "classification"])
def test_step_larger_than_training_set_refused_before_the_model(tmp_path, fmt):
    from tunesmith.recipes import recipe_for

    rows = instruction_rows(32) if fmt == "instruction" else labelled(32)
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    val_rows = instruction_rows(4, seed=9) if fmt == "instruction" else labelled(4, prefix="v")
    val = write_jsonl(tmp_path / "val.jsonl", val_rows)
    for section in ({"batch_size": 1000000}, {"batch_size": 4, "grad_accum": 1000000}):
        cfg = cfg_of(path, fmt, validation=str(val), train_section=section)
        cfg.model.name = str(tmp_path / "no-such-model")  # loading any model would fail differently
        with pytest.raises(DataError) as info:
            recipe_for(cfg).setup(cfg, None)
        assert "larger than the 32 training rows" in info.value.title
        assert "batch_size" in info.value.hint
    cfg = cfg_of(path, fmt, validation=str(val), train_section={"batch_size": 8, "grad_accum": 4})
    cfg.model.name = str(tmp_path / "no-such-model")
    with pytest.raises(UserError) as info:  # a step of exactly the 32 rows passes on to the model
        recipe_for(cfg).setup(cfg, None)
    assert "larger than" not in str(info.value)


def test_max_length_is_bounded(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", instruction_rows(8))
    for too_long in (1e9, 1048577):
        with pytest.raises(ConfigError) as info:
            cfg_of(path, max_length=too_long)
        assert "data.max_length" in str(info.value) and "1048576" in str(info.value)
    assert cfg_of(path, max_length=1048576).data.max_length == 1048576
