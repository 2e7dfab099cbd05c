"""`tunesmith config keys` lists every key of the schema; `tunesmith config show` prints the resolved config."""

from __future__ import annotations

import typing

import pytest
import yaml
from _cli import invoke_cli
from conftest import write_config
from pydantic import BaseModel

from tunesmith.config import Config


def sections(model: type[BaseModel], seen: dict | None = None) -> dict[str, type[BaseModel]]:
    """Every config section class reachable from `model` (found independently of config/keys.py)."""
    seen = {} if seen is None else seen
    seen[model.__name__] = model
    for field in model.model_fields.values():
        stack = [field.annotation]
        while stack:
            ann = stack.pop()
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                if ann.__name__ not in seen:
                    sections(ann, seen)
            else:
                stack.extend(typing.get_args(ann))
    return seen


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture
def listing() -> str:
    res = invoke_cli("config", "keys")
    assert res.returncode == 0
    return res.stdout


def test_every_leaf_field_is_listed_with_its_description(listing):
    found = sections(Config)
    # The guard-rail and search sections are in the walk too, not only the top-level ones.
    assert {"Privacy", "Retention", "RetentionSet", "Replay", "SearchConfig", "Dist", "EarlyStopping"} <= set(found)
    missing = []
    for name, model in found.items():
        for key, field in model.model_fields.items():
            annotations = (field.annotation, *typing.get_args(field.annotation))
            if any(isinstance(a, type) and issubclass(a, BaseModel) for a in annotations):
                continue  # a section: its own fields are checked
            if not field.description:
                missing.append(f"{name}.{key}: no description in the schema")
            elif flat(field.description) not in flat(listing):
                missing.append(f"{name}.{key}: description not listed")
    assert not missing, missing


def entry(listing: str, path: str) -> str:
    """The listing's entry for one dotted key: its head line and its description, joined."""
    lines = listing.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split("  ")[0] == path)
    end = next((j for j in range(start + 1, len(lines)) if not lines[j].startswith(" ")), len(lines))
    return flat(" ".join(lines[start:end]))


def test_nested_keys_appear_with_type_default_and_description(listing):
    assert entry(listing, "train.lr") == "train.lr (float, > 0, < 1; default 0.0002) Peak learning rate."
    max_length = entry(listing, "data.max_length")
    assert max_length.startswith("data.max_length (int, >= 8, <= 1048576; default 1024) Maximum tokens per row")
    assert entry(listing, "data.train").startswith("data.train (str; required) Training data:")
    assert "(float | null; default null)" in entry(listing, "privacy.target_epsilon")
    assert "(prv | rdp; default prv)" in entry(listing, "privacy.accountant")
    assert "(str; required) Label in tables" in entry(listing, "retention.sets[].name")
    assert "(list[float] | null; default null)" in entry(listing, "search.space.<key>.log_uniform")
    assert "(int, >= 1; default 20)" in entry(listing, "search.heartbeat_s")
    assert "(int | null, >= 1; default null)" in entry(listing, "train.early_stopping.patience")
    # A section already listed under another path is named, not repeated key by key.
    assert "same keys as data" in entry(listing, "stages[].data")
    assert not any(line.startswith("stages[].data.") for line in listing.splitlines())


def test_config_show_prints_the_resolved_config(tiny_config, tmp_path):
    path = write_config(tmp_path, tiny_config)
    res = invoke_cli("config", "show", path, "train.lr=0.001", "seed=3")
    assert res.returncode == 0
    shown = yaml.safe_load(res.stdout)
    assert shown["train"]["lr"] == 0.001 and shown["seed"] == 3
    assert shown["train"]["schedule"] == "cosine" and shown["retention"]["l2sp"] == 0.0  # defaults filled in
    res = invoke_cli("config", "show", path, "train.lrr=1")
    assert res.returncode == 2
    assert "train.lrr: unknown key" in res.stderr


def test_every_section_refuses_unknown_keys_and_inf_nan():
    # The search schema once sat on plain BaseModel and took `uniform: [1e-5, .inf]`; every section is strict now.
    loose = [
        name
        for name, model in sections(Config).items()
        if model.model_config.get("extra") != "forbid" or model.model_config.get("allow_inf_nan") is not False
    ]
    assert loose == []
