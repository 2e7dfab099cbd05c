"""Property tests for data: any training file ends in examples and per-row problems, or in our clean error
(UserError), never in another exception.

Datasets come from anywhere (scrapes, exports, other tools), so `read_source` + `parse_rows` must survive
any bytes: random bytes in a .jsonl file, random JSON values one per line, and random CSV text, for the
formats instruction, chat, classification and concepts. Beyond not crashing, every parsed Example must have
its required fields non-empty (an empty completion would train on nothing), every row must end up as an
example or a problem (none vanish silently), and problem messages must not quote row text (they reach logs
and reports, rows may be private). The deterministic tests after the properties pin the bugs those found
(JSON parser crashes, lone surrogates, a label quoted in a problem). Shared machinery is in _fuzz.py.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import given

from tunesmith.config import CANONICAL_COLUMNS, DataConfig
from tunesmith.data.formats import REQUIRED, ROLES, Example, parse_rows
from tunesmith.data.sources import read_source
from tunesmith.errors import DataError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _fuzz import FUZZ, MARK, STATS, outcome, scratch  # noqa: E402,F401  (scratch: a fixture pytest must see here)

DATA_FORMATS = ("instruction", "chat", "classification", "concepts")
LABELS = ["pos", "neg", "7"]

text_value = st.one_of(st.text(max_size=16), st.just(""), st.just(" \n\t"), st.text(max_size=8).map(MARK.__add__))
lone_surrogate = st.characters(categories=["Cs"])
text_or_surrogate = st.one_of(
    text_value, text_value, text_value, st.builds(lambda a, s: a + s, text_value, lone_surrogate)
)
json_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), text_or_surrogate, st.sampled_from(LABELS)
)
json_value = st.recursive(
    json_scalar,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text_value, inner, max_size=3),
    max_leaves=8,
)
message = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "role": st.sampled_from(ROLES + ("tool", "")) | json_scalar,
            "content": text_or_surrogate | json_scalar,
        },
    ),
    json_value,
)
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
    "instruction": st.fixed_dictionaries(
        {"instruction": good_text, "output": good_text}, optional={"input": good_text, "id": json_scalar}
    ),
    "chat": st.fixed_dictionaries(
        {
            "messages": st.builds(
                lambda head, last: head + [{"role": "assistant", "content": last}],
                st.lists(good_message, max_size=3),
                good_text | text_or_surrogate,
            )
        },
        optional={"id": json_scalar},
    ),
    "classification": st.fixed_dictionaries(
        {"text": good_text, "label": st.sampled_from(LABELS) | st.integers(0, 9) | text_or_surrogate},
        optional={"id": json_scalar},
    ),
    "concepts": st.fixed_dictionaries(
        {"concepts": st.lists(good_text | text_or_surrogate, min_size=1, max_size=3), "target": good_text},
        optional={"references": st.lists(good_text | text_or_surrogate, max_size=3)},
    ),
}


def row_for(fmt: str):
    cols = {c: COLUMN_VALUES.get(c, text_or_surrogate | json_scalar) for c in CANONICAL_COLUMNS[fmt] + ("id",)}
    junk_one = st.tuples(WELL_FORMED[fmt], st.sampled_from(CANONICAL_COLUMNS[fmt]), json_value).map(
        lambda t: {**t[0], t[1]: t[2]}
    )
    return st.one_of(
        WELL_FORMED[fmt],
        WELL_FORMED[fmt],
        junk_one,
        st.fixed_dictionaries({}, optional=cols),
        st.fixed_dictionaries(cols),
        json_value,
    )


@st.composite
def jsonl_lines(draw, fmt: str) -> bytes:
    lines = []
    for row in draw(st.lists(row_for(fmt), max_size=8)):
        line = json.dumps(row, ensure_ascii=draw(st.booleans()))
        lines.append(line.encode("utf-8", "surrogatepass"))
    sep = draw(st.sampled_from([b"\n", b"\r\n", b"\n\n"]))
    return draw(st.sampled_from([b"", b"\xef\xbb\xbf"])) + sep.join(lines)


csv_field = st.one_of(
    text_value,
    st.sampled_from(LABELS + ["", '"', '""', ",", "\n", "\r", "a,b", '"q"', "\x00"]),
    st.text(alphabet=',"\n\r\t ;|ab', max_size=8),
)


@st.composite
def csv_text(draw, fmt: str) -> str:
    if draw(st.booleans()):  # the format's own columns, in some order, fields mostly plain words
        extra = sorted(draw(st.sets(st.sampled_from(["id", "input", "extra"]))))
        header = draw(st.permutations(list(REQUIRED[fmt]) + extra))
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
    return draw(
        st.one_of(st.just(body), st.just(body), st.just(body), st.text(alphabet=',"\n\r \tabc;\x00', max_size=60))
    )


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


def check_example(ex: Example, cfg: DataConfig) -> None:
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
    strings = {
        "id": [ex.id],
        "text": [ex.text or ""],
        "label": [ex.label or ""],
        "completion": [ex.completion or ""],
        "prompt": [m["content"] for m in ex.prompt or []],
        "concepts": ex.concepts or [],
        "references": ex.references or [],
    }
    for field, values in strings.items():  # a lone surrogate must be a bad row: test_lone_surrogate_is_a_bad_row
        assert all(_encodable(v) for v in values), (field, ex.where)


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
        check_example(ex, cfg)
    for p in problems:
        assert re.match(r".+:(row )?\d+$", p.where), p.where
        assert MARK not in p.message, p.code  # rows may be private: test_problems_never_quote_row_text
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
    run_data(
        STATS.setdefault("data: random JSON rows (.jsonl)", Counter()), path, data_config(fmt, data.draw(st.booleans()))
    )


@FUZZ
@given(st.data())
def test_parse_random_csv_text(scratch, data):
    fmt = data.draw(st.sampled_from(DATA_FORMATS))
    path = scratch / "rows.csv"
    path.write_text(data.draw(csv_text(fmt)), encoding="utf-8", newline="")
    run_data(
        STATS.setdefault("data: random CSV text (.csv)", Counter()), path, data_config(fmt, data.draw(st.booleans()))
    )


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
        check_example(bad, cfg)


def test_control_a_crash_in_the_reader_fails_the_property(scratch, monkeypatch):
    """Once tallied as a known bug (RecursionError from data/sources.py): now it propagates, so the property
    test that met it would fail."""
    from tunesmith.data import sources

    def crash(raw, where):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(sources, "_decode_line", crash)
    path = scratch / "control.jsonl"
    path.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    with pytest.raises(RecursionError):
        run_data(Counter(), path, data_config("instruction", False))


# --------------------------------------------------------------------------------------------------
# Bugs found by the properties above, one deterministic case each
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    ["[" * 100_000, '{"instruction": "a", "output": ' + "1" * 5000 + "}"],
    ids=["deep-nesting", "int-over-4300-digits"],
)
def test_jsonl_line_that_breaks_the_json_parser_is_a_bad_row(scratch, line):
    path = scratch / "bad.jsonl"
    path.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + line + "\n")
    raw = read_source(str(path))
    assert len(raw.rows) == 1 and len(raw.problems) == 1 and raw.problems[0].where.endswith(":2")


@pytest.mark.parametrize(
    "fmt,row",
    [
        ("chat", {"messages": [{"role": "user", "content": "hi \ud800"}, {"role": "assistant", "content": "ok"}]}),
        ("chat", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok \udfff"}]}),
        ("concepts", {"concepts": ["dog \ud800"], "target": "a dog"}),
        ("classification", {"text": "fine", "label": "pos\ud800"}),
    ],
    ids=["chat-user", "chat-assistant", "concepts", "label"],
)
def test_lone_surrogate_is_a_bad_row(scratch, fmt, row):
    path = scratch / "sur.jsonl"
    path.write_text(json.dumps(row) + "\n")  # ensure_ascii: the file is valid UTF-8 holding a \\ud800 escape
    examples, problems = parse_rows(read_source(str(path)), data_config(fmt, False))
    assert examples == [] and [p.code for p in problems] == ["invalid_unicode"]


def test_lone_surrogate_in_chat_is_a_clean_row_error(scratch):
    from tunesmith.config import config_from_dict
    from tunesmith.data.prepare import load_examples

    path = scratch / "chat.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(20)
    ]
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
