"""Property tests: any config or data input ends in a valid result or our clean error (UserError), never in
another exception.

- `load_config` on random YAML text, random bytes, random nested dicts dumped to YAML (free-form and
  mutations of a valid config), and random dotted overrides;
- `read_source` + `parse_rows` on random bytes in a .jsonl file, random JSON values one per line, and random
  CSV text, for the formats instruction, chat, classification and concepts. Every parsed Example must have
  its required fields non-empty, every row must end up as an example or a problem, and problem messages
  must not quote row text.

Inputs that hit a bug found here are tallied by a narrow signature (exception type + message + the tunesmith
file it came from) instead of failing the property; each such bug has its own strict-xfail test at the end of
this file, which turns into an XPASS failure once the bug is fixed (then drop its signature from KNOWN_BUGS).
Hypothesis runs derandomized and without an example database: the file alone gives the same inputs every run
(counts can shift a little when other test modules run first), and it writes nothing into the repository.
"""

from __future__ import annotations

import copy
import json
import math
import re
import traceback
from collections import Counter
from pathlib import Path

import hypothesis.strategies as st
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from pydantic import BaseModel

from tunesmith.config import CANONICAL_COLUMNS, FORMATS, TASKS, Config, DataConfig, dump_config, load_config
from tunesmith.data.formats import REQUIRED, ROLES, Example, parse_rows
from tunesmith.data.sources import read_source
from tunesmith.errors import ConfigError, DataError, UserError

torch.set_num_threads(1)

EXAMPLES = 400  # per property: 2,800 inputs in all, about 30 s on one thread
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))

STATS: dict[str, Counter] = {}
MARK = "ZQX"  # put into row text: problem messages must never contain it


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# (tag, exception types, message regex, tunesmith file it passes through, library file it comes from)
ANY = (ValueError, IndexError, KeyError, AttributeError, TypeError, RecursionError, OverflowError)
KNOWN_BUGS = [
    ("yaml.safe_load raises a non-YAMLError", ANY, r"", "tunesmith/config.py", "/yaml/"),
    ("path: NUL byte", (ValueError,), r"embedded null byte", "tunesmith/security.py", ""),
    ("path: ~unknownuser", (RuntimeError,), r"Could not determine home directory", "tunesmith/security.py", ""),
    ("json.loads raises a non-JSONDecodeError", (ValueError, RecursionError), r"integer string conversion|recursion",
     "tunesmith/data/sources.py", ""),
]


def known_bug(err: BaseException) -> str | None:
    files = [f.filename.replace("\\", "/") for f in traceback.extract_tb(err.__traceback__)]
    for tag, kinds, pattern, origin, library in KNOWN_BUGS:
        if (isinstance(err, kinds) and re.search(pattern, str(err)) and any(f.endswith(origin) for f in files)
                and any(library in f for f in files)):
            return f"{tag} ({type(err).__name__})"
    return None


def outcome(stats: Counter, fn):
    """Run fn: a result, our UserError (exit 2, non-empty message), or a tallied known bug; else re-raise."""
    stats["inputs"] += 1
    try:
        result = fn()
    except UserError as err:
        assert err.exit_code == 2 and err.render().strip()
        stats["user_error"] += 1
        return None
    except Exception as err:
        tag = known_bug(err)
        if tag is None:
            raise
        stats[f"KNOWN BUG {tag}"] += 1
        return None
    stats["valid"] += 1
    return result


# --------------------------------------------------------------------------------------------------
# load_config
# --------------------------------------------------------------------------------------------------

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
WORDS = sorted(set(FORMATS) | set(TASKS) | {"lora", "full", "freeze", "auto", "never", "cosine", "linear", "error",
                                             "skip", "drop", "truncate", "fp32", "bf16", "float16", "sdpa", "min"})
PREFIXES = ["", "./", "../", "/", "~", "~/", "/etc/", "/proc/self/", "../../", "data/", "~root/", "~nosuchuser/",
            "org/", "https://user:pw@host/", "\x00", "/tmp/\x00"]

path_like = st.builds(lambda pre, body: pre + body, st.sampled_from(PREFIXES), st.text(max_size=12))
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5000), st.integers(), st.floats(), st.text(max_size=24), path_like,
    st.sampled_from(WORDS),
)
json_like = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8) | st.sampled_from(
        DOTTED + SECTIONS), inner, max_size=3), max_leaves=12)

