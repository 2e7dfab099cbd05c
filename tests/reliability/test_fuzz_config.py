"""Property tests for configs: any YAML file or dotted override ends in a config that loads and dumps again,
or in our clean error (UserError), never in another exception.

A config is the first thing a user hands us and is often hand-edited, so every way of getting it wrong must
be one readable message, not a traceback. Hypothesis feeds `load_config` random YAML text and bytes, random
nested dicts (free-form and shaped like the schema), mutations of a valid config, and random dotted
overrides. The deterministic tests after the properties pin the bugs those found (PyYAML's own crashes, NUL
bytes and ~unknownuser in paths, infinite epochs), plus a control that shows the property can fail and a
check that YAML python tags never run. Shared machinery is in _fuzz.py.
"""

from __future__ import annotations

import copy
import json
import sys
from collections import Counter
from pathlib import Path

import hypothesis.strategies as st
import pytest
import yaml
from hypothesis import given
from pydantic import BaseModel

from tunesmith.config import FORMATS, TASKS, Config, dump_config, load_config
from tunesmith.errors import ConfigError, UserError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _fuzz import FUZZ, STATS, outcome, scratch  # noqa: E402,F401  (scratch: a fixture pytest must see here)


def dotted_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += dotted_fields(ann, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


DOTTED = dotted_fields(Config)
SECTIONS = sorted({d.split(".")[0] for d in DOTTED})
WORDS = sorted(
    set(FORMATS)
    | set(TASKS)
    | {
        "lora",
        "full",
        "freeze",
        "auto",
        "never",
        "cosine",
        "linear",
        "error",
        "skip",
        "drop",
        "truncate",
        "fp32",
        "bf16",
        "float16",
        "sdpa",
        "min",
    }
)
PREFIXES = [
    "",
    "./",
    "../",
    "/",
    "~",
    "~/",
    "/etc/",
    "/proc/self/",
    "../../",
    "data/",
    "~root/",
    "~nosuchuser/",
    "org/",
    "https://user:pw@host/",
    "\x00",
    "/tmp/\x00",
]

path_like = st.builds(lambda pre, body: pre + body, st.sampled_from(PREFIXES), st.text(max_size=12))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5000),
    st.integers(),
    st.floats(),
    st.text(max_size=24),
    path_like,
    st.sampled_from(WORDS),
)
json_like = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=8) | st.sampled_from(DOTTED + SECTIONS), inner, max_size=3)
    ),
    max_leaves=12,
)

YAML_TOKENS = [
    "data:",
    "train:",
    "format:",
    "name:",
    "model:",
    "peft:",
    "output_dir:",
    "allowed_roots:",
    "retention:",
    "seed:",
    " ",
    "  ",
    "\n",
    "\n  ",
    "- ",
    ": ",
    "{",
    "}",
    "[",
    "]",
    ",",
    "&a ",
    "*a",
    "!!binary ",
    "!!set ",
    "!!float ",
    "!!python/object/apply:os.system ",
    "!!str ",
    "'",
    '"',
    "~",
    "null",
    ".inf",
    ".nan",
    "-1",
    "1e5",
    "0x1F",
    "0o17",
    "2020-01-01",
    "yes",
    "x",
    "chat",
    "instruction",
    "/etc/passwd",
    "../",
    "\t",
    "#",
    "%YAML 1.1\n",
    "---\n",
    "...\n",
    "? ",
    "|\n",
    ">\n",
    "\\",
    "\x00",
    "\ufeff",
    "<<: ",
    "= ",
    "%",
]
plausible = st.one_of(
    st.integers(1, 64),
    st.floats(0.001, 0.4),
    st.booleans(),
    st.sampled_from(WORDS),
    st.none(),
    st.sampled_from(["org/dataset", "runs", "run-2", "smollm2-135m-instruct"]),
)
value = st.one_of(plausible, plausible, json_like)


def _schema_tree():
    """Dicts shaped like the schema: known sections and keys, values plausible or junk."""
    sections = {}
    for section in SECTIONS:
        keys = [d.split(".", 1)[1] for d in DOTTED if d.startswith(section + ".")]
        sections[section] = (
            st.dictionaries(st.sampled_from(keys) | st.text(max_size=6), value, max_size=4) if keys else value
        )
    return st.fixed_dictionaries({}, optional=sections)


yaml_text = st.one_of(st.text(max_size=200), st.lists(st.sampled_from(YAML_TOKENS), max_size=40).map("".join))

VALID = {
    "name": "run",
    "output_dir": "runs",
    "data": {"train": "org/dataset", "format": "instruction"},
    "train": {"max_steps": 2},
}


def check_config(cfg) -> None:
    """A config that loads is usable: it dumps and its dump is YAML again."""
    if cfg is None:
        return
    assert isinstance(cfg, Config)
    assert isinstance(yaml.safe_load(dump_config(cfg)), dict)
    assert cfg.run_dir.name == cfg.name


def _write(scratch: Path, text: str | bytes) -> Path:
    p = scratch / "config.yaml"
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text, encoding="utf-8", errors="surrogatepass")
    return p


@FUZZ
@given(text=st.one_of(yaml_text, st.binary(max_size=120)))
def test_load_config_on_random_yaml_text(scratch, text):
    path = _write(scratch, text)
    check_config(outcome(STATS.setdefault("load_config: random YAML text/bytes", Counter()), lambda: load_config(path)))


