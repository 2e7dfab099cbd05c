"""The whole run configuration (`Config`): its sections, the checks across sections, and the stages."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from tunesmith.config.base import Strict, format_validation_error
from tunesmith.config.decoding import task_problem
from tunesmith.config.guard_rails import Privacy, Retention
from tunesmith.config.search import SearchConfig, unknown_keys
from tunesmith.config.sections import (
    DEFAULT_TASK,
    DataConfig,
    EvalConfig,
    LogConfig,
    ModelConfig,
    PeftConfig,
    PreferenceConfig,
    TrainConfig,
)


class Stage(Strict):
    """An intermediate task, trained before the config's own (final) task; each stage starts from the
    previous stage's weights (LoRA merged into them)."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,40}$", description="Stage name (in run names).")
    task: Literal["instruction", "summarization", "constrained_generation", "language_modeling"] | None = Field(
        None, description="The stage's task family (generative only); default follows its data.format."
    )
    data: DataConfig
    train: dict[str, Any] = Field(default_factory=dict, description="Overrides of the top-level train section.")
    eval: dict[str, Any] = Field(default_factory=dict, description="Overrides of the top-level eval section.")

    @model_validator(mode="after")
    def _generative(self) -> Stage:
        if self.data.format == "classification":
            raise ValueError("an intermediate stage must be a generative task (its weights feed the next stage)")
        return self


