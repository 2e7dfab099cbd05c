"""Warnings a person watching the loss would give: overfitting, a flat loss. Each is said once, also
across a resume: the watch's state travels in the checkpoint (state.json), like early stopping's."""

from __future__ import annotations

import math

WARMUP = 10  # updates the smoothed loss needs before it is a fair baseline


class Watch:
    def __init__(self, total_steps: int):
        self.total = total_steps
        self.ema: float | None = None
        self.start: float | None = None  # the smoothed loss at update min(WARMUP, total)
        self.evals: list[tuple[int, float, float]] = []  # (step, validation loss, smoothed train loss)
        self.said: set[str] = set()
        self.flat_checked = False

    def step(self, step: int, loss: float) -> str | None:
        self.ema = loss if self.ema is None else 0.9 * self.ema + 0.1 * loss
        if step == min(WARMUP, self.total):
            self.start = self.ema
        # Flat (README): a fifth of the way in (at least 50 updates), the smoothed loss is within 1% of where
        # it was at update 10. Judged once: a loss that fell and later came back is not "lr too low".
        if self.flat_checked or step < max(50, self.total // 5) or self.start is None:
            return None
        self.flat_checked = True
        if abs(self.ema - self.start) < 0.01 * abs(self.start):
            return self._once(
                "flat",
                f"training loss is flat ({self.start:.4f} -> {self.ema:.4f} over {step} steps): is train.lr too low?",
            )
        return None

    def evaluated(self, step: int, val_loss: float | None) -> str | None:
        if val_loss is None or self.ema is None:
            return None
        self.evals.append((step, val_loss, self.ema))
        if len(self.evals) < 3:
            return None
        (_, v0, t0), (_, v1, t1), (_, v2, t2) = self.evals[-3:]
        if v2 > v1 > v0 and t2 < t1 < t0:  # two rises of validation loss while training loss kept falling
            return self._once(
                "overfit",
                f"validation loss rose {v0:.4f} -> {v2:.4f} while training loss fell "
                f"{t0:.4f} -> {t2:.4f}: overfitting (set train.early_stopping.patience to stop "
                "at the best evaluation)",
            )
        return None

    def state_dict(self) -> dict:
        def num(x: float | None) -> float | None:  # state.json is strict JSON
            return x if x is None or math.isfinite(x) else None

        return {
            "ema": num(self.ema),
            "start": num(self.start),
            "evals": [list(e) for e in self.evals[-3:]],
            "said": sorted(self.said),
            "flat_checked": self.flat_checked,
        }

    def load_state_dict(self, state: dict | None) -> None:
        """None: a checkpoint from before the watch was saved. Without a baseline no flat warning is given
        (the step-10 loss is gone), which is better than judging from a later, smaller loss."""
        if state is None:
            self.flat_checked = True
            return
        self.ema, self.start = state["ema"], state["start"]
        self.evals = [tuple(e) for e in state["evals"]]
        self.said, self.flat_checked = set(state["said"]), state["flat_checked"]

    def _once(self, key: str, message: str) -> str | None:
        if key in self.said:
            return None
        self.said.add(key)
        return message
