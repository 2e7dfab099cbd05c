"""The run configuration: YAML + dotted overrides -> a validated pydantic Config, every problem at once."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from _cli import run_cli

from tunesmith.config import config_from_dict, load_config, parse_overrides
from tunesmith.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
HEX40 = "0123456789abcdef0123456789abcdef01234567"


def write_yaml(tmp_path: Path, tree, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree))
    return path


def minimal(**extra) -> dict:
    return {"data": {"train": "train.jsonl", "format": "instruction"}, **extra}


# --- overrides ---------------------------------------------------------------------------------------


def test_parse_overrides_yaml_types():
    parsed = dict(
        parse_overrides(["peft.r=8", "data.dedup=false", "train.lr=0.0001", "name=my-run", "data.system_prompt="])
    )
    assert parsed["peft.r"] == 8 and type(parsed["peft.r"]) is int
    assert parsed["data.dedup"] is False
    assert parsed["train.lr"] == pytest.approx(1e-4) and type(parsed["train.lr"]) is float
    assert parsed["name"] == "my-run"
    assert parsed["data.system_prompt"] == ""


def test_parse_overrides_keeps_equals_in_value():
    assert parse_overrides(["data.system_prompt=a=b"]) == [("data.system_prompt", "a=b")]


def test_overrides_apply_over_yaml_with_types(tmp_path):
    path = write_yaml(tmp_path, minimal(peft={"r": 4}, train={"lr": 0.5}))
    cfg = load_config(path, ["train.lr=1e-4", "peft.r=8", "data.dedup=false"])
    assert type(cfg.train.lr) is float and cfg.train.lr == pytest.approx(1e-4)
    assert type(cfg.peft.r) is int and cfg.peft.r == 8
    assert cfg.data.dedup is False
    # Untouched values keep the YAML's or the defaults.
    assert cfg.data.train == "train.jsonl"
    assert cfg.data.on_error == "error"


def test_overrides_create_nested_sections(tmp_path):
    path = write_yaml(tmp_path, minimal())
    cfg = load_config(path, ["data.columns.output=response", "train.early_stopping.patience=3"])
    assert cfg.data.columns == {"output": "response"}
    assert cfg.train.early_stopping.patience == 3


def test_overrides_without_file():
    cfg = load_config(None, ["data.train=t.jsonl", "seed=7"])
    assert cfg.data.train == "t.jsonl" and cfg.seed == 7


@pytest.mark.parametrize("bad", ["train.lr", "=1", "train..lr=1", "1train=2", "train lr=1"])
def test_malformed_override_refused(bad):
    with pytest.raises(ConfigError) as info:
        parse_overrides(["peft.r=8", bad])
    assert info.value.problems == [f"'{bad}': expected dotted.key=value"]


def test_override_into_a_value_refused(tmp_path):
    path = write_yaml(tmp_path, minimal(seed=3))
    with pytest.raises(ConfigError) as info:
        load_config(path, ["data.train.x=1"])
    assert info.value.problems == ["data.train.x: 'train' is a value, not a section"]
    with pytest.raises(ConfigError) as info:
        load_config(path, ["seed.x=1"])
    assert info.value.problems == ["seed.x: 'seed' is a value, not a section"]


# --- validation: every problem at once, with dotted paths --------------------------------------------


def test_all_errors_reported_at_once_with_dotted_paths():
    tree = minimal(train={"lrr": 1e-4, "lr": -1.0}, peft={"method": "dora"})
    with pytest.raises(ConfigError) as info:
        config_from_dict(tree)
    problems = info.value.problems
    assert len(problems) == 3, problems
    by_path = {p.split(":", 1)[0]: p for p in problems}
    assert set(by_path) == {"train.lrr", "train.lr", "peft.method"}
    assert by_path["train.lrr"] == "train.lrr: unknown key"
    assert "greater than 0" in by_path["train.lr"]
    assert "'lora'" in by_path["peft.method"]
    # The rendered message carries every problem too (it is what the CLI prints).
    rendered = str(info.value)
    assert all(p in rendered for p in problems)


def test_all_errors_from_yaml_file_name_the_file(tmp_path):
    path = write_yaml(tmp_path, minimal(train={"lrr": 1e-4, "lr": -1.0}, peft={"method": "dora"}))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in info.value.title
    assert sorted(p.split(":", 1)[0] for p in info.value.problems) == ["peft.method", "train.lr", "train.lrr"]


def test_missing_data_train():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"data": {"format": "instruction"}})
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith("data.train: ")


def test_missing_data_section():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"name": "x"})
    assert [p.split(":", 1)[0] for p in info.value.problems] == ["data"]


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden", "-x", "a b", "x" * 101])
def test_bad_run_name_refused(name):
    with pytest.raises(ConfigError) as info:
        config_from_dict(minimal(name=name))
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith("name: ")


@pytest.mark.parametrize("name", ["run", "my-run_1.0", "A" * 100])
def test_good_run_name_accepted(name):
    cfg = config_from_dict(minimal(name=name))
    assert cfg.name == name
    assert cfg.run_dir == Path("runs") / name


def test_unknown_column_for_format_refused():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"data": {"train": "t.jsonl", "format": "text", "columns": {"output": "x"}}})
    assert info.value.problems[0].startswith("data: ")
    assert "output" in info.value.problems[0]


@pytest.mark.parametrize("revision", [None, "main", HEX40[:-1], HEX40 + "0", "g" * 40])
def test_trust_remote_code_needs_pinned_commit(revision):
    with pytest.raises(ConfigError) as info:
        config_from_dict(minimal(model={"trust_remote_code": True, "revision": revision}))
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith("model: ")
    assert "trust_remote_code" in info.value.problems[0]


def test_trust_remote_code_with_pinned_commit_accepted():
    cfg = config_from_dict(minimal(model={"trust_remote_code": True, "revision": HEX40}))
    assert cfg.model.trust_remote_code is True
    assert cfg.model.revision == HEX40


def test_freeze_without_patterns_refused():
    with pytest.raises(ConfigError) as info:
        config_from_dict(minimal(peft={"method": "freeze"}))
    assert info.value.problems[0].startswith("peft: ")


# --- files --------------------------------------------------------------------------------------------


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ndata:\n  train: a: b\nseed: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(f"{path}:3: ")


def test_duplicate_keys_are_refused_with_both_lines(tmp_path):
    """A second `train:` block used to replace the first without a word."""
    path = tmp_path / "dup.yaml"
    path.write_text("data:\n  train: a.jsonl\ntrain:\n  lr: 0.1\n  max_steps: 5\nseed: 1\ntrain:\n  max_steps: 9\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [f"{path}:7: duplicate key 'train' (first at line 3)"]


def test_duplicate_keys_are_refused_in_nested_sections_and_overrides(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("data:\n  train: a.jsonl\n  format: chat\n  train: b.jsonl\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [f"{path}:4: duplicate key 'train' (first at line 2)"]
    with pytest.raises(ConfigError, match="duplicate key 'lr'"):
        load_config(None, ["data.train=a.jsonl", "train={lr: 0.1, lr: 0.2}"])


def test_a_yaml_merge_key_may_be_overridden(tmp_path):
    """`<<: *base` then a key of its own is YAML's way to override, not a duplicate."""
    path = tmp_path / "merge.yaml"
    path.write_text("data: {train: a.jsonl}\ntrain:\n  <<: {lr: 0.1, max_steps: 5}\n  lr: 0.2\n")
    cfg = load_config(path)
    assert (cfg.train.lr, cfg.train.max_steps) == (0.2, 5)


def test_missing_config_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "not found" in str(info.value)


def test_config_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [f"{path}: top level is list"]


def test_empty_config_file_reports_missing_data(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert [p.split(":", 1)[0] for p in info.value.problems] == ["data"]


EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def test_examples_exist():
    assert len(EXAMPLES) >= 2, EXAMPLES


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_configs_validate(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    assert cfg.data.train


# --- CLI ----------------------------------------------------------------------------------------------


def test_cli_bad_config_exits_2_without_traceback(tmp_path):
    path = write_yaml(tmp_path, minimal(train={"lrr": 1e-4}))
    proc = run_cli("train", path, "peft.r=0", timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "train.lrr: unknown key" in proc.stderr
    assert "peft.r: " in proc.stderr
    assert not (tmp_path / "runs").exists()
