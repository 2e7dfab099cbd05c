"""One readable recipe per task family: setup -> fit -> evaluate -> save.

causal_lm       instruction, summarization, constrained generation, language modeling
classification  sentiment and any label set
loop            the training loop and run sequence both share
"""

from __future__ import annotations


def recipe_for(cfg):
    if cfg.task_name == "classification":
        from tunesmith.recipes import classification

        return classification
    from tunesmith.recipes import causal_lm

    return causal_lm
