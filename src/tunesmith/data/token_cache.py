"""Tokenized splits cached on disk, keyed by everything that decides the tokens.

The key hashes the parsed rows of every split, the tokenizer (its vocabulary,
merges, special tokens and chat template, as it serialises itself), the data settings that shape
tokens (format, columns, prompts, max_length, overlength, completion_only_loss, labels) and a format
version. Any change gives a new key, so a stale cache is never read. The cache is JSON (never
pickle), written atomically; an unreadable entry is ignored and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from tunesmith.data.tokenize import LabeledRow, Tokenized, TokenizedSplit
from tunesmith.paths import home

VERSION = 1
SETTINGS = (
    "format",
    "columns",
    "prompt",
    "system_prompt",
    "max_length",
    "overlength",
    "completion_only_loss",
    "labels",
)


def cache_key(splits: dict, tokenizer, data_cfg) -> str:
    h = hashlib.sha256(f"v{VERSION}\n".encode())
    for name in sorted(splits):  # the parsed rows themselves: every split, test included
        h.update(f"{name}\n{splits[name]!r}\n".encode("utf-8", "surrogatepass"))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))).encode())
    h.update(
        json.dumps(
            {
                "special": tokenizer.special_tokens_map,
                "template": getattr(tokenizer, "chat_template", None),
                "pad": tokenizer.pad_token_id,
                "class": type(tokenizer).__name__,
            },
            sort_keys=True,
            default=str,
        ).encode()
    )
    h.update(json.dumps({k: getattr(data_cfg, k) for k in SETTINGS}, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def cache_dir() -> Path:
    return home() / "cache" / "tokenized"


def load(key: str) -> dict[str, TokenizedSplit] | None:
    path = cache_dir() / f"{key}.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    out = {}
    for name, s in raw.items():
        row_type = LabeledRow if s["kind"] == "labeled" else Tokenized
        out[name] = TokenizedSplit([row_type(*r) for r in s["rows"]], s["counts"], s["overlength"], s["lengths"])
    return out


def save(key: str, splits: dict[str, TokenizedSplit]) -> None:
    data = {}
    for name, s in splits.items():
        labeled = bool(s.rows) and isinstance(s.rows[0], LabeledRow)
        rows = [[r.id, r.where, r.input_ids, r.label if labeled else r.labels] for r in s.rows]
        data[name] = {
            "kind": "labeled" if labeled else "lm",
            "rows": rows,
            "counts": s.counts,
            "overlength": s.overlength,
            "lengths": s.lengths,
        }
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, separators=(",", ":"))
        os.replace(tmp, folder / f"{key}.json")
    except OSError:
        pass  # a cache that cannot be written only costs the next run its tokenization time
