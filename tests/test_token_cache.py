"""The tokenization cache: a second run reads it; any change to data, tokenizer or settings misses it."""

from __future__ import annotations

import pytest
from conftest import instruction_rows, write_jsonl

from tunesmith.config import config_from_dict
from tunesmith.data import token_cache
from tunesmith.data.prepare import load_examples, tokenize_splits


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _cfg(tmp_path, rows, **data):
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    return config_from_dict(
        {"data": {"train": str(train), "format": "instruction", "max_length": 64, "overlength": "truncate", **data}}
    )


def test_second_tokenization_reads_the_cache_and_gives_the_same_rows(tmp_path, home, tiny_tokenizer, monkeypatch):
    cfg = _cfg(tmp_path, instruction_rows(30))
    first = tokenize_splits(cfg, load_examples(cfg), tiny_tokenizer)
    assert len(list((home / "cache" / "tokenized").glob("*.json"))) == 1

    from tunesmith.data import prepare

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again instead of reading the cache")

    monkeypatch.setattr(prepare, "tokenize_examples", no_tokenizing)
    second = tokenize_splits(cfg, load_examples(cfg), tiny_tokenizer)
    assert {k: v.rows for k, v in second.items()} == {k: v.rows for k, v in first.items()}
    assert {k: (v.counts, v.lengths, v.overlength) for k, v in second.items()} == {
        k: (v.counts, v.lengths, v.overlength) for k, v in first.items()
    }


def test_changed_data_tokenizer_or_settings_miss_the_cache(tmp_path, home, tiny_tokenizer):
    rows = instruction_rows(30)
    cfg = _cfg(tmp_path, rows)
    key = token_cache.cache_key(load_examples(cfg).splits, tiny_tokenizer, cfg.data)
    assert token_cache.cache_key(load_examples(cfg).splits, tiny_tokenizer, cfg.data) == key  # stable
    changed = [dict(r) for r in rows]
    changed[5]["output"] += " more"
    (tmp_path / "b").mkdir()
    other = _cfg(tmp_path / "b", changed)
    assert token_cache.cache_key(load_examples(other).splits, tiny_tokenizer, other.data) != key
    longer = _cfg(tmp_path, rows, max_length=32)
    assert token_cache.cache_key(load_examples(longer).splits, tiny_tokenizer, longer.data) != key
    tiny_tokenizer.chat_template, saved = "{{ messages }}", tiny_tokenizer.chat_template
    try:
        assert token_cache.cache_key(load_examples(cfg).splits, tiny_tokenizer, cfg.data) != key
    finally:
        tiny_tokenizer.chat_template = saved


def test_an_unreadable_cache_entry_is_ignored(tmp_path, home, tiny_tokenizer):
    cfg = _cfg(tmp_path, instruction_rows(30))
    key = token_cache.cache_key(load_examples(cfg).splits, tiny_tokenizer, cfg.data)
    (home / "cache" / "tokenized").mkdir(parents=True)
    (home / "cache" / "tokenized" / f"{key}.json").write_text("{not json")
    splits = tokenize_splits(cfg, load_examples(cfg), tiny_tokenizer)
    assert splits["train"].rows and token_cache.load(key) is not None  # rewritten
