"""Task families: which generation metrics each one scores, and which metric decides "better".

One entry per family, registered in TASKS. Loss and perplexity are computed for every causal-LM
task by the recipe; a task with `generate=True` also generates answers for held-out rows and scores them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from tunesmith.data.formats import Example
from tunesmith.evaluation import metrics


def refs(examples: list[Example]) -> list[list[str]]:
    return [ex.references or [ex.completion] for ex in examples]


def score_instruction(outputs: list[str], stopped: list[bool], examples: list[Example]) -> dict:
    return {"rougeL": metrics.rouge(outputs, refs(examples))["rougeL"], **metrics.length_stats(outputs, stopped)}


def score_summarization(outputs: list[str], stopped: list[bool], examples: list[Example]) -> dict:
    return {**metrics.rouge(outputs, refs(examples)), **metrics.length_stats(outputs, stopped)}


def score_constrained(outputs: list[str], stopped: list[bool], examples: list[Example]) -> dict:
    return {
        **metrics.concept_coverage(outputs, [ex.concepts or [] for ex in examples]),
        "bleu4": metrics.bleu4(outputs, refs(examples)),
        "rougeL": metrics.rouge(outputs, refs(examples))["rougeL"],
    }


@dataclass(frozen=True)
class Task:
    name: str
    primary: str  # the metric that says whether the fine-tune helped
    mode: str  # "max" or "min"
    score: Callable[[list[str], list[bool], list[Example]], dict] | None = None

    @property
    def generate(self) -> bool:
        return self.score is not None


TASKS = {
    t.name: t
    for t in (
        Task("instruction", "rougeL", "max", score_instruction),
        Task("summarization", "rougeL", "max", score_summarization),
        Task("constrained_generation", "coverage", "max", score_constrained),
        Task("language_modeling", "perplexity", "min"),
        Task("classification", "accuracy", "max"),
        Task("preference", "preference_accuracy", "max", score_instruction),  # generations scored against chosen
    )
}


def generation_rows(task: Task, examples: list[Example], limit: int | None) -> list[Example]:
    """The rows scored by generation: the first `limit`, one per concept set for CommonGen-style data.

    Such files hold one row per reference; each concept set is scored once, against the references
    of all its rows (plus any `references` column), with the concepts compared in any order.
    """
    if task.name == "constrained_generation":
        groups: dict[tuple, Example] = {}
        for ex in examples:
            key = tuple(sorted(c.lower() for c in ex.concepts or ()))
            refs_so_far = groups[key].references if key in groups else []
            merged = list(dict.fromkeys(refs_so_far + (ex.references or []) + [ex.completion]))
            groups[key] = replace(groups.get(key, ex), references=merged)
        examples = list(groups.values())
    return examples[:limit] if limit else examples
