"""What the loop does when a step goes wrong: out of memory, a loss spike (an fp16 overflow: precision.py).

Each guard keeps its state in plain numbers so a checkpoint can carry it (exact resume).
"""

from __future__ import annotations

from collections import deque
from statistics import median

import torch


def is_oom(exc: BaseException) -> bool:
    """Out-of-memory as torch raises it on GPU (OutOfMemoryError) or as a plain RuntimeError message
    (CPU allocators, older torch, and the fakes accelerate's own tests use)."""
    text = str(exc).lower()
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
    )


class SpikeDetector:
    """A step whose loss is over `factor` times the median of the last `window` accepted losses is a
    spike. The median (not the mean) keeps one earlier spike from hiding the next; spikes never enter
    the history. No verdict until `min_history` losses are in: the first steps move too fast."""

    def __init__(self, factor: float, window: int, min_history: int = 10):
        self.factor, self.window, self.min_history = factor, window, min(min_history, window)
        self.history: deque[float] = deque(maxlen=window)
        self.flagged: list[int] = []  # data steps of spikes still inside the window

    def check(self, loss: float, data_step: int) -> bool:
        self.flagged = [d for d in self.flagged if d > data_step - self.window]
        if len(self.history) >= self.min_history and loss > self.factor * median(self.history):
            self.flagged.append(data_step)
            return True
        self.history.append(loss)
        return False

    def state_dict(self) -> dict:
        return {"history": list(self.history), "flagged": list(self.flagged)}

    def load_state_dict(self, state: dict) -> None:
        self.history = deque(state["history"], maxlen=self.window)
        self.flagged = list(state["flagged"])
