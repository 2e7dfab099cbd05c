"""Config section eval.decoding: how generation turns a prompt into the one output that is scored and served.

The default is today's greedy single output. With num_candidates > 1 the model samples (do_sample) or
beam-searches (num_beams) that many candidates per prompt and one is kept (evaluation/decoding.py).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationError, model_validator

from tunesmith.config.base import Strict
from tunesmith.errors import ConfigError


class Decoding(Strict):
    num_candidates: int = Field(
        1,
        ge=1,
        le=64,
        description="Candidates generated per prompt, one kept (see rerank); memory grows with "
        "eval.batch_size x num_candidates. 1: one output (greedy unless do_sample).",
    )
    do_sample: bool = Field(False, description="Sample the candidates (temperature, top_p) instead of greedy/beam.")
    temperature: float = Field(1.0, gt=0, le=10, description="With do_sample: softmax temperature.")
    top_p: float = Field(
        1.0, gt=0, le=1, description="With do_sample: nucleus sampling mass (1: the whole vocabulary)."
    )
    num_beams: int = Field(
        1, ge=1, le=64, description="Beam search width (1: none); its best num_candidates beams are the candidates."
    )
    rerank: Literal["score", "coverage"] = Field(
        "score",
        description="Which candidate is kept. score: the highest mean log-probability per generated "
        "token (EOS included, before temperature/top_p; beam search: its own ranking, length_penalty 1). "
        "coverage (constrained_generation): the one using most of the row's concepts, by the coverage metric's "
        "rule (inflections count); ties by score.",
    )

    @model_validator(mode="after")
    def _candidates_can_differ(self) -> Decoding:
        if self.do_sample and self.num_beams > 1:
            raise ValueError("choose do_sample or num_beams > 1, not both")
        if self.num_candidates > 1 and not self.do_sample and self.num_beams == 1:
            raise ValueError(
                f"num_candidates {self.num_candidates} needs do_sample: true or num_beams >= "
                f"{self.num_candidates} (greedy decoding gives one output per prompt)"
            )
        if self.num_beams > 1 and self.num_candidates > self.num_beams:
            raise ValueError(f"num_candidates {self.num_candidates} is more than num_beams {self.num_beams}")
        return self

    @property
    def plain(self) -> bool:
        """Today's greedy single output."""
        return self == Decoding()

    @property
    def by_concepts(self) -> bool:
        """Whether the kept output depends on each prompt's concepts."""
        return self.rerank == "coverage" and self.num_candidates > 1


def task_problem(task: str, decoding: Decoding) -> str | None:
    """What is wrong with `decoding` for a run of `task`, or None."""
    if task == "classification" and not decoding.plain:
        return "eval.decoding is for generative tasks: a classifier's label comes from its head, not generation"
    if decoding.rerank == "coverage" and task != "constrained_generation":
        return (
            f"eval.decoding.rerank: coverage needs each row's concepts (task constrained_generation, "
            f"data.format: concepts); task {task} has none: use rerank: score"
        )
    return None


def for_command(decoding: Decoding, task: str, num_candidates: int | None, items: list[str] | None) -> Decoding:
    """The run's decoding with a command's --num-candidates and --decoding KEY=VALUE applied."""
    items = ([f"num_candidates={num_candidates}"] if num_candidates is not None else []) + list(items or [])
    return with_overrides(decoding, task, items, "--num-candidates/--decoding") if items else decoding


def with_overrides(decoding: Decoding, task: str, items: list[str], source: str = "--decoding") -> Decoding:
    """`decoding` with key=value overrides from the command line, checked like the config file."""
    from tunesmith.config import format_validation_error, parse_overrides

    tree = decoding.model_dump()
    tree.update(parse_overrides(items))
    try:
        changed = Decoding.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(
            f"Bad {source}",
            [
                "eval.decoding" + ("." + p if not p.startswith("(top level)") else p.removeprefix("(top level)"))
                for p in format_validation_error(err)
            ],
        ) from None
    problem = task_problem(task, changed)
    if problem:
        raise ConfigError(f"Bad {source}", [problem])
    return changed
