"""The run configuration: a pydantic schema, loaded from YAML plus dotted ``key=value`` overrides.

Every field is described once here; that text reaches ``tunesmith config keys`` (config_keys.py). Every
problem is reported at once with its dotted path, before any model or data is loaded.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from tunesmith.config_base import Strict
from tunesmith.config_yaml import YAML_ERRORS, DuplicateKey, load_yaml
from tunesmith.config_guards import Privacy, Replay, Retention, RetentionSet  # noqa: F401 (re-exported)
from tunesmith.errors import ConfigError
from tunesmith.search.space import SearchConfig, unknown_keys




class ModelConfig(Strict):
    name: str = Field(
        "smollm2-135m-instruct",
        description="Embedded short name (see `tunesmith models`), local model directory or .gguf file, or hub id.",
    )
    gguf_file: str | None = Field(None, pattern=r"(?i)\.gguf$", description="With a local model directory "
                                  "holding GGUF files: the one to load (converted to safetensors once, then cached).")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to load.")
    trust_remote_code: bool = Field(
        False, description="Run model code shipped with a hub repo. Off by default: it executes that code."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype the weights are loaded in (fp32 is the safe default on CPU)."
    )
    dropout: float | None = Field(
        None, ge=0.0, lt=1.0, description="Override the model's own dropout probabilities (None keeps them)."
    )
    attn_implementation: Literal["sdpa", "eager"] = Field("sdpa", description="Attention kernel.")
    pooling: Literal["auto", "mean", "cls", "last"] = Field(
        "auto", description="Classifiers: how token states become one vector for the head. mean: masked mean "
        "(what sentence encoders such as all-MiniLM-L6-v2 were trained for); cls: the first token's state, no "
        "pooler; last: the last real token (decoders); auto: the architecture's own head (BERT: a fresh pooler "
        "on [CLS]; decoders: the last token).")
    adapters: list[str] = Field(
        default_factory=list, description="PEFT LoRA adapter directories folded into the weights, in order, "
        "before training (stacked stages, or continuing from someone's adapter).")

    @model_validator(mode="after")
    def _remote_code_pinned(self) -> ModelConfig:
        # Remote code runs with the user's rights: only a pinned commit makes it reviewable.
        if self.trust_remote_code and not re.fullmatch(r"[0-9a-f]{40}", self.revision or ""):
            raise ValueError("trust_remote_code needs `revision` pinned to a 40-hex commit")
        return self


class PeftConfig(Strict):
    method: Literal["lora", "full", "freeze"] = Field(
        "lora",
        description="lora: train a LoRA adapter; full: train every weight; freeze: train only "
        "parameters matching `trainable` patterns.",
    )
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: int | None = Field(None, gt=0, description="LoRA alpha; default 2*r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA branch.")
    target_modules: str | list[str] = Field(
        "all-linear", description="Modules LoRA wraps: 'all-linear' or a list of module names."
    )
    trainable: list[str] = Field(
        default_factory=list,
        description="With method=freeze: glob patterns of parameter names to train (e.g. 'model.norm.*').",
    )

    @model_validator(mode="after")
    def _freeze_needs_patterns(self) -> PeftConfig:
        if self.method == "freeze" and not self.trainable:
            raise ValueError("method 'freeze' needs at least one pattern in `trainable`")
        return self


MAX_LENGTH_CAP = 1_048_576  # tokens per row: far past any model's context, short of an accidental 1e9
FORMATS = ("instruction", "chat", "prompt_completion", "summarization", "concepts", "text", "classification")
CANONICAL_COLUMNS = {
    "instruction": ("instruction", "input", "output"),
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "summarization": ("document", "summary"),
    "concepts": ("concepts", "target", "references"),
    "text": ("text",),
    "classification": ("text", "label"),
}
TASKS = ("instruction", "summarization", "constrained_generation", "language_modeling", "classification")
DEFAULT_TASK = {"instruction": "instruction", "chat": "instruction", "prompt_completion": "instruction",
                "summarization": "summarization", "concepts": "constrained_generation", "text": "language_modeling",
                "classification": "classification"}
DEFAULT_PROMPTS = {
    "summarization": "Summarize the following document in plain English.",
    "concepts": "Write one short sentence that uses all of these words:",
}


class DataConfig(Strict):
    train: str = Field(..., description="Training data: JSONL/CSV/Parquet file, saved HF dataset dir, or hub id.")
    validation: str | None = Field(None, description="Validation data; if absent it is split off `train`.")
    test: str | None = Field(None, description="Optional test data, evaluated before/after like validation.")
    hub_split: str = Field("train", description="Split to read when `train` is a hub dataset id or saved DatasetDict.")
    hub_splits: dict[Literal["train", "validation", "test"], str] = Field(
        default_factory=dict, description="Split read for each source that is a hub id or saved DatasetDict "
        "(default: train from hub_split, validation from 'validation', test from 'test').")
    format: Literal["instruction", "chat", "prompt_completion", "summarization", "concepts", "text", "classification"] = Field(
        "instruction", description="Row format: " + ", ".join(FORMATS) + "."
    )
    prompt: str | None = Field(
        None, description="Instruction put before each document (summarization) or concept list (concepts)."
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Map from the format's column names to yours, e.g. {output: response}.",
    )
    labels: list[str] | None = Field(None, description="Label set for classification (default: labels in train).")
    system_prompt: str | None = Field(None, description="System message prepended to every chat prompt.")
    max_length: int = Field(1024, ge=8, le=MAX_LENGTH_CAP, description="Maximum tokens per row (prompt + "
                            f"completion); at most {MAX_LENGTH_CAP:,}.")
    overlength: Literal["error", "truncate", "drop"] = Field(
        "error",
        description="Rows longer than max_length: error (stop and report), truncate (keep the start), or drop. "
        "Never silent: counts go to the data report.",
    )
    group_by_length: bool = Field(
        False, description="Batch training rows of similar length together (less padding), shuffled per epoch."
    )
    packing: bool = Field(
        False, description="Pack several training rows into each max_length sequence (no padding; each row "
        "attends only to itself). Causal LMs with sdpa attention only.",
    )
    completion_only_loss: bool = Field(True, description="Train only on completion tokens (instruction/chat).")
    validation_fraction: float = Field(0.1, gt=0.0, lt=0.5, description="Share split off for validation.")
    test_fraction: float = Field(0.0, ge=0.0, lt=0.5, description="Share split off for test (0: none).")
    dedup: bool = Field(True, description="Drop exact duplicates and train/validation overlap (counted).")
    on_error: Literal["error", "skip"] = Field(
        "error", description="Bad rows: error (stop, listing file:line) or skip (drop and count)."
    )
    max_bad_fraction: float = Field(0.01, ge=0.0, le=1.0, description="With on_error=skip, abort above this share.")
    train_limit: int | None = Field(None, gt=0, description="Few-shot: train on only this many rows (stratified "
                                    "by label for classification), drawn with sample_seed.")
    sample_seed: int | None = Field(None, description="Seed of the train_limit draw (default: the run's seed).")
    split_seed: int | None = Field(None, description="Seed of the train/validation/test split when there is no "
                                   "validation file (default: the run's seed; `tunesmith curve` keeps it fixed).")

    @model_validator(mode="after")
    def _columns_known(self) -> DataConfig:
        allowed = set(CANONICAL_COLUMNS[self.format]) | {"id"}
        unknown = sorted(set(self.columns) - allowed)
        if unknown:
            raise ValueError(f"columns {unknown} are not used by format '{self.format}' (known: {sorted(allowed)})")
        if self.hub_split != "train" and self.hub_splits.get("train", self.hub_split) != self.hub_split:
            raise ValueError("hub_split and hub_splits.train name different splits: set one of them")
        return self

    def hub_split_of(self, source: str) -> str:
        """The hub (or saved DatasetDict) split read for `source` (train, validation or test)."""
        return self.hub_splits.get(source) or (self.hub_split if source == "train" else source)


class EarlyStopping(Strict):
    patience: int | None = Field(None, ge=1, description="Evaluations without improvement before stopping.")
    min_delta: float = Field(0.0, ge=0.0, description="Smallest change that counts as an improvement.")
    metric: str = Field("eval_loss", description="Validation metric to watch.")
    mode: Literal["min", "max"] = Field("min", description="Whether lower or higher is better.")


class TrainConfig(Strict):
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (ignored if max_steps is set).")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; overrides epochs.")
    lr: float = Field(2e-4, gt=0, lt=1, description="Peak learning rate.")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="adamw, or plain SGD (DP-SGD's textbook form).")
    batch_size: int = Field(8, gt=0, description="Rows per micro-batch (per process).")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (never on biases and norms).")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps with linear warmup.")
    warmup_steps: int | None = Field(None, ge=0, description="Warmup steps; overrides warmup_ratio.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip gradients to this norm (None: no clip).")
    save_every: int | None = Field(None, gt=0, description="Checkpoint every N optimizer steps.")
    save_total_limit: int | None = Field(2, ge=1, description="Checkpoints kept (oldest deleted after a save).")
    log_every: int = Field(1, gt=0, description="Write a metrics line every N optimizer steps.")
    early_stopping: EarlyStopping = Field(default_factory=EarlyStopping)
    max_consecutive_skips: int = Field(10, ge=1, description="Non-finite steps in a row before the run halts.")
    resume: Literal["never", "auto"] = Field(
        "never", description="auto: continue the run of this name from its newest complete checkpoint if it exists."
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="bf16 autocast where the hardware has it; fp16 autocast with a loss scaler (GradScaler)."
    )
    oom_backoff: bool = Field(
        True, description="On out-of-memory, halve the micro-batch and double accumulation (same effective batch)."
    )
    on_spike: Literal["warn", "skip", "rollback"] = Field(
        "warn", description="A loss spike (over spike_factor x the recent median) is logged (warn), not applied "
        "(skip), or, after spike_rollback_after spikes within spike_window steps, rolled back to the last "
        "checkpoint with the spiking rows excluded from then on (rollback; needs save_every).",
    )
    spike_factor: float = Field(5.0, gt=1, description="Loss over this multiple of the recent median is a spike.")
    spike_window: int = Field(50, ge=10, description="Steps in the median window, and the rollback window.")
    spike_rollback_after: int = Field(3, ge=1, description="Spikes within the window that trigger a rollback.")
    max_rollbacks: int = Field(3, ge=1, description="Rollbacks before the run halts (the spikes are not the rows).")

    @model_validator(mode="after")
    def _rollback_needs_checkpoints(self) -> TrainConfig:
        if self.on_spike == "rollback" and not self.save_every:
            raise ValueError("on_spike: rollback needs save_every (a checkpoint to roll back to)")
        return self
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward instead of keeping them: less memory, ~30% slower."
    )
    chunked_loss: bool = Field(
        True, description="Project only target positions to the vocabulary, in chunks (same loss, far less memory)."
    )


class EvalConfig(Strict):
    every: int | None = Field(None, gt=0, description="Evaluate every N optimizer steps (None: only at the end).")
    batch_size: int = Field(8, gt=0, description="Rows per evaluation batch.")
    before_after: bool = Field(True, description="Evaluate the base model too and print a before/after table.")
    max_rows: int | None = Field(None, gt=0, description="Evaluate on at most this many rows per split.")
    max_new_tokens: int = Field(64, gt=0, description="Generation length for sample outputs.")
    samples: int = Field(2, ge=0, description="Example outputs (base vs fine-tuned vs reference) shown at the end.")
    generate_rows: int | None = Field(
        64, gt=0, description="Rows scored with generation metrics (ROUGE, BLEU, coverage) per split; None: all."
    )
    baseline_model: str | None = Field(
        None, description="Classification: an instruction model prompted zero-shot as the 'before' row "
        "(e.g. smollm2-135m-instruct); without it the 'before' is the majority-class baseline. Generative "
        "tasks prompt the base model itself.",
    )
    baselines: list[Literal["zero_shot", "few_shot"]] = Field(
        default_factory=list, description="Prompting baselines shown next to the fine-tuned model: few_shot puts "
        "few_shot_k solved training rows in the prompt as earlier chat turns. Classification prompts "
        "eval.baseline_model; generative tasks prompt the base model (whose plain row is the zero-shot one).",
    )
    few_shot_k: int = Field(4, ge=1, le=64, description="Solved examples in the few-shot prompt.")



class LogConfig(Strict):
    trackers: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list, description="Experiment trackers that also receive every metric (the run "
        "directory is always written). Each needs its package installed.")
    project: str | None = Field(None, description="Tracker project / experiment name (default: the run name).")
    mlflow_uri: str | None = Field(None, description="MLflow tracking URI (default: SQLite under <run>/trackers/).")


class Stage(Strict):
    """An intermediate task, trained before the config's own (final) task; each stage starts from the
    previous stage's weights (LoRA merged into them)."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,40}$", description="Stage name (in run names).")
    task: Literal["instruction", "summarization", "constrained_generation", "language_modeling"] | None = Field(
        None, description="The stage's task family (generative only); default follows its data.format.")
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
    task: Literal["instruction", "summarization", "constrained_generation", "language_modeling", "classification"] | None = Field(
        None, description="Task family, which picks the metrics; default follows data.format."
    )
    output_dir: str = Field("runs", description="Directory holding run directories.")
    seed: int = Field(0, description="Seed for splits, shuffling, initialisation and dropout.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    peft: PeftConfig = Field(default_factory=PeftConfig)
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
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
    stages: list[Stage] = Field(default_factory=list, description="Intermediate tasks trained first, in order; "
                                "the config's own data/task is the final stage.")
    stage_mode: Literal["merge", "stack"] = Field(
        "merge", description="merge: each stage's LoRA is merged and saved as a model directory the next stage "
        "loads; stack: each stage's adapter is kept and the next stage trains a new adapter on top of it "
        "(the final run needs only the base and the small adapters).")

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
            raise ValueError("data.packing needs model.attn_implementation: sdpa (eager misreads the packed "
                             "rows' boolean block mask and would let them attend to each other)")
        return self

    @model_validator(mode="after")
    def _baselines_have_a_model(self) -> Config:
        if self.task_name == "classification" and self.eval.baselines and not self.eval.baseline_model:
            raise ValueError("eval.baselines need eval.baseline_model (the instruction model to prompt)")
        if self.task_name != "classification" and self.model.pooling != "auto":
            raise ValueError(f"model.pooling ({self.model.pooling}) is for classifiers; task {self.task_name} "
                             "uses the language-model head")
        if self.task_name != "classification" and self.eval.baseline_model:
            raise ValueError("eval.baseline_model is for classification: a generative task's base row is its own "
                             "base model (eval.baselines: [few_shot] prompts that model with solved examples)")
        return self

    @model_validator(mode="after")
    def _stages_are_valid_runs(self) -> Config:
        if self.stages and self.stage_mode == "stack" and self.peft.method != "lora":
            raise ValueError("stage_mode: stack keeps each stage's LoRA adapter; it needs peft.method: lora")
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
        clashes = {"data.packing": self.data.packing, "retention.replay": self.retention.replay is not None,
                   "train.on_spike: rollback": self.train.on_spike == "rollback",
                   "train.gradient_checkpointing": self.train.gradient_checkpointing,
                   "train.precision: fp16": self.train.precision == "fp16", "retention.l2sp": self.retention.l2sp > 0}
        bad = [name for name, on in clashes.items() if on]
        if bad:
            raise ValueError(f"privacy (DP-SGD) does not work with {', '.join(bad)}")
        self.privacy.apply_recipe(self.train)  # DP's lr, epochs and schedule where train leaves them unset
        return self

    @model_validator(mode="after")
    def _task_fits_format(self) -> Config:
        if self.task is not None and (self.task == "classification") != (self.data.format == "classification"):
            raise ValueError(f"task '{self.task}' does not fit data.format '{self.data.format}'")
        return self

    @property
    def task_name(self) -> str:
        return self.task or DEFAULT_TASK[self.data.format]

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def stage_config(cfg: Config, index: int, start: dict | None = None) -> Config:
    """Stage `index` (0-based; len(stages) is the final task) as a plain config: the final config with
    the stage's data, task and overrides, starting from the previous stage's weights (`start`: the
    model section's changed keys, a merged model directory or the adapters to stack)."""
    tree = cfg.model_dump(mode="json", exclude={"stages", "stage_mode"})
    if index < len(cfg.stages):
        stage = cfg.stages[index]
        tree.update(name=f"{cfg.name}-stage{index + 1}-{stage.name}", task=stage.task,
                    data=stage.data.model_dump(mode="json"))
        if cfg.privacy is not None:  # a stage trains without DP: without the DP recipe's train values too
            tree["train"] = cfg.privacy.without_recipe(tree["train"])
        tree["train"].update(stage.train)
        tree["eval"].update(baseline_model=None, baselines=[])  # the final task's baselines, not a stage's
        tree["eval"].update(stage.eval)
        tree["retention"] = {"sets": tree["retention"]["sets"]}  # measure forgetting; limits are the final's
        tree.pop("privacy")
    tree["model"].update(start or {})
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        where = f"stages[{index}] ({cfg.stages[index].name})" if index < len(cfg.stages) else "final stage"
        raise ValueError(f"{where}: " + "; ".join(format_validation_error(err))) from None


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError("Bad override", [f"{dotted}: '{k}' is a value, not a section"])
        node = nxt
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    parsed, problems = [], []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
            problems.append(f"'{item}': expected dotted.key=value")
            continue
        try:
            value = load_yaml(raw) if raw != "" else ""
        except DuplicateKey as err:
            problems.append(f"'{key}': {err.problem}")
            continue
        except YAML_ERRORS:
            value = raw  # a plain string the YAML parser dislikes (e.g. "a: b") is still a string
        if isinstance(value, str):
            try:
                value = float(value) if re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value) else value
            except ValueError:
                pass  # YAML 1.1 reads 1e-4 as a string; users mean the number
        parsed.append((key, value))
    if problems:
        raise ConfigError("Bad command-line overrides", problems)
    return parsed