YAML_TOKENS = [
    "data:", "train:", "format:", "name:", "model:", "peft:", "output_dir:", "allowed_roots:", "retention:", "seed:",
    " ", "  ", "\n", "\n  ", "- ", ": ", "{", "}", "[", "]", ",", "&a ", "*a", "!!binary ", "!!set ", "!!float ",
    "!!python/object/apply:os.system ", "!!str ", "'", '"', "~", "null", ".inf", ".nan", "-1", "1e5", "0x1F", "0o17",
    "2020-01-01", "yes", "x", "chat", "instruction", "/etc/passwd", "../", "\t", "#", "%YAML 1.1\n", "---\n",
    "...\n", "? ", "|\n", ">\n", "\\", "\x00", "\ufeff", "<<: ", "= ", "%",
]
plausible = st.one_of(st.integers(1, 64), st.floats(0.001, 0.4), st.booleans(), st.sampled_from(WORDS), st.none(),
                      st.sampled_from(["org/dataset", "runs", "run-2", "smollm2-135m-instruct"]))
value = st.one_of(plausible, plausible, json_like)


def _schema_tree():
    """Dicts shaped like the schema: known sections and keys, values plausible or junk."""
    sections = {}
    for section in SECTIONS:
        keys = [d.split(".", 1)[1] for d in DOTTED if d.startswith(section + ".")]
        sections[section] = (st.dictionaries(st.sampled_from(keys) | st.text(max_size=6), value, max_size=4)
                             if keys else value)
    return st.fixed_dictionaries({}, optional=sections)


yaml_text = st.one_of(st.text(max_size=200), st.lists(st.sampled_from(YAML_TOKENS), max_size=40).map("".join))

VALID = {"name": "run", "output_dir": "runs", "data": {"train": "org/dataset", "format": "instruction"},
         "train": {"max_steps": 2}}


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
    check_config(outcome(STATS.setdefault("load_config: random YAML text/bytes", Counter()),
                         lambda: load_config(path)))


@FUZZ
@given(tree=st.one_of(st.dictionaries(st.sampled_from(SECTIONS) | st.text(max_size=8), json_like, max_size=6),
                      _schema_tree()))
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
    st.sampled_from(DOTTED), st.from_regex(r"[A-Za-z_]\w{0,5}(\.[A-Za-z_]\w{0,5}){0,3}", fullmatch=True),
    st.text(max_size=12))
override_value = st.one_of(st.text(max_size=24), path_like, st.sampled_from(WORDS + YAML_TOKENS),
                           st.floats().map(str), st.integers().map(str), yaml_text)
override = st.one_of(st.builds(lambda k, v: f"{k}={v}", st.sampled_from(DOTTED), plausible.map(json.dumps)),
                     st.builds(lambda k, v: f"{k}={v}", override_key, override_value), st.text(max_size=16))


@FUZZ
@given(overrides=st.lists(override, max_size=5), base=st.booleans())
def test_load_config_on_random_dotted_overrides(scratch, overrides, base):
    path = _write(scratch, yaml.safe_dump(VALID)) if base else None
    check_config(outcome(STATS.setdefault("load_config: random overrides", Counter()),
                         lambda: load_config(path, overrides)))


def test_control_a_valid_config_and_an_invalid_one(scratch):
    """The property can tell the outcomes apart: a valid config loads, a bad one is a UserError."""
    stats = Counter()
    cfg = outcome(stats, lambda: load_config(_write(scratch, yaml.safe_dump(VALID)), ["train.lr=1e-4"]))
    assert isinstance(cfg, Config) and cfg.train.lr == 1e-4
    assert outcome(stats, lambda: load_config(_write(scratch, "data: [1"))) is None
    assert stats == Counter(inputs=2, valid=1, user_error=1)
    with pytest.raises(ZeroDivisionError):  # anything else propagates: the property test would fail
        outcome(stats, lambda: 1 / 0)


def test_yaml_python_tags_are_refused_and_never_run(scratch, tmp_path):
    sentinel = tmp_path / "SENTINEL"
    text = f"data: {{train: x}}\nname: !!python/object/apply:os.system ['touch {sentinel}']\n"
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(_write(scratch, text))
    assert not sentinel.exists()


# --------------------------------------------------------------------------------------------------
# read_source + parse_rows
# --------------------------------------------------------------------------------------------------

