"""Early stopping on a validation metric, with the best weights kept for restoring."""

from __future__ import annotations

import math

from tunesmith.config import EarlyStopping


class EarlyStopper:
    def __init__(self, cfg: EarlyStopping):
        self.cfg = cfg
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0

    def update(self, value: float | None, step: int) -> bool:
        """Record an evaluation; True when it is the new best. NaN is never the best."""
        if value is None or not math.isfinite(value):
            self.bad_evals += 1
            return False
        better = self.best is None or (
            value < self.best - self.cfg.min_delta if self.cfg.mode == "min" else value > self.best + self.cfg.min_delta
        )
        if better:
            self.best, self.best_step, self.bad_evals = value, step, 0
        else:
            self.bad_evals += 1
        return better

    @property
    def should_stop(self) -> bool:
        return self.cfg.patience is not None and self.bad_evals >= self.cfg.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_step, self.bad_evals = state["best"], state["best_step"], state["bad_evals"]
