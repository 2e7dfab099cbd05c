"""Catastrophic forgetting: how much the perplexity of general text rose since the base model.

ratio = perplexity now / perplexity of the base model (1.0: nothing forgotten; 1.05: +5%), and the
absolute change, per retention set. A run's forgetting is its worst set's ratio.
"""

from __future__ import annotations


def forgetting(base: dict[str, float], now: dict[str, float]) -> dict[str, dict[str, float]]:
    return {
        name: {"before": b, "after": now[name], "ratio": now[name] / b, "change": now[name] - b}
        for name, b in base.items()
        if name in now and b > 0
    }


def worst_ratio(report: dict[str, dict[str, float]]) -> float | None:
    return max((v["ratio"] for v in report.values()), default=None)


def over_limit(ratio: float | None, max_increase: float | None) -> bool:
    """Over the limit when the worst ratio exceeds 1 + max_increase. A NaN ratio (a diverged model)
    counts as over: it must never be chosen as the best checkpoint."""
    if max_increase is None or ratio is None:
        return False
    return not ratio <= 1 + max_increase