DATA_FORMATS = ("instruction", "chat", "classification", "concepts")
LABELS = ["pos", "neg", "7"]

text_value = st.one_of(st.text(max_size=16), st.just(""), st.just(" \n\t"), st.text(max_size=8).map(MARK.__add__))
lone_surrogate = st.characters(categories=["Cs"])
text_or_surrogate = st.one_of(text_value, text_value, text_value, st.builds(lambda a, s: a + s, text_value, lone_surrogate))
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), text_or_surrogate,
                        st.sampled_from(LABELS))
json_value = st.recursive(json_scalar, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(text_value, inner, max_size=3), max_leaves=8)
message = st.one_of(st.fixed_dictionaries({}, optional={"role": st.sampled_from(ROLES + ("tool", "")) | json_scalar,
                                                        "content": text_or_surrogate | json_scalar}), json_value)
COLUMN_VALUES = {
    "messages": st.lists(message, max_size=4) | json_value,
    "concepts": st.lists(text_or_surrogate, max_size=4) | json_value,
    "references": st.lists(text_or_surrogate, max_size=3) | json_value,
    "label": st.sampled_from(LABELS) | json_scalar,
    "id": json_scalar,
}


good_text = st.one_of(st.sampled_from(["one two", "reverse the words", "a dog runs", "x"]), text_value)
good_message = st.fixed_dictionaries({"role": st.sampled_from(ROLES[:2]), "content": good_text | text_or_surrogate})
WELL_FORMED = {
    "instruction": st.fixed_dictionaries({"instruction": good_text, "output": good_text},
                                         optional={"input": good_text, "id": json_scalar}),
    "chat": st.fixed_dictionaries({"messages": st.builds(
        lambda head, last: head + [{"role": "assistant", "content": last}], st.lists(good_message, max_size=3),
        good_text | text_or_surrogate)}, optional={"id": json_scalar}),
    "classification": st.fixed_dictionaries({"text": good_text, "label": st.sampled_from(LABELS) | st.integers(0, 9)
                                             | text_or_surrogate}, optional={"id": json_scalar}),
    "concepts": st.fixed_dictionaries({"concepts": st.lists(good_text | text_or_surrogate, min_size=1, max_size=3),
                                       "target": good_text},
                                      optional={"references": st.lists(good_text | text_or_surrogate, max_size=3)}),
}


def row_for(fmt: str):
    cols = {c: COLUMN_VALUES.get(c, text_or_surrogate | json_scalar) for c in CANONICAL_COLUMNS[fmt] + ("id",)}
    junk_one = st.tuples(WELL_FORMED[fmt], st.sampled_from(CANONICAL_COLUMNS[fmt]), json_value).map(
        lambda t: {**t[0], t[1]: t[2]})
    return st.one_of(WELL_FORMED[fmt], WELL_FORMED[fmt], junk_one, st.fixed_dictionaries({}, optional=cols),
                     st.fixed_dictionaries(cols), json_value)


@st.composite
def jsonl_lines(draw, fmt: str) -> bytes:
    lines = []
    for row in draw(st.lists(row_for(fmt), max_size=8)):
        line = json.dumps(row, ensure_ascii=draw(st.booleans()))
        lines.append(line.encode("utf-8", "surrogatepass"))
    sep = draw(st.sampled_from([b"\n", b"\r\n", b"\n\n"]))
    return draw(st.sampled_from([b"", b"\xef\xbb\xbf"])) + sep.join(lines)


csv_field = st.one_of(text_value, st.sampled_from(LABELS + ["", '"', '""', ",", "\n", "\r", "a,b", '"q"', "\x00"]),
                      st.text(alphabet=',"\n\r\t ;|ab', max_size=8))


