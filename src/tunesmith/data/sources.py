"""Read raw rows from JSONL, CSV (either may be .gz/.bz2/.xz), Parquet, a saved HF dataset directory, or a hub id.

Every row carries where it came from (``file:line``) so that problems can be reported by position.
Problems never quote the row's content: training data may be private.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
import re
import stat
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.errors import DataError

NUL = b"\x00"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DECOMPRESS = {".gz": ("gzip", gzip.decompress), ".bz2": ("bzip2", bz2.decompress), ".xz": ("xz", lzma.decompress)}
# Signatures of compressed files: text data cannot start with these bytes (none is valid UTF-8 text).
MAGIC = ((b"\x1f\x8b", "gzip"), (b"\xfd7zXZ\x00", "xz"), (b"(\xb5/\xfd", "zstd"), (b"PK\x03\x04", "zip"))


@dataclass
class Problem:
    where: str  # "file:line"
    code: str  # short category, counted in the data report
    message: str  # never includes the row's text

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class RawRows:
    source: str
    rows: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (where, row)
    problems: list[Problem] = field(default_factory=list)
    header: list[str] | None = None  # CSV only: lets a missing column be named once, not per row

    @property
    def total(self) -> int:
        return len(self.rows) + len(self.problems)


def _decode_line(raw: bytes, where: str) -> tuple[str | None, Problem | None]:
    if b"\x00" in raw:
        return None, Problem(where, "nul_byte", f"NUL byte at byte {raw.index(NUL) + 1}")
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as err:
        bad = raw[err.start]
        return None, Problem(where, "invalid_utf8", f"invalid UTF-8 byte 0x{bad:02x} at byte {err.start + 1}")


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed when its name ends in .gz, .bz2 or .xz. Compressed bytes under a
    plain name are refused as a whole: read line by line they would give one NUL-byte error per line."""
    data = path.read_bytes()
    if path.suffix.lower() in DECOMPRESS:
        kind, decompress = DECOMPRESS[path.suffix.lower()]
        try:
            return decompress(data)
        except (OSError, EOFError, ValueError, lzma.LZMAError, zlib.error) as err:
            raise DataError(
                f"{path}: a {kind} file that could not be decompressed ({type(err).__name__})",
                hint="Is the file complete? Check it with `gzip -t`, `bzip2 -t` or `xz -t`.",
            ) from None
    kind = next((kind for magic, kind in MAGIC if data.startswith(magic)), None)
    if data[:3] == b"BZh" and data[4:10] == b"1AY&SY":  # "BZh" alone could start a CSV header
        kind = "bzip2"
    if kind is not None:
        readable = {"gzip": ".gz", "bzip2": ".bz2", "xz": ".xz"}.get(kind)
        hint = (
            f"Name it {path.name}{readable} (read directly), or decompress it."
            if readable
            else "Decompress it first (.gz, .bz2 and .xz files are read directly)."
        )
        raise DataError(f"{path}: file is {kind}-compressed, though named '{path.suffix}'", hint=hint)
    return data


def _check_encoding(data: bytes, name: str) -> bytes:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(
            f"{name}: file is UTF-16 encoded", hint="Convert it to UTF-8 (e.g. `iconv -f UTF-16 -t UTF-8`)."
        )
    return data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 BOM is harmless


def read_jsonl(path: Path) -> RawRows:
    out = RawRows(str(path))
    data = _check_encoding(_read_bytes(path), str(path))
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.removesuffix(b"\r")
        where = f"{path}:{lineno}"
        if not raw.strip():
            continue
        text, problem = _decode_line(raw, where)
        if problem:
            out.problems.append(problem)
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            out.problems.append(Problem(where, "malformed_json", f"malformed JSON ({err.msg}; column {err.colno})"))
            continue
        except (ValueError, RecursionError):  # numbers past int limits, nesting past the recursion limit
            out.problems.append(Problem(where, "malformed_json", "malformed JSON (too deeply nested or too large)"))
            continue
        if not isinstance(obj, dict):
            kind = {list: "an array", str: "a string"}.get(type(obj), type(obj).__name__)
            out.problems.append(Problem(where, "not_an_object", f"expected a JSON object, got {kind}"))
            continue
        out.rows.append((where, obj))
    return out


def read_csv(path: Path, delimiter: str = ",") -> RawRows:
    out = RawRows(str(path))
    data = _check_encoding(_read_bytes(path), str(path))
    bad_lines = []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        _, problem = _decode_line(raw, f"{path}:{lineno}")
        if problem:
            bad_lines.append(problem)
    if bad_lines:
        # An undecodable byte makes every later CSV record boundary suspect, so stop at the bytes.
        out.problems.extend(bad_lines)
        return out
    reader = csv.DictReader(io.StringIO(data.decode("utf-8"), newline=""), delimiter=delimiter, strict=True)
    header: list[str] = []
    try:
        header = reader.fieldnames or []
        start = reader.line_num
        for row in reader:
            where = f"{path}:{start + 1}"
            start = reader.line_num
            if None in row or any(v is None for v in row.values()):
                n = len(row) - (None in row) + len(row.get(None) or [])
                out.problems.append(Problem(where, "field_count", f"expected {len(header)} fields, got {n}"))
                continue
            out.rows.append((where, dict(row)))
    except csv.Error as err:
        out.problems.append(Problem(f"{path}:{reader.line_num}", "malformed_csv", f"malformed CSV ({err})"))
    out.header = list(header)
    return out


def read_parquet(path: Path) -> RawRows:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: not a readable Parquet file ({type(err).__name__})") from None
    out = RawRows(str(path))
    out.rows = [(f"{path}:row {i + 1}", r) for i, r in enumerate(table.to_pylist())]
    return out


def read_hf(source: str, split: str, on_disk: bool) -> RawRows:
    import datasets

    try:
        ds = datasets.load_from_disk(source) if on_disk else datasets.load_dataset(source, split=split)
    except Exception as err:  # network, missing split, bad dir: all user-fixable
        raise DataError(f"{source}: could not load dataset ({type(err).__name__}: {err})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{source}: no split '{split}' (has {sorted(ds)})")
        ds = ds[split]
    out = RawRows(source)
    out.rows = [(f"{source}:row {i + 1}", dict(r)) for i, r in enumerate(ds)]
    return out


def read_source(source: str, hub_split: str = "train") -> RawRows:
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return read_hf(str(path), hub_split, on_disk=True)
        raise DataError(f"{source}: a directory, but not a saved HF dataset (no dataset_info.json)")
    if path.is_file():
        compressed = path.suffix.lower() if path.suffix.lower() in DECOMPRESS else ""
        suffix = Path(path.stem).suffix.lower() if compressed else path.suffix.lower()
        if suffix in (".jsonl", ".json", ".ndjson"):
            return read_jsonl(path)
        if suffix in (".csv", ".tsv"):
            return read_csv(path, "\t" if suffix == ".tsv" else ",")
        if suffix == ".parquet" and not compressed:
            return read_parquet(path)
        raise DataError(
            f"{source}: unknown file type '{suffix}{compressed}' (use .jsonl, .csv or .parquet; "
            ".jsonl and .csv may end in .gz, .bz2 or .xz)"
        )
    if path.exists():  # a FIFO, device or socket: reading one could block, and a re-run could not read it again
        mode = path.stat().st_mode
        kind = "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
        raise DataError(
            f"{source}: not a regular file but {kind}",
            hint="Write the data to a file and name that file (a pipe can be read only once).",
        )
    if HUB_ID.match(source) and not source.startswith((".", "/")):
        return read_hf(source, hub_split, on_disk=False)
    raise DataError(f"Data file not found: {source}")
