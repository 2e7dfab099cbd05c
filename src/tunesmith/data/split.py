"""Deduplication, deterministic splits and train/validation leakage removal."""

from __future__ import annotations

import hashlib
import json
import random
import re
import unicodedata
from collections import defaultdict
from typing import Callable

from tunesmith.data.formats import Example


def normalize(s: str | None) -> str | None:
    if s is None:
        return None
    return re.sub(r"\s+", " ", unicodedata.normalize("NFC", s)).strip().casefold()


def exact_key(ex: Example) -> str:
    return json.dumps(ex.key_fields(), ensure_ascii=False)


def norm_key(ex: Example) -> str:
    return input_key(ex) + "\n" + json.dumps(ex.label, ensure_ascii=False)


def input_key(ex: Example) -> str:
    """The normalised row without its label: equal inputs with different labels are one text relabelled."""
    prompt, completion, text, _ = ex.key_fields()
    prompt = [(r, normalize(c)) for r, c in prompt]
    return json.dumps((prompt, normalize(completion), normalize(text)), ensure_ascii=False)


def dedup(examples: list[Example]) -> tuple[list[Example], dict[str, int]]:
    """Keep the first of each group equal after normalisation (case, whitespace, Unicode NFC)."""
    seen_exact, seen_norm, kept = set(), set(), []
    counts = {"exact_duplicates": 0, "normalized_duplicates": 0}
    for ex in examples:
        ek, nk = exact_key(ex), norm_key(ex)
        if ek in seen_exact:
            counts["exact_duplicates"] += 1
        elif nk in seen_norm:
            counts["normalized_duplicates"] += 1
        else:
            kept.append(ex)
        seen_exact.add(ek)
        seen_norm.add(nk)
    return kept, counts


def label_conflicts(examples: list[Example]) -> list[str]:
    """Where (file:line) the rows are whose input appears elsewhere in `examples` with another label."""
    labels: dict[str, set] = defaultdict(set)
    for ex in examples:
        labels[input_key(ex)].add(ex.label)
    return [ex.where for ex in examples if len(labels[input_key(ex)]) > 1]


def remove_overlap(train: list[Example], other: list[Example]) -> tuple[list[Example], int, list[str]]:
    """Drop rows of `other` whose input also appears in train, whatever their label: scoring on trained
    rows flatters the model. Also returns where the dropped rows carry a label train does not give them."""
    train_labels: dict[str, set] = defaultdict(set)
    for ex in train:
        train_labels[input_key(ex)].add(ex.label)
    kept = [ex for ex in other if input_key(ex) not in train_labels]
    relabelled = [ex.where for ex in other if train_labels.get(input_key(ex), {ex.label}) - {ex.label}]
    return kept, len(other) - len(kept), relabelled


def split_off(examples: list[Example], fractions: list[float], seed: int, stratify: bool) -> list[list[Example]]:
    """Split into [rest, part1, part2...] deterministically; per label when `stratify`."""
    groups: dict[str | None, list[Example]] = defaultdict(list)
    for ex in examples:
        groups[ex.label if stratify else None].append(ex)
    parts: list[list[Example]] = [[] for _ in range(len(fractions) + 1)]
    for label in sorted(groups, key=lambda k: (k is None, k)):
        members = groups[label]
        order = list(range(len(members)))
        random.Random(f"{seed}:{label}").shuffle(order)
        start = 0
        for i, frac in enumerate(fractions):
            n = max(1, round(len(members) * frac)) if len(members) > 1 else 0
            parts[i + 1].extend(members[j] for j in order[start : start + n])
            start += n
        parts[0].extend(members[j] for j in order[start:])
    # Keep the file order inside each part: it makes reports and diffs readable.
    index = {id(ex): i for i, ex in enumerate(examples)}
    return [sorted(p, key=lambda ex: index[id(ex)]) for p in parts]


def sample_k(examples: list[Example], k: int, seed: int, stratify: bool) -> list[Example]:
    """k examples for few-shot training; per label in proportion to the label counts (largest
    remainder), every label at least once when k allows, so a small k still shows every class."""
    if k >= len(examples):
        return list(examples)
    groups: dict[str | None, list[Example]] = defaultdict(list)
    for ex in examples:
        groups[ex.label if stratify else None].append(ex)
    labels = sorted(groups, key=lambda x: (x is None, x))
    exact = {lab: k * len(groups[lab]) / len(examples) for lab in labels}
    take = {lab: int(exact[lab]) for lab in labels}
    if k >= len(labels):
        for lab in labels:
            take[lab] = max(take[lab], 1)
    for lab in sorted(labels, key=lambda x: (take[x] - exact[x], str(x))):  # most under-served first
        if sum(take.values()) >= k:
            break
        if take[lab] < len(groups[lab]):
            take[lab] += 1
    while sum(take.values()) > k:  # the at-least-one rule overshot: trim the largest share
        take[max(labels, key=lambda x: take[x] - exact[x])] -= 1
    chosen: set[int] = set()
    for lab in labels:
        members = groups[lab]
        order = list(range(len(members)))
        random.Random(f"{seed}:k:{lab}").shuffle(order)
        chosen |= {id(members[j]) for j in order[: take[lab]]}
    return [ex for ex in examples if id(ex) in chosen]


def demonstrations(
    examples: list[Example], k: int, seed: int, stratify: bool, turns: Callable[[Example], list[dict]]
) -> list[dict]:
    """k solved examples (sample_k) as earlier chat turns, for few-shot prompting: `turns` gives one
    example's question and answer messages. The same k for every question of a split."""
    return [m for ex in (sample_k(examples, k, seed, stratify) if k else []) for m in turns(ex)]


def fingerprint(train: list[Example], validation: list[Example], seed: int) -> str:
    h = hashlib.sha256(f"seed={seed}".encode())
    for name, part in (("train", train), ("validation", validation)):
        h.update(name.encode())
        for ex in part:
            h.update(exact_key(ex).encode())  # exact: a case-only edit is still changed data
            h.update(b"\n")
    return h.hexdigest()
