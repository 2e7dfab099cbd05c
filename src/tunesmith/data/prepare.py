"""Steps 1-2 of a run: read and validate every split, dedup and split, tokenize, report.

Reading and validation need no model, so bad data stops the run before any weights load.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from tunesmith.config import Config, DataConfig
from tunesmith.data import checks
from tunesmith.data import split as splitting
from tunesmith.data.formats import Example, parse_rows
from tunesmith.data.sources import Problem, read_source
from tunesmith.data.tokenize import TokenizedSplit, tokenize_classification, tokenize_examples
from tunesmith.errors import DataError

MAX_LISTED = checks.MAX_LISTED


@dataclass
class Examples:
    splits: dict[str, list[Example]]
    labels: list[str] | None
    fingerprint: str
    report: dict = field(default_factory=dict)


def _position(p: Problem) -> tuple[str, int]:
    source, _, line = p.where.rpartition(":")
    digits = "".join(ch for ch in line if ch.isdigit())
    return source, int(digits or 0)


def apply_error_policy(cfg: DataConfig, problems: list[Problem], total: int) -> dict[str, int]:
    if not problems:
        return {}
    counts = dict(Counter(p.code for p in problems))
    problems = sorted(problems, key=_position)
    if cfg.on_error == "error":
        listed = [str(p) for p in problems[:MAX_LISTED]]
        more = len(problems) - len(listed)
        raise DataError(
            f"{len(problems)} bad row(s) in the data; nothing was trained"
            + (f" (first {MAX_LISTED} shown)" if more else ""),
            listed,
            hint="Fix the rows, or set data.on_error=skip to drop them (counted in the data report).",
        )
    fraction = len(problems) / max(total, 1)
    if fraction > cfg.max_bad_fraction:
        raise DataError(
            f"{len(problems)} of {total} rows are bad ({fraction:.1%}), above data.max_bad_fraction="
            f"{cfg.max_bad_fraction:.1%}",
            [f"{code}: {n}" for code, n in sorted(counts.items())] + [str(p) for p in problems[:MAX_LISTED]],
        )
    return counts


def load_examples(cfg: Config) -> Examples:
    d = cfg.data
    parsed, report = read_splits(cfg)
    warnings: list[str] = []
    labels = d.labels
    if d.format == "classification" and labels is None:
        labels = sorted({ex.label for ex in parsed["train"]})
        checks.unseen_labels(parsed, set(labels))
    stratify = d.format == "classification"
    split_seed = cfg.seed if d.split_seed is None else d.split_seed
    train = hold_out(cfg, parsed, report, warnings, split_seed)
    if d.train_limit is not None:  # few-shot: after split and overlap removal, so validation is the same for every k
        seed = cfg.seed if d.sample_seed is None else d.sample_seed
        parsed["train"] = splitting.sample_k(train, d.train_limit, seed, stratify)
        report["train_limit"] = {
            "k": d.train_limit,
            "from": len(train),
            "kept": len(parsed["train"]),
            "sample_seed": seed,
        }
    refuse_empty(parsed, report)
    if stratify:
        checks.train_labels(parsed["train"], warnings)
    report["rows"] = {n: len(rows) for n, rows in parsed.items()}
    if labels is not None:
        report["labels"] = {n: dict(Counter(ex.label for ex in rows)) for n, rows in parsed.items()}
    if warnings:
        report["warnings"] = warnings
        checks.show(warnings)
    fp = splitting.fingerprint(parsed["train"], parsed["validation"], split_seed)
    report["fingerprint"] = fp
    return Examples(parsed, labels, fp, report)


def read_splits(cfg: Config) -> tuple[dict[str, list[Example]], dict]:
    """Every configured split, parsed; its bad rows stop the run or are counted, as data.on_error says.
    Returns the splits and the data report begun with the bad-row counts."""
    d = cfg.data
    sources = {"train": d.train, "validation": d.validation, "test": d.test}
    parsed: dict[str, list[Example]] = {}
    problems: list[Problem] = []
    total = 0
    for name, source in sources.items():
        if source is None:
            continue
        raw = read_source(source, d.hub_split_of(name))
        user_column = (
            cfg.privacy.user_column if cfg.privacy and cfg.privacy.unit == "user" and name == "train" else None
        )
        examples, bad = parse_rows(raw, d, user_column)
        parsed[name] = examples
        problems += bad
        total += raw.total
    return parsed, {"bad_rows": apply_error_policy(cfg.data, problems, total)}


def hold_out(
    cfg: Config, parsed: dict[str, list[Example]], report: dict, warnings: list[str], split_seed: int
) -> list[Example]:
    """Dedup train, split validation (and test) off it where not given, and take out of the held-out splits
    what train holds too. Returns train, also left in parsed["train"]."""
    d = cfg.data
    train = parsed["train"]
    if d.dedup:
        train, report["train_duplicates"] = splitting.dedup(train)
    checks.conflicts(report, "train", splitting.label_conflicts(train), False, warnings)
    if "validation" not in parsed:
        fractions = [d.validation_fraction] + ([d.test_fraction] if d.test_fraction and "test" not in parsed else [])
        parts = splitting.split_off(train, fractions, split_seed, d.format == "classification")
        train, parsed["validation"] = parts[0], parts[1]
        if len(parts) > 2:
            parsed["test"] = parts[2]
        report["split"] = f"validation{' and test' if len(parts) > 2 else ''} split off train (seed {split_seed})"
    parsed["train"] = train
    for name in ("validation", "test"):
        if name in parsed:  # the input alone decides leakage: relabelled text is leakage and a conflict
            kept, removed, relabelled = splitting.remove_overlap(train, parsed[name])
            if d.dedup:
                parsed[name], report[f"{name}_overlap_removed"] = kept, removed
            checks.conflicts(report, name, relabelled, d.dedup, warnings)
    return train


def refuse_empty(parsed: dict[str, list[Example]], report: dict) -> None:
    """A split left without rows stops the run, saying when overlap removal emptied it."""
    empty = [n for n, rows in parsed.items() if not rows]
    if empty:
        overlap = {n: report.get(f"{n}_overlap_removed") for n in empty}
        raise DataError(
            "No usable rows left in: "
            + ", ".join(
                n + (f" (all {overlap[n]} rows also appear in train, removed as leakage)" if overlap[n] else "")
                for n in empty
            ),
            hint="Give held-out rows that are not in train, or leave data.validation unset to split them off train."
            if any(overlap.values())
            else None,
        )


def _percentiles(lengths: list[int]) -> dict[str, int]:
    if not lengths:
        return {}
    q = np.percentile(lengths, [0, 50, 90, 95, 99, 100])
    return {k: int(v) for k, v in zip(("min", "p50", "p90", "p95", "p99", "max"), q)}


def _histogram(lengths: list[int], bins: int = 20) -> dict[str, list]:
    if not lengths:
        return {}
    counts, edges = np.histogram(lengths, bins=bins)
    return {"edges": [round(float(e), 1) for e in edges], "counts": [int(c) for c in counts]}


def tokenize_splits(cfg: Config, examples: Examples, tokenizer) -> dict[str, TokenizedSplit]:
    """Tokenize every split once; later runs on the same data, tokenizer and settings read the cache."""
    from tunesmith.data import token_cache

    key = token_cache.cache_key(examples.splits, tokenizer, cfg.data)
    out = token_cache.load(key) if cfg.data.format != "preference" else None
    if out is None and cfg.data.format == "preference":  # pairs: quick to tokenize, not cached
        from tunesmith.data.pairs import tokenize_pairs

        out = {name: tokenize_pairs(rows, tokenizer, cfg.data) for name, rows in examples.splits.items()}
    if out is None:
        if cfg.data.format == "classification":
            out = {
                name: tokenize_classification(rows, tokenizer, cfg.data, examples.labels)
                for name, rows in examples.splits.items()
            }
        else:
            out = {name: tokenize_examples(rows, tokenizer, cfg.data) for name, rows in examples.splits.items()}
        token_cache.save(key, out)
    over = [w for t in out.values() for w in t.overlength]
    if over and cfg.data.overlength == "error":
        listed = [f"{w}: longer than data.max_length={cfg.data.max_length} tokens" for w in over[:MAX_LISTED]]
        raise DataError(
            f"{len(over)} row(s) exceed data.max_length",
            listed,
            hint="Raise data.max_length, or choose data.overlength=truncate or drop (both counted).",
        )
    tok_report = {}
    for name, t in out.items():
        tok_report[name] = {
            "rows": len(t.rows),
            "token_lengths": _percentiles(t.lengths),
            "length_histogram": _histogram(t.lengths),
            **t.counts,
        }
        if not t.rows:
            raise DataError(
                f"Split '{name}' has no rows left after tokenization", [f"{k}: {v}" for k, v in t.counts.items()]
            )
    examples.report["tokens"] = tok_report
    return out