def format_validation_error(err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        out.append(f"{path}: {msg}")
    return out


def config_from_dict(tree: dict, source: str = "config") -> Config:
    from tunesmith.security import config_path_problems

    try:
        cfg = Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(f"Invalid configuration ({source}):", format_validation_error(err)) from None
    problems = config_path_problems(cfg)
    if problems:
        raise ConfigError(f"Refused paths ({source}):", problems)
    return cfg


def derive(cfg: Config, changes: dict[str, Any], source: str, drop: tuple[str, ...] = ()) -> Config:
    """A config made from another (a search trial, a curve point, an audit variant): top-level sections
    dropped, dotted keys set, and the result validated like a file."""
    tree = cfg.model_dump(mode="json", exclude=set(drop))
    for key, value in changes.items():
        _set_dotted(tree, key, value)
    return config_from_dict(tree, source)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    tree: dict = {}
    source = "overrides"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"Config file not found: {p}")
        try:
            tree = load_yaml(p.read_text(encoding="utf-8")) or {}
        except (*YAML_ERRORS, UnicodeDecodeError) as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{p}:{mark.line + 1}" if mark else str(p)
            raise ConfigError("Config is not valid YAML", [f"{where}: {getattr(err, 'problem', err)}"]) from None
        if not isinstance(tree, dict):
            raise ConfigError("Config must be a YAML mapping", [f"{p}: top level is {type(tree).__name__}"])
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    return config_from_dict(tree, source)


def dump_config(cfg: Config) -> str:
    from tunesmith.security import redact_obj

    return yaml.safe_dump(redact_obj(cfg.model_dump(mode="json")), sort_keys=False, allow_unicode=True)
