"""Config sections of the guard rails: forgetting (retention:) and differential privacy (privacy:).

Only the schema; the guard rails themselves run in evaluation/forgetting.py and privacy/."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tunesmith.config.base import Strict


class RetentionSet(Strict):
    name: str = Field(..., description="Label in tables, e.g. wikitext2-en.")
    data: str = Field(..., description="General text (JSONL/CSV/Parquet/HF) whose perplexity should not rise.")
    column: str = Field("text", description="Column holding the text.")
    max_rows: int | None = Field(200, gt=0, description="Rows evaluated (the first N).")


class Replay(Strict):
    data: str = Field(..., description="General text to replay (not a retention set's rows: those measure).")
    column: str = Field("text", description="Column holding the text.")
    fraction: float = Field(0.1, gt=0, lt=1, description="Share of each step's rows that are replayed text.")
    max_rows: int | None = Field(2000, gt=0, description="Rows of the replay pool (the first N).")


class Retention(Strict):
    """Catastrophic-forgetting guard. A plain list in YAML is taken as `sets`."""

    sets: list[RetentionSet] = Field(
        default_factory=list, description="General-text sets measured before, at every evaluation, and after."
    )
    max_increase: float | None = Field(
        None,
        gt=0,
        description="Largest allowed rise of retention perplexity (0.05: +5%). The best checkpoint is "
        "chosen among evaluations under it; with stop_when_exceeded, training stops at the first one over it.",
    )
    stop_when_exceeded: bool = Field(False, description="Stop training when forgetting exceeds max_increase.")
    replay: Replay | None = Field(None, description="Mix general text into every training step (mitigation).")
    l2sp: float = Field(
        0.0,
        ge=0,
        description="L2-SP: pull trainable weights toward their pretrained values with this strength "
        "(adds l2sp * (w - w0) to each gradient). Meant for full fine-tuning.",
    )

    @model_validator(mode="after")
    def _limit_needs_sets(self) -> Retention:
        if (self.max_increase is not None or self.stop_when_exceeded) and not self.sets:
            raise ValueError("max_increase and stop_when_exceeded need at least one retention set (sets:)")
        if self.stop_when_exceeded and self.max_increase is None:
            raise ValueError("stop_when_exceeded needs max_increase")
        return self


class Privacy(Strict):
    """DP-SGD through Opacus: Poisson sampling, per-example clipping, Gaussian noise, an accountant."""

    target_epsilon: float | None = Field(
        None,
        description="Privacy budget: the noise is set so training ends at or under this epsilon, and training "
        "stops before a step would exceed it.",
    )
    delta: float | None = Field(
        None, description="delta of (epsilon, delta)-DP; must be below 1/N (N: privacy units). Default 1/(10 N)."
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Per-example clipping norm C.")
    noise_multiplier: float | None = Field(
        None,
        ge=0,
        description="Noise std as a multiple of C, instead of deriving it from target_epsilon (with both, "
        "target_epsilon is the budget training stops at).",
    )
    accountant: Literal["prv", "rdp"] = Field("prv", description="Privacy accountant (prv is tighter).")
    unit: Literal["sample", "user"] = Field(
        "sample",
        description="Privacy unit. user: one row per sampled user per step, so the guarantee covers "
        "everything a user contributed (needs user_column).",
    )
    user_column: str | None = Field(None, description="Column holding the user id (unit: user).")
    secure_mode: bool = Field(
        False,
        description="Noise from a cryptographically secure RNG (needs torchcsprng; "
        "refused, not downgraded, without it). Off: noise is reproducible from the seed.",
    )

    @model_validator(mode="after")
    def _coherent(self) -> Privacy:
        if self.target_epsilon is not None and self.target_epsilon <= 0:
            raise ValueError(f"target_epsilon must be > 0, got {self.target_epsilon}")
        if self.target_epsilon is None and self.noise_multiplier is None:
            raise ValueError("set target_epsilon (the budget) or noise_multiplier")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if self.unit == "user" and not self.user_column:
            raise ValueError("unit: user needs user_column (the column with each row's user id)")
        return self
