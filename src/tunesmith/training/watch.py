"""Warnings a person watching the loss would give: overfitting, a flat loss. Each is said once."""

from __future__ import annotations


class Watch:
    def __init__(self, total_steps: int):
        self.total = total_steps
        self.ema: float | None = None
        self.start: float | None = None  # the smoothed loss over the first steps
        self.evals: list[tuple[int, float, float]] = []  # (step, validation loss, smoothed train loss)
        self.said: set[str] = set()

    def step(self, step: int, loss: float) -> str | None:
        self.ema = loss if self.ema is None else 0.9 * self.ema + 0.1 * loss
        if step == min(10, self.total):
            self.start = self.ema
        # Flat: a fifth of the run (at least 50 steps) and the smoothed loss moved under 1%.
        if self.start and step >= max(50, self.total // 5) and abs(self.ema - self.start) < 0.01 * abs(self.start):
            return self._once("flat", f"training loss is flat ({self.start:.4f} -> {self.ema:.4f} over {step} "
                              "steps): is train.lr too low?")
        return None

    def evaluated(self, step: int, val_loss: float | None) -> str | None:
        if val_loss is None or self.ema is None:
            return None
        self.evals.append((step, val_loss, self.ema))
        if len(self.evals) < 3:
            return None
        (_, v0, t0), (_, v1, t1), (_, v2, t2) = self.evals[-3:]
        if v2 > v1 > v0 and t2 < t1 < t0:  # two rises of validation loss while training loss kept falling
            return self._once("overfit", f"validation loss rose {v0:.4f} -> {v2:.4f} while training loss fell "
                              f"{t0:.4f} -> {t2:.4f}: overfitting (set train.early_stopping.patience to stop "
                              "at the best evaluation)")
        return None

    def _once(self, key: str, message: str) -> str | None:
        if key in self.said:
            return None
        self.said.add(key)
        return message
