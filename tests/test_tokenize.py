"""Tokenization: completion-only labels, every-token text, and the over-length policies (drop, truncate,
error with file:line) of RELIABILITY.md D5."""

from __future__ import annotations

import pytest
from conftest import write_jsonl
from test_data import make_cfg

from tunesmith.data.formats import Example
from tunesmith.data.prepare import load_examples, tokenize_splits
from tunesmith.data.tokenize import IGNORE, render_prompt, tokenize_examples
from tunesmith.errors import DataError

# --- tokenization -----------------------------------------------------------------------------------------


def n_text_tokens(tok, text: str) -> int:
    return len(tok(text + tok.eos_token, add_special_tokens=False)["input_ids"])


def text_of_length(tok, n: int, char: str = "x") -> str:
    """A `text`-format row whose tokenized length (with the eos the text format appends) is exactly n."""
    for k in range(1, 20 * n):
        if n_text_tokens(tok, char * k) == n:
            return char * k
    raise AssertionError(f"no text of {n} tokens")


def prompt_of_length(tok, n: int) -> str:
    """A user message whose rendered prompt (template + generation prompt) is exactly n tokens."""
    for k in range(0, 20 * n):
        content = "x" * k
        prompt = render_prompt(tok, [{"role": "user", "content": content}])
        if len(tok(prompt, add_special_tokens=False)["input_ids"]) == n:
            return content
    raise AssertionError(f"no prompt of {n} tokens")