@st.composite
def csv_text(draw, fmt: str) -> str:
    if draw(st.booleans()):  # the format's own columns, in some order, fields mostly plain words
        header = draw(st.permutations(list(REQUIRED[fmt]) + sorted(draw(st.sets(st.sampled_from(["id", "input", "extra"]))))))
        plain = st.sampled_from(["one two", "a dog runs", "pos", "neg", "x y"])
        field = st.one_of(plain, plain, plain, good_text, csv_field)
        width = st.sampled_from([len(header)] * 4 + [len(header) - 1, len(header) + 1])
        rows = [draw(st.lists(field, min_size=n, max_size=n)) for n in draw(st.lists(width, max_size=6))]
    else:
        header = draw(st.lists(st.sampled_from(CANONICAL_COLUMNS[fmt] + ("id", "extra")) | text_value, max_size=5))
        rows = draw(st.lists(st.lists(csv_field, max_size=5), max_size=6))
    quote = draw(st.booleans())

    def cell(v: str) -> str:
        return '"' + v.replace('"', '""') + '"' if quote else v

    sep = draw(st.sampled_from(["\n", "\r\n"]))
    body = sep.join(",".join(cell(v) for v in r) for r in [header] + rows)
    return draw(st.one_of(st.just(body), st.just(body), st.just(body), st.text(alphabet=',"\n\r \tabc;\x00', max_size=60)))


def data_config(fmt: str, with_labels: bool) -> DataConfig:
    return DataConfig(train="x", format=fmt, labels=LABELS if (with_labels and fmt == "classification") else None)


def _nonempty(s) -> bool:
    return isinstance(s, str) and bool(s.strip())


def _encodable(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def check_example(ex: Example, cfg: DataConfig, stats: Counter) -> None:
    fmt = cfg.format
    if fmt in ("instruction", "chat", "concepts"):
        assert _nonempty(ex.completion), ex
        assert isinstance(ex.prompt, list)
        assert all(isinstance(m, dict) and m["role"] in ROLES and isinstance(m["content"], str) for m in ex.prompt)
    if fmt in ("instruction", "concepts"):
        assert ex.prompt and ex.prompt[-1]["role"] == "user" and _nonempty(ex.prompt[-1]["content"]), ex
    if fmt == "concepts":
        assert ex.concepts and all(_nonempty(c) for c in ex.concepts), ex
        assert ex.references and all(_nonempty(r) for r in ex.references), ex
    if fmt == "classification":
        assert _nonempty(ex.text) and _nonempty(ex.label), ex
        assert cfg.labels is None or ex.label in cfg.labels
    assert isinstance(ex.id, str)  # optional column: "" and "None" are possible ids
    strings = {"id": [ex.id], "text": [ex.text or ""], "label": [ex.label or ""], "completion": [ex.completion or ""],
               "prompt": [m["content"] for m in ex.prompt or []], "concepts": ex.concepts or [],
               "references": ex.references or []}
    for field, values in strings.items():
        if not all(_encodable(v) for v in values):
            # lone surrogates pass every check but _string's: see test_lone_surrogate_is_a_bad_row
            stats[f"KNOWN BUG surrogate accepted in {field}"] += 1


def run_data(stats: Counter, path: Path, cfg: DataConfig) -> None:
    def parse():
        raw = read_source(str(path))
        examples, problems = parse_rows(raw, cfg)
        return raw, examples, problems

    result = outcome(stats, parse)
    if result is None:
        return
    raw, examples, problems = result
    assert len(examples) + len(problems) == raw.total  # no row disappears silently
    positions = {w for w, _ in raw.rows}
    assert all(ex.where in positions for ex in examples)
    for ex in examples:
        check_example(ex, cfg, stats)
    for p in problems:
        assert re.match(r".+:(row )?\d+$", p.where), p.where
        if MARK in p.message:
            assert p.code == "unknown_label", p  # see test_problems_never_quote_row_text
            stats["KNOWN BUG label text quoted in a problem"] += 1
    stats["examples"] += len(examples)
    stats["problems"] += len(problems)


@FUZZ
@given(fmt=st.sampled_from(DATA_FORMATS), data=st.binary(max_size=300), with_labels=st.booleans())
def test_parse_random_bytes_as_jsonl(scratch, fmt, data, with_labels):
    path = scratch / "rows.jsonl"
    path.write_bytes(data)
    run_data(STATS.setdefault("data: random bytes (.jsonl)", Counter()), path, data_config(fmt, with_labels))


@FUZZ
@given(st.data())
def test_parse_random_json_values_one_per_line(scratch, data):
    fmt = data.draw(st.sampled_from(DATA_FORMATS))
    path = scratch / "rows.jsonl"
    path.write_bytes(data.draw(jsonl_lines(fmt)))
    run_data(STATS.setdefault("data: random JSON rows (.jsonl)", Counter()), path,
             data_config(fmt, data.draw(st.booleans())))


@FUZZ
@given(st.data())
def test_parse_random_csv_text(scratch, data):
    fmt = data.draw(st.sampled_from(DATA_FORMATS))
    path = scratch / "rows.csv"
    path.write_text(data.draw(csv_text(fmt)), encoding="utf-8", newline="")
    run_data(STATS.setdefault("data: random CSV text (.csv)", Counter()), path,
             data_config(fmt, data.draw(st.booleans())))


def test_control_parse_checks_can_fail(scratch):
    """Good rows become examples, bad ones problems; a hand-made empty completion fails check_example."""
    path = scratch / "control.jsonl"
    path.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps({"instruction": "a"}) + "\n")
    stats = Counter()
    cfg = data_config("instruction", False)
    run_data(stats, path, cfg)
    assert stats["examples"] == 1 and stats["problems"] == 1
    bad = Example("f:1", "f:1", [{"role": "user", "content": "a"}], " ")
    with pytest.raises(AssertionError):
        check_example(bad, cfg, stats)


