"""What the run's sequence (loop.py) asks of a recipe, in the order it asks: setup, evaluate, save.

A recipe is one file per task family (causal_lm.py, classification.py) that reads top to bottom as plain
functions; its last line bundles them, `RECIPE = Steps(setup, evaluate, save)`, into an object of this
shape, which loop.train() runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal, Protocol

if TYPE_CHECKING:
    from tunesmith.config import Config
    from tunesmith.recipes.building import Setup
    from tunesmith.rundir import RunDir

Which = Literal["base", "finetuned"]  # the model before any update, or after fitting


class Recipe(Protocol):
    """A task family's steps; loop.train() calls setup, evaluate("base"), fit, save, evaluate("finetuned")."""

    def setup(self, cfg: Config, run: RunDir) -> Setup:
        """Read and check the data (before any weights load), load the model, and build the run around it
        with building.build()."""
        ...

    def evaluate(self, s: Setup, which: Which) -> dict:
        """Score the model on every held-out split with the task's metrics; {split: metrics, ...}."""
        ...

    def save(self, s: Setup) -> None:
        """Write the trained weights into the run directory, in the format plain transformers/peft load."""
        ...

    def train(self, cfg: Config, resume: bool = False, overwrite: bool = False, **options: Any) -> RunDir:
        """This recipe through the run's sequence: loop.train(cfg, <this recipe>, ...)."""
        ...


@dataclass(frozen=True)
class Steps:
    """A recipe file's functions as a Recipe."""

    setup: Callable[[Config, RunDir], Setup]
    evaluate: Callable[[Setup, Which], dict]
    save: Callable[[Setup], None]

    def train(self, cfg: Config, resume: bool = False, overwrite: bool = False, **options: Any) -> RunDir:
        from tunesmith.recipes import loop

        return loop.train(cfg, self, resume=resume, overwrite=overwrite, **options)