def test_completion_only_labels_mask_the_prompt(tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    ex = Example(
        "f.jsonl:1", "a", prompt=[{"role": "user", "content": "reverse the words one two"}], completion="two one"
    )
    cfg = make_cfg(tmp_path / "unused.jsonl", max_length=256)
    prompt_ids = tok(render_prompt(tok, ex.prompt), add_special_tokens=False)["input_ids"]
    out = tokenize_examples([ex], tok, cfg.data)
    assert len(out.rows) == 1
    row = out.rows[0]
    n_p = len(prompt_ids)
    assert n_p > 0 and len(row.input_ids) > n_p + 1
    assert row.input_ids[:n_p] == prompt_ids
    assert row.labels[:n_p] == [IGNORE] * n_p
    assert row.labels[n_p:] == row.input_ids[n_p:]
    assert IGNORE not in row.labels[n_p:]
    assert tok.decode(row.input_ids[n_p:]) == "two one<|im_end|>\n"
    assert row.n_trainable == len(row.input_ids) - n_p

    all_cfg = make_cfg(tmp_path / "unused.jsonl", max_length=256, completion_only_loss=False)
    row_all = tokenize_examples([ex], tok, all_cfg.data).rows[0]
    assert row_all.input_ids == row.input_ids
    assert row_all.labels == row_all.input_ids


def test_text_format_trains_on_every_token(tiny_tokenizer, tmp_path):
    cfg = make_cfg(tmp_path / "unused.jsonl", "text", max_length=64)
    row = tokenize_examples([Example("f:1", "t", text="one two three")], tiny_tokenizer, cfg.data).rows[0]
    assert row.labels == row.input_ids
    assert row.input_ids[-1] == tiny_tokenizer.eos_token_id
    assert len(row.input_ids) == n_text_tokens(tiny_tokenizer, "one two three")


MAXLEN = 32


@pytest.fixture
def length_examples(tiny_tokenizer) -> list[Example]:
    lengths = [MAXLEN - 1, MAXLEN, MAXLEN + 1, 10 * MAXLEN]
    texts = [text_of_length(tiny_tokenizer, n) for n in lengths]
    assert [n_text_tokens(tiny_tokenizer, t) for t in texts] == lengths
    return [Example(f"f.jsonl:{i + 1}", f"t{i}", text=t) for i, t in enumerate(texts)]


def test_overlength_drop(tiny_tokenizer, tmp_path, length_examples):
    cfg = make_cfg(tmp_path / "u.jsonl", "text", max_length=MAXLEN, overlength="drop")
    out = tokenize_examples(length_examples, tiny_tokenizer, cfg.data)
    assert [r.id for r in out.rows] == ["t0", "t1"]
    assert [len(r.input_ids) for r in out.rows] == [MAXLEN - 1, MAXLEN]
    assert out.counts == {"truncated": 0, "dropped_overlength": 2, "dropped_no_trainable": 0}
    assert out.overlength == ["f.jsonl:3", "f.jsonl:4"]
    assert out.lengths == [MAXLEN - 1, MAXLEN, MAXLEN + 1, 10 * MAXLEN]


def test_overlength_truncate(tiny_tokenizer, tmp_path, length_examples):
    cfg = make_cfg(tmp_path / "u.jsonl", "text", max_length=MAXLEN, overlength="truncate")
    out = tokenize_examples(length_examples, tiny_tokenizer, cfg.data)
    assert [r.id for r in out.rows] == ["t0", "t1", "t2", "t3"]
    assert [len(r.input_ids) for r in out.rows] == [MAXLEN - 1, MAXLEN, MAXLEN, MAXLEN]
    assert all(len(r.labels) == len(r.input_ids) for r in out.rows)
    assert out.counts == {"truncated": 2, "dropped_overlength": 0, "dropped_no_trainable": 0}
    # Truncation keeps the start.
    full = tiny_tokenizer(length_examples[3].text + tiny_tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    assert out.rows[3].input_ids == full[:MAXLEN]


def test_overlength_error_names_file_and_line(tiny_tokenizer, tmp_path, length_examples):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": ex.text} for ex in length_examples])
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "one two"}])
    cfg = make_cfg(train, "text", validation=str(val), max_length=MAXLEN, overlength="error")
    examples = load_examples(cfg)
    with pytest.raises(DataError) as info:
        tokenize_splits(cfg, examples, tiny_tokenizer)
    assert len(info.value.problems) == 2
    assert info.value.problems[0].startswith(f"{train}:3: ")
    assert info.value.problems[1].startswith(f"{train}:4: ")
    assert "data.max_length=32" in info.value.problems[0]

    ok = make_cfg(train, "text", validation=str(val), max_length=MAXLEN, overlength="drop")
    examples = load_examples(ok)
    out = tokenize_splits(ok, examples, tiny_tokenizer)
    assert len(out["train"].rows) == 2
    assert examples.report["tokens"]["train"]["dropped_overlength"] == 2
    assert examples.report["tokens"]["train"]["token_lengths"]["max"] == 10 * MAXLEN


def test_truncation_that_cuts_the_whole_completion_drops_the_row(tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    exact = prompt_of_length(tok, MAXLEN)  # prompt fills max_length: nothing of the completion survives
    one_short = prompt_of_length(tok, MAXLEN - 1)  # one completion token survives
    examples = [
        Example("f:1", "full", prompt=[{"role": "user", "content": exact}], completion="one two three"),
        Example("f:2", "longer", prompt=[{"role": "user", "content": exact + "x" * 40}], completion="one"),
        Example("f:3", "keep", prompt=[{"role": "user", "content": one_short}], completion="one two three"),
    ]
    cfg = make_cfg(tmp_path / "u.jsonl", "prompt_completion", max_length=MAXLEN, overlength="truncate")
    out = tokenize_examples(examples, tok, cfg.data)
    assert out.counts == {"truncated": 3, "dropped_overlength": 0, "dropped_no_trainable": 2}
    assert [r.id for r in out.rows] == ["keep"]
    row = out.rows[0]
    assert len(row.input_ids) == MAXLEN
    assert row.labels[:-1] == [IGNORE] * (MAXLEN - 1)
    assert row.labels[-1] == row.input_ids[-1] != IGNORE
    assert row.n_trainable == 1
