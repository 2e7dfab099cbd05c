"""One readable recipe per task family: setup -> fit -> evaluate -> save.

causal_lm       instruction, summarization, constrained generation, language modeling
classification  sentiment and any label set
preference      DPO, IPO and SimPO on pairs of answers
building        a run's Setup: accelerator, optimizer, schedule, batch plan, stepper
fitting         the fitting loop both share: micro-batches, the update, the bookkeeping after it
loop            the run's sequence both share: base evaluation, fit, save, fine-tuned evaluation
recipe          the Recipe protocol: what the sequence asks of a recipe (setup, evaluate, save)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tunesmith.config import Config
    from tunesmith.recipes.recipe import Recipe


def recipe_for(cfg: Config) -> Recipe:
    if cfg.task_name == "classification":
        from tunesmith.recipes import classification

        return classification.RECIPE
    if cfg.task_name == "preference":
        from tunesmith.recipes import preference

        return preference.RECIPE
    from tunesmith.recipes import causal_lm

    return causal_lm.RECIPE