# --------------------------------------------------------------------------------------------------
# Bugs found by the properties above, one deterministic case each (strict xfail: they flip when fixed)
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


@pytest.mark.parametrize("line", ["[" * 100_000, '{"instruction": "a", "output": ' + "1" * 5000 + "}"],
                         ids=["deep-nesting", "int-over-4300-digits"])
def test_jsonl_line_that_breaks_the_json_parser_is_a_bad_row(scratch, line):
    path = scratch / "bad.jsonl"
    path.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + line + "\n")
    raw = read_source(str(path))
    assert len(raw.rows) == 1 and len(raw.problems) == 1 and raw.problems[0].where.endswith(":2")


@pytest.mark.parametrize("fmt,row", [
    ("chat", {"messages": [{"role": "user", "content": "hi \ud800"}, {"role": "assistant", "content": "ok"}]}),
    ("chat", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok \udfff"}]}),
    ("concepts", {"concepts": ["dog \ud800"], "target": "a dog"}),
    ("classification", {"text": "fine", "label": "pos\ud800"}),
], ids=["chat-user", "chat-assistant", "concepts", "label"])
def test_lone_surrogate_is_a_bad_row(scratch, fmt, row):
    path = scratch / "sur.jsonl"
    path.write_text(json.dumps(row) + "\n")  # ensure_ascii: the file is valid UTF-8 holding a \\ud800 escape
    examples, problems = parse_rows(read_source(str(path)), data_config(fmt, False))
    assert examples == [] and [p.code for p in problems] == ["invalid_unicode"]


def test_lone_surrogate_in_chat_is_a_clean_row_error(scratch):
    from tunesmith.config import config_from_dict
    from tunesmith.data.prepare import load_examples

    path = scratch / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(20)]
    rows[3]["messages"][0]["content"] = "q \ud800"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config_from_dict({"data": {"train": str(path), "format": "chat"}})
    with pytest.raises(DataError) as caught:
        load_examples(cfg)
    assert caught.value.problems == [f"{path}:4: column 'messages' has a lone surrogate"]


def test_problems_never_quote_row_text(scratch):
    path = scratch / "cls.jsonl"
    path.write_text(json.dumps({"text": "fine", "label": f"{MARK}private"}) + "\n")
    _, problems = parse_rows(read_source(str(path)), data_config("classification", True))
    assert problems and all(MARK not in p.message for p in problems)


def test_inf_epochs_is_refused_by_the_config():
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["data.train=x", "train.epochs=.inf"])
    assert caught.value.problems == ["train.epochs: Input should be a finite number"]


def test_zz_fuzz_input_counts(capsys):
    """Last in the file: print how many inputs each property tried (and what became of them)."""
    if not STATS:
        pytest.skip("no property test ran (deselected)")
    total = sum(c["inputs"] for c in STATS.values())
    lines = [f"fuzz: {total} generated inputs"] + [
        f"  {name}: {c['inputs']} inputs; " + ", ".join(f"{k} {v}" for k, v in sorted(c.items()) if k != "inputs")
        for name, c in sorted(STATS.items())]
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert all(c["inputs"] > 0 and c["inputs"] == c["valid"] + c["user_error"] + sum(
        v for k, v in c.items() if k.startswith("KNOWN BUG") and "(" in k) for c in STATS.values())
