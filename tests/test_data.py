"""The data layer: reading, row validation by file:line, error policy, dedup/split, tokenization."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from pathlib import Path

import pytest
from _cli import run_cli
from conftest import instruction_rows, write_config, write_jsonl

from tunesmith.config import config_from_dict
from tunesmith.data.formats import parse_rows
from tunesmith.data.prepare import load_examples
from tunesmith.data.sources import read_source
from tunesmith.errors import DataError

SECRET = "SECRETWORD"


def make_cfg(train: Path, fmt: str = "instruction", **data):
    return config_from_dict({"data": {"train": str(train), "format": fmt, **data}})


def good_row(i: int) -> dict:
    return {"instruction": f"{SECRET} question {i}", "output": f"{SECRET} answer {i}"}


def write_mixed_jsonl(path: Path, n_extra_good: int = 0) -> Path:
    """Line 1 good, 2 truncated JSON, 3 array, 4 no `output`, 5 invalid UTF-8, 6 good with CRLF, then
    `n_extra_good` good rows, then a blank line."""
    lines = [
        json.dumps(good_row(1)).encode(),
        f'{{"instruction": "{SECRET} cut", "output": "{SECRET} cu'.encode(),
        json.dumps([SECRET, "array"]).encode(),
        json.dumps({"instruction": f"{SECRET} no output"}).encode(),
        b'{"instruction": "' + SECRET.encode() + b' \xff bad byte", "output": "' + SECRET.encode() + b'"}',
        json.dumps(good_row(6)).encode() + b"\r",
    ]
    lines += [json.dumps(good_row(100 + i)).encode() for i in range(n_extra_good)]
    path.write_bytes(b"\n".join(lines) + b"\n\n")
    return path


MIXED_CODES = {2: "malformed_json", 3: "not_an_object", 4: "missing_column", 5: "invalid_utf8"}


# --- JSONL --------------------------------------------------------------------------------------------


def test_jsonl_problems_by_line_without_row_text(tmp_path):
    path = write_mixed_jsonl(tmp_path / "train.jsonl")
    cfg = make_cfg(path)
    raw = read_source(str(path))
    examples, problems = parse_rows(raw, cfg.data)

    assert {int(p.where.rsplit(":", 1)[1]): p.code for p in problems} == MIXED_CODES
    for p in problems:
        assert p.where.startswith(f"{path}:")
    assert [ex.where for ex in examples] == [f"{path}:1", f"{path}:6"]
    # The CRLF row parses, and the \r does not leak into the text.
    crlf = examples[1]
    assert crlf.completion == f"{SECRET} answer 6"
    assert crlf.prompt == [{"role": "user", "content": f"{SECRET} question 6"}]
    assert raw.total == 6  # the trailing blank line is neither a row nor a problem
    # Training data may be private: no problem quotes a row's content.
    for p in problems:
        assert SECRET not in str(p)
        assert SECRET not in p.message


def test_load_examples_error_policy_lists_every_bad_line(tmp_path):
    path = write_mixed_jsonl(tmp_path / "train.jsonl", n_extra_good=10)
    with pytest.raises(DataError) as info:
        load_examples(make_cfg(path))
    err = info.value
    assert len(err.problems) == 4
    for line in MIXED_CODES:
        assert any(p.startswith(f"{path}:{line}: ") for p in err.problems), (line, err.problems)
    assert SECRET not in str(err)
    assert "on_error=skip" in err.hint


def test_load_examples_skip_counts_bad_rows(tmp_path):
    path = write_mixed_jsonl(tmp_path / "train.jsonl", n_extra_good=10)  # 12 good, 4 bad
    ex = load_examples(make_cfg(path, on_error="skip", max_bad_fraction=0.5))
    assert ex.report["bad_rows"] == {"malformed_json": 1, "not_an_object": 1, "missing_column": 1, "invalid_utf8": 1}
    assert ex.report["rows"]["train"] + ex.report["rows"]["validation"] == 12
    kept = {e.where for part in ex.splits.values() for e in part}
    assert len(kept) == 12
    assert not any(w.endswith((":2", ":3", ":4", ":5")) for w in kept)


def test_load_examples_skip_aborts_above_max_bad_fraction(tmp_path):
    path = write_mixed_jsonl(tmp_path / "train.jsonl", n_extra_good=10)  # 4 of 16 bad = 25%
    with pytest.raises(DataError) as info:
        load_examples(make_cfg(path, on_error="skip", max_bad_fraction=0.2))
    assert "max_bad_fraction" in info.value.title
    assert "4 of 16" in info.value.title
    assert "invalid_utf8: 1" in info.value.problems


def test_utf8_bom_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(good_row(1)).encode() + b"\n" + json.dumps(good_row(2)).encode())
    raw = read_source(str(path))
    assert raw.problems == []
    assert [w for w, _ in raw.rows] == [f"{path}:1", f"{path}:2"]
    assert raw.rows[0][1] == good_row(1)


def test_utf16_file_refused(tmp_path):
    path = tmp_path / "utf16.jsonl"
    path.write_bytes((json.dumps(good_row(1)) + "\n").encode("utf-16"))
    assert path.read_bytes()[:2] == b"\xff\xfe"
    with pytest.raises(DataError) as info:
        read_source(str(path))
    assert "UTF-16" in str(info.value)
    with pytest.raises(DataError):
        load_examples(make_cfg(path))


def test_nul_byte_and_lone_surrogate(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(
        json.dumps(good_row(1)).encode()
        + b"\n"
        + b'{"instruction": "'
        + SECRET.encode()
        + b'\x00", "output": "x"}\n'
        + b'{"instruction": "'
        + SECRET.encode()
        + b' \\ud800", "output": "x"}\n'
    )
    raw = read_source(str(path))
    examples, problems = parse_rows(raw, make_cfg(path).data)
    assert [(p.where, p.code) for p in problems] == [(f"{path}:2", "nul_byte"), (f"{path}:3", "invalid_unicode")]
    assert len(examples) == 1
    assert all(SECRET not in str(p) for p in problems)


def test_missing_data_file(tmp_path):
    with pytest.raises(DataError) as info:
        load_examples(make_cfg(tmp_path / "absent.jsonl"))
    assert "not found" in str(info.value)


# --- CSV and Parquet ------------------------------------------------------------------------------------


def test_csv_quoted_field_with_embedded_newline(tmp_path):
    path = tmp_path / "train.csv"
    text = 'instruction,input,output\n"line one\nline two",,out one\nplain,"with, comma",out two\n'
    path.write_text(text, encoding="utf-8")
    expected = list(csv.DictReader(io.StringIO(text, newline="")))
    raw = read_source(str(path))
    examples, problems = parse_rows(raw, make_cfg(path).data)
    assert problems == []
    assert len(examples) == len(expected) == 2
    assert examples[0].prompt[0]["content"] == "line one\nline two"
    assert examples[1].prompt[0]["content"] == "plain\n\nwith, comma"
    assert [ex.completion for ex in examples] == ["out one", "out two"]
    # A record spanning lines 2-3 puts the next record on line 4.
    assert [ex.where for ex in examples] == [f"{path}:2", f"{path}:4"]


def test_csv_missing_required_column(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("instruction,input\na,b\n")
    with pytest.raises(DataError) as info:
        parse_rows(read_source(str(path)), make_cfg(path).data)
    assert "'output'" in info.value.title
    assert info.value.title.startswith(f"{path}:1:")
    assert info.value.hint is None


def test_csv_semicolon_delimiter_hint(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("instruction;input;output\na;b;c\nd;e;f\n")
    with pytest.raises(DataError) as info:
        load_examples(make_cfg(path))
    assert "delimiter" in (info.value.hint or "")


def test_csv_field_count_mismatch_is_a_problem(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("instruction,input,output\na,b,c\nd,e\nf,g,h,i\n")
    raw = read_source(str(path))
    assert [(p.where, p.code) for p in raw.problems] == [(f"{path}:3", "field_count"), (f"{path}:4", "field_count")]
    assert len(raw.rows) == 1


def test_tsv_is_tab_separated(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("instruction\tinput\toutput\na, b\t\tc\n")
    examples, problems = parse_rows(read_source(str(path)), make_cfg(path).data)
    assert problems == []
    assert [(ex.prompt[0]["content"], ex.completion) for ex in examples] == [("a, b", "c")]


def test_parquet_round_trip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = instruction_rows(5)
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    raw = read_source(str(path))
    assert [r for _, r in raw.rows] == rows
    examples, problems = parse_rows(raw, make_cfg(path).data)
    assert problems == []
    assert [ex.id for ex in examples] == [r["id"] for r in rows]
    assert [ex.completion for ex in examples] == [r["output"] for r in rows]
    assert examples[2].where == f"{path}:row 3"


# --- split, dedup, leakage, fingerprint -----------------------------------------------------------------


def _split_ids(path: Path, seed: int) -> tuple[list[str], list[str]]:
    cfg = config_from_dict({"seed": seed, "data": {"train": str(path), "format": "instruction"}})
    ex = load_examples(cfg)
    return [e.id for e in ex.splits["train"]], [e.id for e in ex.splits["validation"]]


def test_split_is_deterministic_per_seed(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", instruction_rows(40))
    train0, val0 = _split_ids(path, 0)
    assert len(val0) == 4 and len(train0) == 36
    assert set(train0).isdisjoint(val0)
    assert set(train0) | set(val0) == {f"r{i}" for i in range(40)}
    assert _split_ids(path, 0) == (train0, val0)
    train1, val1 = _split_ids(path, 1)
    assert len(val1) == 4
    assert set(val1) != set(val0)
    # Each part keeps file order.
    assert train0 == sorted(train0, key=lambda s: int(s[1:]))


def test_split_with_test_fraction(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", instruction_rows(40))
    ex = load_examples(make_cfg(path, validation_fraction=0.1, test_fraction=0.2))
    assert ex.report["rows"] == {"train": 28, "validation": 4, "test": 8}
    ids = [e.id for part in ex.splits.values() for e in part]
    assert len(ids) == len(set(ids)) == 40


def test_classification_split_is_stratified(tmp_path):
    counts = {"alpha": 30, "beta": 20, "gamma": 10}
    rows = [{"text": f"{label} text {i}", "label": label} for label, n in counts.items() for i in range(n)]
    rows = [rows[(i * 7) % len(rows)] for i in range(len(rows))]  # interleave labels (7 is coprime to 60)
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    ex = load_examples(make_cfg(path, "classification", validation_fraction=0.2))
    assert ex.labels == ["alpha", "beta", "gamma"]
    val = Counter(e.label for e in ex.splits["validation"])
    train = Counter(e.label for e in ex.splits["train"])
    for label, n in counts.items():
        assert abs(val[label] - 0.2 * n) <= 1, (label, val)
        assert val[label] + train[label] == n
    assert ex.report["labels"]["validation"] == dict(val)


def test_dedup_exact_and_normalized(tmp_path):
    rows = instruction_rows(20)
    exact = dict(rows[0], id="dup-exact")
    normalized = dict(rows[1], id="dup-norm", instruction="  REVERSE   the\tWords ", output=rows[1]["output"].upper())
    path = write_jsonl(tmp_path / "train.jsonl", rows + [exact, normalized])
    val = write_jsonl(tmp_path / "val.jsonl", instruction_rows(3, seed=99))
    ex = load_examples(make_cfg(path, validation=str(val)))
    assert ex.report["train_duplicates"] == {"exact_duplicates": 1, "normalized_duplicates": 1}
    ids = [e.id for e in ex.splits["train"]]
    assert len(ids) == 20 and "dup-exact" not in ids and "dup-norm" not in ids

    no_dedup = load_examples(make_cfg(path, validation=str(val), dedup=False))
    assert len(no_dedup.splits["train"]) == 22
    assert "train_duplicates" not in no_dedup.report


def test_validation_overlap_removed(tmp_path):
    rows = instruction_rows(20)
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    leak = dict(rows[5], id="leak", output=rows[5]["output"].upper())  # same after normalisation
    val_rows = [{"id": f"v{i}", "instruction": "sort the numbers", "output": str(i)} for i in range(4)] + [leak]
    val = write_jsonl(tmp_path / "val.jsonl", val_rows)
    ex = load_examples(make_cfg(path, validation=str(val)))
    assert ex.report["validation_overlap_removed"] == 1
    assert [e.id for e in ex.splits["validation"]] == ["v0", "v1", "v2", "v3"]
    assert ex.report["rows"] == {"train": 20, "validation": 4}


def test_fingerprint_changes_with_training_data(tmp_path):
    rows = instruction_rows(20)
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    fp = load_examples(make_cfg(path)).fingerprint
    assert len(fp) == 64
    assert load_examples(make_cfg(path)).fingerprint == fp
    changed = [dict(r) for r in rows]
    changed[3]["output"] = "a different answer"
    write_jsonl(path, changed)
    assert load_examples(make_cfg(path)).fingerprint != fp
    # The seed changes the split, so it changes the fingerprint too.
    write_jsonl(path, rows)
    other_seed = config_from_dict({"seed": 5, "data": {"train": str(path), "format": "instruction"}})
    assert load_examples(other_seed).fingerprint != fp


def test_fingerprint_changes_on_case_only_edit(tmp_path):
    rows = instruction_rows(20)
    val = write_jsonl(tmp_path / "val.jsonl", [{"instruction": "sort the numbers", "output": "1 2"}])
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    fp = load_examples(make_cfg(path, validation=str(val))).fingerprint
    changed = [dict(r) for r in rows]
    changed[3]["output"] = changed[3]["output"].upper()
    write_jsonl(path, changed)
    ex = load_examples(make_cfg(path, validation=str(val)))
    assert ex.splits["train"][3].completion == rows[3]["output"].upper()  # the trained text did change
    assert ex.fingerprint != fp


# --- classification labels ------------------------------------------------------------------------------


def test_classification_label_problems(tmp_path):
    path = write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"text": f"{SECRET} good", "label": "pos"},
            {"text": f"{SECRET} unknown", "label": "maybe"},
            {"text": f"{SECRET} null", "label": None},
            {"text": f"{SECRET} int", "label": 1},
            {"text": f"{SECRET} list", "label": ["pos"]},
        ],
    )
    cfg = make_cfg(path, "classification", labels=["pos", "neg", "1"])
    examples, problems = parse_rows(read_source(str(path)), cfg.data)
    assert [(p.where, p.code) for p in problems] == [
        (f"{path}:2", "unknown_label"),
        (f"{path}:3", "bad_label"),
        (f"{path}:5", "bad_label"),
    ]
    assert [(ex.where, ex.label) for ex in examples] == [(f"{path}:1", "pos"), (f"{path}:4", "1")]
    assert all(SECRET not in str(p) for p in problems)


def test_empty_csv_label_is_a_problem(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("text,label\nhello,pos\nworld,\n")
    examples, problems = parse_rows(read_source(str(path)), make_cfg(path, "classification").data)
    assert [ex.label for ex in examples] == ["pos"]
    assert [(p.where, p.code) for p in problems] == [(f"{path}:3", "bad_label")]


def test_label_only_in_validation_refused(tmp_path):
    train = write_jsonl(
        tmp_path / "train.jsonl", [{"text": f"t{i}", "label": "pos" if i % 2 else "neg"} for i in range(10)]
    )
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "v1", "label": "pos"}, {"text": "v2", "label": "neutral"}])
    with pytest.raises(DataError) as info:
        load_examples(make_cfg(train, "classification", validation=str(val)))
    assert info.value.problems == [f"{val}:2"]  # where the row is, never the label's text
    assert "neutral" not in str(info.value)
    # With the label set given, it is accepted (and counted per split).
    ex = load_examples(make_cfg(train, "classification", validation=str(val), labels=["neg", "pos", "neutral"]))
    assert ex.report["labels"]["validation"] == {"pos": 1, "neutral": 1}


# --- CLI: tunesmith data check -----------------------------------------------------------------------------


def test_cli_data_check_prints_report(tiny_config, tmp_path):
    path = write_config(tmp_path, tiny_config)
    proc = run_cli("data", "check", path, cwd=tmp_path, timeout=180)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["rows"]["train"] == 48
    # val.jsonl's 12 rows share none with train and all fit max_length: every one is kept.
    assert report["rows"]["validation"] == 12 and report["validation_overlap_removed"] == 0
    assert report["tokens"]["train"]["rows"] == 48 and report["tokens"]["validation"]["rows"] == 12
    assert len(report["fingerprint"]) == 64


def test_cli_data_check_bad_rows_exit_2(tiny_config, tmp_path):
    train = Path(tiny_config["data"]["train"])
    lines = train.read_text().splitlines()
    lines[2] = lines[2][:-5]  # truncate the JSON on line 3
    train.write_text("\n".join(lines) + "\n")
    path = write_config(tmp_path, tiny_config)
    proc = run_cli("data", "check", path, cwd=tmp_path, timeout=180)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert f"{train}:3: malformed JSON" in proc.stderr
    assert proc.stdout == ""


def test_saved_hf_dataset_directory_is_a_source(tmp_path):
    import datasets

    from tunesmith.data.sources import read_source

    rows = [{"text": "a b", "label": "x"}, {"text": "c d", "label": "y"}]
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "ds")
    raw = read_source(str(tmp_path / "ds"))
    assert [r for _, r in raw.rows] == [{"text": "a b", "label": "x"}, {"text": "c d", "label": "y"}]
    assert raw.rows[1][0].endswith(":row 2")
