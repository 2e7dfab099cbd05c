"""Files that are not plain data files: FIFOs and other non-regular files, compressed files."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os

import pytest
from conftest import instruction_rows, write_jsonl

from tunesmith.data.sources import read_source
from tunesmith.errors import DataError


def jsonl_bytes(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


# --- hostile input: a FIFO, a compressed file ------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")
def test_fifo_is_not_reported_missing(tmp_path):
    fifo = tmp_path / "train.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(DataError) as info:
        read_source(str(fifo))  # must not block: a FIFO is refused before it is opened
    assert "not found" not in str(info.value)
    assert "not a regular file" in str(info.value) and "FIFO" in str(info.value)


def test_gzip_named_jsonl_is_detected(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(gzip.compress(jsonl_bytes(instruction_rows(4))))
    with pytest.raises(DataError) as info:
        read_source(str(path))
    assert "gzip-compressed" in info.value.title
    assert ".jsonl.gz" in info.value.hint


@pytest.mark.parametrize(
    "suffix,compress", [(".jsonl.gz", gzip.compress), (".jsonl.bz2", bz2.compress), (".jsonl.xz", lzma.compress)]
)
def test_compressed_jsonl_is_read(tmp_path, suffix, compress):
    rows = instruction_rows(5)
    path = tmp_path / f"train{suffix}"
    path.write_bytes(compress(jsonl_bytes(rows)))
    raw = read_source(str(path))
    assert raw.problems == []
    assert [r for _, r in raw.rows] == rows
    assert raw.rows[2][0] == f"{path}:3"


def test_compressed_csv_is_read(tmp_path):
    path = tmp_path / "train.csv.gz"
    path.write_bytes(gzip.compress(b"instruction,output\na,b\nc,d\n"))
    raw = read_source(str(path))
    assert [r for _, r in raw.rows] == [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]
    assert raw.rows[1][0] == f"{path}:3"


def test_corrupt_gzip_is_a_data_error(tmp_path):
    path = tmp_path / "train.jsonl.gz"
    path.write_bytes(gzip.compress(jsonl_bytes(instruction_rows(20)))[:40])
    with pytest.raises(DataError) as info:
        read_source(str(path))
    assert "could not be decompressed" in info.value.title


def test_unknown_inner_type_of_compressed_file(tmp_path):
    path = tmp_path / "train.txt.gz"
    path.write_bytes(gzip.compress(b"hello\n"))
    with pytest.raises(DataError) as info:
        read_source(str(path))
    assert "unknown file type '.txt.gz'" in info.value.title


def test_plain_jsonl_still_reads(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", instruction_rows(3))
    assert len(read_source(str(path)).rows) == 3
