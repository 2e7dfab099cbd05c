"""A hub dataset (or saved DatasetDict) read per split: train, validation and test each from their own
split, never all from train. `datasets.load_dataset` is monkeypatched: no network."""

from __future__ import annotations

import pytest
from conftest import instruction_rows

from tunesmith.config import config_from_dict
from tunesmith.data.prepare import load_examples
from tunesmith.errors import ConfigError


@pytest.fixture
def fake_hub(monkeypatch):
    """datasets.load_dataset answering from memory: split name -> rows (ids carry the split name)."""
    import datasets

    calls = []
    store = {
        name: [dict(r, id=f"{name}-{i}") for i, r in enumerate(instruction_rows(n, seed=len(name)))]
        for name, n in (("train", 30), ("validation", 6), ("test", 5), ("dev", 4))
    }

    def load_dataset(path, split=None, **kwargs):
        calls.append((path, split))
        if split not in store:
            raise ValueError(f"Unknown split {split!r}")
        return datasets.Dataset.from_list(store[split])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def hub_cfg(**data):
    return config_from_dict({"train": {"batch_size": 2}, "data": {"train": "org/ds", "format": "instruction", **data}})


def _prefixes(ex) -> dict[str, set[str]]:
    return {name: {e.id.split("-")[0] for e in rows} for name, rows in ex.splits.items()}


def test_hub_validation_and_test_read_their_own_splits(fake_hub):
    ex = load_examples(hub_cfg(validation="org/ds", test="org/ds"))
    assert fake_hub == [("org/ds", "train"), ("org/ds", "validation"), ("org/ds", "test")]
    assert _prefixes(ex) == {"train": {"train"}, "validation": {"validation"}, "test": {"test"}}
    assert ex.report["rows"] == {"train": 30, "validation": 6, "test": 5}


def test_hub_splits_map_names(fake_hub):
    ex = load_examples(hub_cfg(validation="org/ds", hub_splits={"validation": "dev"}))
    assert fake_hub == [("org/ds", "train"), ("org/ds", "dev")]
    assert _prefixes(ex)["validation"] == {"dev"}
    # hub_split still names the train split (backward compatible) ...
    fake_hub.clear()
    load_examples(hub_cfg(validation="org/ds", hub_split="test"))
    assert fake_hub == [("org/ds", "test"), ("org/ds", "validation")]
    # ... and may not contradict hub_splits.train.
    with pytest.raises(ConfigError) as info:
        hub_cfg(hub_split="test", hub_splits={"train": "dev"})
    assert "hub_splits" in str(info.value)
    with pytest.raises(ConfigError):
        hub_cfg(hub_splits={"valid": "dev"})


def test_saved_dataset_dict_reads_split_per_source(tmp_path):
    import datasets

    parts = {"train": 20, "validation": 3}
    datasets.DatasetDict(
        {
            name: datasets.Dataset.from_list(
                [dict(r, id=f"{name}-{i}") for i, r in enumerate(instruction_rows(n, seed=len(name)))]
            )
            for name, n in parts.items()
        }
    ).save_to_disk(tmp_path / "dd")
    ex = load_examples(hub_cfg(train=str(tmp_path / "dd"), validation=str(tmp_path / "dd")))
    assert _prefixes(ex) == {"train": {"train"}, "validation": {"validation"}}