class Config(Strict):
    name: str = Field("run", description="Run name: the run directory is <output_dir>/<name>/.")
    task: (
        Literal[
            "instruction",
            "summarization",
            "constrained_generation",
            "language_modeling",
            "classification",
            "preference",
        ]
        | None
    ) = Field(None, description="Task family, which picks the metrics; default follows data.format.")
    output_dir: str = Field("runs", description="Directory holding run directories.")
    seed: int = Field(0, description="Seed for splits, shuffling, initialisation and dropout.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    peft: PeftConfig = Field(default_factory=PeftConfig)
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    preference: PreferenceConfig = Field(
        default_factory=PreferenceConfig, description="Preference tuning's loss (task: preference)."
    )
    allowed_roots: list[str] = Field(
        default_factory=list,
        description="Directories every data/model/output path must resolve under (symlinks followed). Empty: "
        "anywhere except system and credential locations.",
    )
    retention: Retention = Field(
        default_factory=lambda: Retention(), description="Forgetting: general text whose perplexity should not rise."
    )
    privacy: Privacy | None = Field(None, description="Differential privacy (DP-SGD); absent: off.")
    search: SearchConfig | None = Field(None, description="Hyperparameter search space (tunesmith search).")
    log: LogConfig = Field(default_factory=LogConfig, description="Experiment trackers.")
    stages: list[Stage] = Field(
        default_factory=list,
        description="Intermediate tasks trained first, in order; the config's own data/task is the final stage.",
    )
    stage_mode: Literal["merge", "stack"] = Field(
        "merge",
        description="merge: each stage's LoRA is merged and saved as a model directory the next stage "
        "loads; stack: each stage's adapter is kept and the next stage trains a new adapter on top of it "
        "(the final run needs only the base and the small adapters).",
    )

    @field_validator("retention", mode="before")
    @classmethod
    def _retention_list_form(cls, v: Any) -> Any:
        return {"sets": v} if isinstance(v, list) else v

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", v):
            raise ValueError("use letters, digits, '.', '_' and '-' (it becomes a directory name)")
        return v

    @model_validator(mode="after")
    def _replay_fits(self) -> Config:
        if self.retention.replay is not None and self.data.packing:
            raise ValueError("retention.replay with data.packing is not supported yet: packing would blur the mix")
        if self.retention.replay is not None and self.data.format == "classification":
            raise ValueError("retention.replay is for causal LM training (text is replayed as language modeling)")
        return self

    @model_validator(mode="after")
    def _packing_fits(self) -> Config:
        if self.data.packing and self.data.format == "classification":
            raise ValueError("data.packing is for causal LM training; classification rows are not packed")
        if self.data.packing and self.model.attn_implementation != "sdpa":
            raise ValueError(
                "data.packing needs model.attn_implementation: sdpa (eager misreads the packed "
                "rows' boolean block mask and would let them attend to each other)"
            )
        return self

    @model_validator(mode="after")
    def _baselines_have_a_model(self) -> Config:
        if self.task_name == "classification" and self.eval.baselines and not self.eval.baseline_model:
            raise ValueError("eval.baselines need eval.baseline_model (the instruction model to prompt)")
        if self.task_name != "classification" and self.train.head_lr is not None:
            raise ValueError(f"train.head_lr is for classifiers; task {self.task_name} has no classification head")
        if self.task_name != "classification" and self.model.pooling != "auto":
            raise ValueError(
                f"model.pooling ({self.model.pooling}) is for classifiers; task {self.task_name} "
                "uses the language-model head"
            )
        if self.task_name != "classification" and self.eval.baseline_model:
            raise ValueError(
                "eval.baseline_model is for classification: a generative task's base row is its own "
                "base model (eval.baselines: [few_shot] prompts that model with solved examples)"
            )
        if self.model.head_init != "random" and (self.task_name != "classification" or self.model.pooling != "last"):
            raise ValueError(
                "model.head_init: label_words reads the label from a decoder's last token: it needs task "
                f"classification and model.pooling: last (got task {self.task_name}, pooling {self.model.pooling})"
            )
        if self.data.format == "classification" and self.data.prompt and "{text}" not in self.data.prompt:
            raise ValueError("data.prompt for classification is a template: put {text} where the row's text goes")
        if task_problem(self.task_name, self.eval.decoding):
            raise ValueError(task_problem(self.task_name, self.eval.decoding))
        return self

    @model_validator(mode="after")
    def _stages_are_valid_runs(self) -> Config:
        if self.stages and self.stage_mode == "stack" and self.peft.method != "lora":
            raise ValueError("stage_mode: stack keeps each stage's LoRA adapter; it needs peft.method: lora")
        if self.peft.method == "qlora" and self.model.adapters:
            # merged into 4-bit weights, an adapter would be rounded to the quantization grid
            raise ValueError(
                "peft.method qlora cannot fold model.adapters into 4-bit weights: merge them first "
                "(tunesmith export RUN --merge DIR) and set model.name to that directory"
            )
        for i in range(len(self.stages)):
            stage_config(self, i)  # a stage that would not train fails here, before anything runs
        return self

    @model_validator(mode="after")
    def _search_keys_exist(self) -> Config:
        bad = unknown_keys(Config, list(self.search.space)) if self.search else []
        if bad:
            raise ValueError(f"search.space: unknown config key(s) {bad} (use dotted keys such as train.lr)")
        return self

    @model_validator(mode="after")
    def _privacy_fits(self) -> Config:
        if self.privacy is None:
            return self
        # Each of these would break what the guarantee rests on: one example per clipped gradient, sampling
        # that does not look at the data, and per-example activations captured once per forward.
        clashes = {
            "data.packing": self.data.packing,
            "retention.replay": self.retention.replay is not None,
            "train.on_spike: rollback": self.train.on_spike == "rollback",
            "train.gradient_checkpointing": self.train.gradient_checkpointing,
            "train.precision: fp16": self.train.precision == "fp16",
            "retention.l2sp": self.retention.l2sp > 0,
        }
        bad = [name for name, on in clashes.items() if on]
        if bad:
            raise ValueError(f"privacy (DP-SGD) does not work with {', '.join(bad)}")
        self.privacy.apply_recipe(self.train)  # DP's lr, epochs and schedule where train leaves them unset
        return self

    @model_validator(mode="after")
    def _task_fits_format(self) -> Config:
        for family in ("classification", "preference"):
            if self.task is not None and (self.task == family) != (self.data.format == family):
                raise ValueError(f"task '{self.task}' does not fit data.format '{self.data.format}'")
        if self.data.format == "preference" and self.data.packing:
            # each row already holds a pair (prompt once, both answers) under its own block mask
            raise ValueError("data.packing is not used with preference data: each pair is already one row")
        if self.data.format == "preference" and self.model.attn_implementation != "sdpa":
            raise ValueError("preference tuning needs model.attn_implementation: sdpa (its rows carry a block mask)")
        return self

    @property
    def task_name(self) -> str:
        return self.task or DEFAULT_TASK[self.data.format]

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def expected_batch(self, processes: int) -> int:
        """DP-SGD units per step in expectation: privacy.expected_batch_size, or (null) the non-private
        step size."""
        t = self.train
        return self.privacy.expected_batch_size or t.batch_size * t.grad_accum * processes


def stage_config(cfg: Config, index: int, start: dict | None = None) -> Config:
    """Stage `index` (0-based; len(stages) is the final task) as a plain config: the final config with
    the stage's data, task and overrides, starting from the previous stage's weights (`start`: the
    model section's changed keys, a merged model directory or the adapters to stack)."""
    tree = cfg.model_dump(mode="json", exclude={"stages", "stage_mode"})
    if index < len(cfg.stages):
        stage = cfg.stages[index]
        tree.update(
            name=f"{cfg.name}-stage{index + 1}-{stage.name}", task=stage.task, data=stage.data.model_dump(mode="json")
        )
        if cfg.privacy is not None:  # a stage trains without DP: without the DP recipe's train values too
            tree["train"] = cfg.privacy.without_recipe(tree["train"])
        tree["train"].update(stage.train)
        # the final task's baselines and decoding, not a stage's
        tree["eval"].update(baseline_model=None, baselines=[], decoding={})
        tree["eval"].update(stage.eval)
        tree["retention"] = {"sets": tree["retention"]["sets"]}  # measure forgetting; limits are the final's
        tree.pop("privacy")
    tree["model"].update(start or {})
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        where = f"stages[{index}] ({cfg.stages[index].name})" if index < len(cfg.stages) else "final stage"
        raise ValueError(f"{where}: " + "; ".join(format_validation_error(err))) from None
