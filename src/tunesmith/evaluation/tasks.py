"""Task families: which generation metrics each one scores, and which metric decides "better".

One entry per family, registered in TASKS. Loss and perplexity are computed for every causal-LM
task by the recipe; a task with `generate=True` also generates answers for held-out rows and scores them.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    )
}


def generation_rows(task: Task, examples: list[Example], limit: int | None) -> list[Example]:
    """The rows scored by generation: the first `limit`, one per concept set for CommonGen-style data
    (its files hold one row per reference; scoring each would count a concept set several times)."""
    if task.name == "constrained_generation":
        seen, unique = set(), []
        for ex in examples:
            key = tuple(ex.concepts or ())
            if key not in seen:
                seen.add(key)
                unique.append(ex)
        examples = unique
    return examples[:limit] if limit else examples