@FUZZ
@given(
    tree=st.one_of(
        st.dictionaries(st.sampled_from(SECTIONS) | st.text(max_size=8), json_like, max_size=6), _schema_tree()
    )
)
def test_load_config_on_random_nested_dicts(scratch, tree):
    path = _write(scratch, yaml.safe_dump(tree, allow_unicode=True))
    check_config(outcome(STATS.setdefault("load_config: random nested dicts", Counter()), lambda: load_config(path)))


def _set(tree: dict, dotted: str, value) -> None:
    node = tree
    *head, last = dotted.split(".")
    for k in head:
        node = node.setdefault(k, {}) if isinstance(node.get(k, {}), dict) else {}
    node[last] = value


@FUZZ
@given(changes=st.lists(st.tuples(st.sampled_from(DOTTED), value), min_size=1, max_size=4))
def test_load_config_on_mutations_of_a_valid_config(scratch, changes):
    tree = copy.deepcopy(VALID)
    for dotted, value in changes:
        _set(tree, dotted, value)
    path = _write(scratch, yaml.safe_dump(tree, allow_unicode=True))
    check_config(outcome(STATS.setdefault("load_config: mutated valid config", Counter()), lambda: load_config(path)))


override_key = st.one_of(
    st.sampled_from(DOTTED),
    st.from_regex(r"[A-Za-z_]\w{0,5}(\.[A-Za-z_]\w{0,5}){0,3}", fullmatch=True),
    st.text(max_size=12),
)
override_value = st.one_of(
    st.text(max_size=24),
    path_like,
    st.sampled_from(WORDS + YAML_TOKENS),
    st.floats().map(str),
    st.integers().map(str),
    yaml_text,
)
override = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(DOTTED), plausible.map(json.dumps)),
    st.builds(lambda k, v: f"{k}={v}", override_key, override_value),
    st.text(max_size=16),
)


@FUZZ
@given(overrides=st.lists(override, max_size=5), base=st.booleans())
def test_load_config_on_random_dotted_overrides(scratch, overrides, base):
    path = _write(scratch, yaml.safe_dump(VALID)) if base else None
    check_config(
        outcome(STATS.setdefault("load_config: random overrides", Counter()), lambda: load_config(path, overrides))
    )


def test_control_a_valid_config_and_an_invalid_one(scratch):
    """The property can tell the outcomes apart: a valid config loads, a bad one is a UserError."""
    stats = Counter()
    cfg = outcome(stats, lambda: load_config(_write(scratch, yaml.safe_dump(VALID)), ["train.lr=1e-4"]))
    assert isinstance(cfg, Config) and cfg.train.lr == 1e-4
    assert outcome(stats, lambda: load_config(_write(scratch, "data: [1"))) is None
    assert stats == Counter(inputs=2, valid=1, user_error=1)
    with pytest.raises(ZeroDivisionError):  # anything else propagates: the property test would fail
        outcome(stats, lambda: 1 / 0)


def test_control_an_exception_from_inside_pyyaml_fails_the_property(scratch, monkeypatch):
    """Once tallied as a known bug (a non-YAMLError out of yaml via config.py): now it fails the property."""

    def crash(loader, node):
        raise TypeError("a constructor crashed")

    monkeypatch.setitem(yaml.constructor.SafeConstructor.yaml_constructors, "tag:yaml.org,2002:int", crash)
    with pytest.raises(TypeError, match="a constructor crashed"):
        outcome(Counter(), lambda: load_config(_write(scratch, "data: {train: x}\nseed: 1\n")))


def test_yaml_python_tags_are_refused_and_never_run(scratch, tmp_path):
    sentinel = tmp_path / "SENTINEL"
    text = f"data: {{train: x}}\nname: !!python/object/apply:os.system ['touch {sentinel}']\n"
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(_write(scratch, text))
    assert not sentinel.exists()


# --------------------------------------------------------------------------------------------------
# Bugs found by the properties above, one deterministic case each
# --------------------------------------------------------------------------------------------------

YAML_BREAKERS = {
    "int-over-4300-digits": "9" * 5000,
    "deep-nesting": "[" * 3000 + "]" * 3000,
    "!!float-A": "!!float A",
    "!!float-empty": "!!float",
    "!!int-x": "!!int x",
    "!!bool-x": "!!bool x",
    "!!timestamp-x": "!!timestamp x",
}


@pytest.mark.parametrize("where", ["file", "override"])
@pytest.mark.parametrize("value", list(YAML_BREAKERS.values()), ids=list(YAML_BREAKERS))
def test_yaml_that_breaks_pyyaml_is_a_config_error(scratch, where, value):
    with pytest.raises(UserError):
        if where == "file":
            load_config(_write(scratch, f"data: {{train: x}}\nseed: {value}\n"))
        else:
            load_config(None, ["data.train=x", f"seed={value}"])


@pytest.mark.parametrize("override", ["output_dir=/tmp/x\x00y", "data.validation=/x\x00", "data.train=./a\x00b"])
def test_nul_byte_in_a_path_is_a_config_error(override):
    with pytest.raises(UserError):
        load_config(None, ["data.train=x", override])


@pytest.mark.parametrize("override", ["output_dir=~nosuchuser/runs", "data.train=~nosuchuser/train.jsonl"])
def test_tilde_of_an_unknown_user_is_a_config_error(override):
    with pytest.raises(UserError):
        load_config(None, ["data.train=x", override])


def test_infinite_epochs_is_a_config_error():
    with pytest.raises(UserError):
        load_config(None, ["data.train=x", "train.epochs=.inf"])


def test_inf_epochs_is_refused_by_the_config():
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["data.train=x", "train.epochs=.inf"])
    assert caught.value.problems == ["train.epochs: Input should be a finite number"]
