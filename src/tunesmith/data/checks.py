"""Checks on the prepared splits, before any weights load: labels a classifier cannot learn from, rows
that contradict each other, and an optimizer step larger than the data. Like every data problem they
give counts and file:line, never a row's text or label value."""

from __future__ import annotations

import os
from collections import Counter

from rich.markup import escape

from tunesmith.config import Config
from tunesmith.data.formats import Example
from tunesmith.errors import DataError

MAX_LISTED = 20
IMBALANCE = 0.95  # a majority label above this share of train gets a warning
SHOWN_IN_WARNING = 5


def unseen_labels(parsed: dict[str, list[Example]], known: set[str]) -> None:
    rows = [ex for name in ("validation", "test") for ex in parsed.get(name, []) if ex.label not in known]
    if rows:
        more = f" (first {MAX_LISTED} shown)" if len(rows) > MAX_LISTED else ""
        raise DataError(
            f"{len(rows)} row(s) in validation/test carry {len({ex.label for ex in rows})} label(s) "
            f"never seen in train{more}",
            [ex.where for ex in rows[:MAX_LISTED]],
            hint="List the label set in data.labels, or fix the rows.",
        )


def train_labels(train: list[Example], warnings: list[str]) -> None:
    """One label trains a classifier to a loss of 0 and '100% accuracy' that mean nothing: refused.
    A strong majority is allowed (some tasks are like that) but said loudly."""
    counts = Counter(ex.label for ex in train)
    if len(counts) < 2:
        raise DataError(
            f"train has only one label ({len(train)} rows): a classifier cannot learn from it",
            hint="Add training rows of the other label(s); listing them in data.labels is not enough.",
        )
    top = max(counts.values())
    if top / len(train) > IMBALANCE:
        warnings.append(f"imbalanced labels: one label is {top / len(train):.1%} of train ({top} of {len(train)} rows)")


def conflicts(report: dict, name: str, where: list[str], removed: bool, warnings: list[str]) -> None:
    """Rows whose text appears with another label: in train (contradictory targets) or in a held-out
    split (leakage, and a label that disagrees with train's)."""
    if not where:
        return
    report.setdefault("label_conflicts", {})[name] = {"rows": len(where), "where": where[:MAX_LISTED]}
    shown = ", ".join(where[:SHOWN_IN_WARNING]) + (", ..." if len(where) > SHOWN_IN_WARNING else "")
    what = (
        "train row(s) share their text with a train row of another label"
        if name == "train"
        else f"{name} row(s) repeat a train text with another label" + (" (removed as leakage)" if removed else "")
    )
    warnings.append(f"label conflict: {len(where)} {what}: {shown}")


def step_fits(cfg: Config, n_rows: int) -> None:
    """An optimizer step of more rows than the training set is one full-batch step repeated: refused."""
    t = cfg.train
    world = os.environ.get("WORLD_SIZE", "1")
    world = int(world) if world.isdigit() and int(world) > 0 else 1
    if cfg.privacy is not None:  # a Poisson step: its expected size, whatever the micro-batch
        step = cfg.expected_batch(world)
        if step > n_rows:
            raise DataError(
                f"A DP-SGD step of {step:,} expected rows (privacy.expected_batch_size, or train.batch_size "
                f"x grad_accum x processes when it is null) is larger than the {n_rows} training rows",
                hint="Every row would join every step (no sampling, so no privacy amplification): set "
                "privacy.expected_batch_size well below the number of rows.",
            )
        return
    step = t.batch_size * t.grad_accum * world
    if step > n_rows:
        raise DataError(
            f"An optimizer step of {step:,} rows (train.batch_size {t.batch_size} x train.grad_accum "
            f"{t.grad_accum} x {world} process(es)) is larger than the {n_rows} training rows",
            hint=f"Lower train.batch_size or train.grad_accum: their product times the processes must "
            f"be at most {n_rows}.",
        )


def show(warnings: list[str]) -> None:
    if os.environ.get("RANK", "0") != "0":  # one warning per launch, not one per process
        return
    from tunesmith.console import console

    for w in warnings:
        console.print(f"[bold yellow]warning: {escape(w)}[/]", soft_wrap=True)
