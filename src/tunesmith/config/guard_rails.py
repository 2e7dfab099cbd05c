"""Config sections of the guard rails: forgetting (retention:) and differential privacy (privacy:).

Only the schema; the guard rails themselves run in evaluation/forgetting.py and privacy/."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PrivateAttr, model_validator

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


# The DP fine-tuning recipe: what Li et al. 2021 ("Large Language Models Can Be Strong Differentially
# Private Learners", private-transformers' launchers) and Yu et al. 2021 ("Differentially Private Fine-tuning
# of Language Models", DP-LoRA) found works: large expected batches, more epochs, an lr above the
# non-private one, a small clipping norm so every example is clipped, and a decaying schedule.
RECIPE_BATCH = 1024  # Li et al.: 1,000 rows (SST-2, QNLI), 1,024 (E2E, DART)
RECIPE_CLIP = 0.1  # Li et al.: C = 0.1 in every experiment
RECIPE_TRAIN: dict[str, Any] = {
    "lr": 1e-3,  # Yu et al., DP-LoRA on RoBERTa (AdamW, batch 2,000); 5x tunesmith's non-private LoRA 2e-4
    "epochs": 10.0,  # Li et al., E2E at batch 1,024 (Yu et al. run 20-50); non-private default: 1
    "schedule": "linear",  # Li et al.: linear decay; Yu et al.: polynomial (power 1) decay
}


class Privacy(Strict):
    """DP-SGD through Opacus: Poisson sampling, per-example clipping, Gaussian noise, an accountant. Its
    defaults are the DP recipe of Li et al. 2021 and Yu et al. 2021 (printed at start)."""

    target_epsilon: float | None = Field(
        None,
        description="Privacy budget: the noise is set so training ends at or under this epsilon, and training "
        "stops before a step would exceed it.",
    )
    delta: float | None = Field(
        None, description="delta of (epsilon, delta)-DP; must be below 1/N (N: privacy units). Default 1/(10 N)."
    )
    expected_batch_size: int | None = Field(
        RECIPE_BATCH,
        gt=0,
        description="Rows (or users) per step in expectation: each joins a step with "
        "probability expected_batch_size / N. train.batch_size stays the micro-batch, so memory does not grow "
        f"with it. Default {RECIPE_BATCH} (Li et al. 2021), or, when you set train.grad_accum, train.batch_size "
        "x grad_accum x processes as without DP (null: always that). At most N.",
    )
    max_grad_norm: float = Field(
        RECIPE_CLIP,
        gt=0,
        description=f"Per-example clipping norm C. Default {RECIPE_CLIP} "
        "(Li et al. 2021): small enough that every example is clipped.",
    )
    grad_sample_mode: Literal["hooks", "ghost"] = Field(
        "hooks",
        description="How per-example gradient norms are found. hooks: each micro-batch's per-example "
        "gradients are kept (cheap for LoRA: rank x width per layer); ghost: Opacus's ghost clipping takes the "
        "norms from activations and output gradients and runs a second backward with the clipping weights, "
        "never holding per-example gradients (for full fine-tuning, whose per-example gradients are the size "
        "of the model per row). Same update either way.",
    )
    recipe_defaults: bool = Field(
        True,
        description="Train keys you did not set take the DP recipe's values: train.lr "
        f"{RECIPE_TRAIN['lr']:g} (with AdamW), train.epochs {RECIPE_TRAIN['epochs']:g}, train.schedule "
        f"{RECIPE_TRAIN['schedule']} (Li et al. 2021, Yu et al. 2021). false: train's own defaults.",
    )
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

    _applied: dict[str, Any] = PrivateAttr(default_factory=dict)  # what the recipe set, for the setup lines

    def apply_recipe(self, train: Strict) -> dict[str, Any]:
        """Give the train keys the user did not set (pydantic's model_fields_set) the DP recipe's values;
        an explicit train.grad_accum keeps its non-private meaning, the step size. Returns what was set."""
        applied: dict[str, Any] = {}
        if "expected_batch_size" not in self.model_fields_set and "grad_accum" in train.model_fields_set:
            self.expected_batch_size = None
        elif "expected_batch_size" not in self.model_fields_set:
            applied["privacy.expected_batch_size"] = self.expected_batch_size
        if self.recipe_defaults:
            for key, value in RECIPE_TRAIN.items():
                # the recipe's lr is an Adam lr: with plain SGD it would be far too small to move anything
                if key not in train.model_fields_set and not (key == "lr" and train.optimizer != "adamw"):
                    setattr(train, key, value)
                    applied[f"train.{key}"] = value
        self._applied = applied
        return applied

    @property
    def applied(self) -> dict[str, Any]:
        """The dotted keys the DP recipe set at validation, with their values."""
        return dict(self._applied)

    def without_recipe(self, train: dict) -> dict:
        """A dumped train section less the values the recipe set: for a stage that trains without DP."""
        return {k: v for k, v in train.items() if f"train.{k}" not in self._applied}
