"""The `search:` block: which config keys an Optuna study varies, and how.

    search:
      metric: accuracy            # a validation metric of the task; default: train.early_stopping.metric
      space:
        train.lr: {log_uniform: [1.0e-5, 1.0e-3]}
        peft.r: {choice: [4, 8, 16]}
        train.warmup_ratio: {uniform: [0.0, 0.1]}
        train.epochs: {int: [1, 3]}

The schema only, on the strict base like every other section (inf/nan refused); search/run.py runs the study.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tunesmith.config.base import Strict

KINDS = ("log_uniform", "uniform", "integer", "choice")  # integer is written `int:` in YAML


class Dist(Strict):
    model_config = ConfigDict(populate_by_name=True)  # merged with Strict's: `int:` or `integer:`
    log_uniform: list[float] | None = Field(None, description="[low, high]: a float drawn on a log scale (low > 0).")
    uniform: list[float] | None = Field(None, description="[low, high]: a float drawn uniformly.")
    integer: list[int] | None = Field(None, alias="int", description="[low, high]: an integer, both ends included.")
    choice: list[Any] | None = Field(None, description="The values to choose from.")

    @model_validator(mode="after")
    def _one_kind_with_sane_bounds(self) -> Dist:
        given = [k for k in KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of log_uniform, uniform, int, choice, e.g. {log_uniform: [1.0e-5, 1.0e-3]}"
            )
        kind = given[0]
        values = getattr(self, kind)
        if kind == "choice":
            if not values:
                raise ValueError("choice needs at least one value")
            return self
        if len(values) != 2 or not values[0] < values[1]:
            raise ValueError(f"{kind.replace('integer', 'int')} needs [low, high] with low < high, got {values}")
        if kind == "log_uniform" and values[0] <= 0:
            raise ValueError(f"log_uniform needs low > 0, got {values[0]}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)

    def suggest(self, trial, name: str):
        values = getattr(self, self.kind)
        if self.kind == "choice":
            return trial.suggest_categorical(name, values)
        if self.kind == "integer":
            return trial.suggest_int(name, values[0], values[1])
        return trial.suggest_float(name, values[0], values[1], log=self.kind == "log_uniform")


class SearchConfig(Strict):
    space: dict[str, Dist] = Field(..., description="Dotted config key -> distribution.")
    metric: str | None = Field(
        None, description="Validation metric to optimise (default: the early-stopping metric, e.g. accuracy or loss)."
    )
    direction: Literal["minimize", "maximize"] | None = Field(
        None, description="Default: minimize for loss/perplexity, maximize otherwise."
    )
    sampler: Literal["tpe", "random"] = Field("tpe", description="Optuna sampler.")
    pruner: Literal["median", "none"] = Field(
        "median", description="Stop trials whose intermediate evaluations fall below the median of earlier trials."
    )
    startup_trials: int = Field(2, ge=0, description="Trials that are never pruned (the pruner's reference).")
    storage: str | None = Field(
        None,
        description="Optuna storage URL; default sqlite in the search directory. "
        "A shared database (e.g. postgresql://...) lets several machines run one study.",
    )
    heartbeat_s: int = Field(
        20,
        ge=1,
        description="A trial whose process stops beating this long x3 is "
        "marked failed (a killed run), never left running or counted as best.",
    )

    @model_validator(mode="after")
    def _non_empty(self) -> SearchConfig:
        if not self.space:
            raise ValueError("space needs at least one key, e.g. {train.lr: {log_uniform: [1.0e-5, 1.0e-3]}}")
        return self

    def objective(self, early_stopping_metric: str) -> tuple[str, str]:
        metric = (self.metric or early_stopping_metric).removeprefix("eval_")
        direction = self.direction or ("minimize" if metric in ("loss", "perplexity") else "maximize")
        return metric, direction


def unknown_keys(model: type[BaseModel], keys: list[str]) -> list[str]:
    """Dotted keys that name no field of the config schema (each checked down to its last part)."""
    bad = []
    for key in keys:
        node: Any = model
        for part in key.split("."):
            fields = getattr(node, "model_fields", None)
            if not fields or part not in fields:
                bad.append(key)
                break
            node = _model_of(fields[part].annotation)
    return bad


def _model_of(annotation) -> Any:
    """The pydantic model inside an annotation (Privacy | None -> Privacy), or None for a leaf."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of(arg)
        if found is not None:
            return found
    return None
