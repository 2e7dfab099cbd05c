"""The core config sections: model, peft, data, train, eval and log (each field described once)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from tunesmith.config.base import Strict
from tunesmith.config.decoding import Decoding


class ModelConfig(Strict):
    name: str = Field(
        "smollm2-135m-instruct",
        description="Embedded short name (see `tunesmith models`), local model directory or .gguf file, or hub id.",
    )
    gguf_file: str | None = Field(
        None,
        pattern=r"(?i)\.gguf$",
        description="With a local model directory "
        "holding GGUF files: the one to load (converted to safetensors once, then cached).",
    )
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
        "auto",
        description="Classifiers: how token states become one vector for the head. mean: masked mean "
        "(what sentence encoders such as all-MiniLM-L6-v2 were trained for); cls: the first token's state, no "
        "pooler; last: the last real token (decoders); auto: the architecture's own head (BERT: a fresh pooler "
        "on [CLS]; decoders: the last token).",
    )
    head_init: Literal["random", "label_words"] = Field(
        "random",
        description="Classifiers on a decoder LM: how the new head starts. random: a fresh projection. "
        "label_words: each label's row is the language-model head's row for the label's first token (with a "
        "leading space), so with data.prompt ending where the label would be written (e.g. 'Review: {text}\\n"
        "Sentiment:') training starts from the model's own zero-shot answer, and DP-SGD's few noisy steps "
        "adjust it instead of learning a head from nothing (classification as next-word prediction, as in "
        "Li et al. 2021). Needs model.pooling: last.",
    )
    adapters: list[str] = Field(
        default_factory=list,
        description="PEFT LoRA adapter directories folded into the weights, in order, "
        "before training (stacked stages, or continuing from someone's adapter).",
    )

    @model_validator(mode="after")
    def _remote_code_pinned(self) -> ModelConfig:
        # Remote code runs with the user's rights: only a pinned commit makes it reviewable.
        if self.trust_remote_code and not re.fullmatch(r"[0-9a-f]{40}", self.revision or ""):
            raise ValueError("trust_remote_code needs `revision` pinned to a 40-hex commit")
        return self


class PeftConfig(Strict):
    method: Literal["lora", "qlora", "full", "freeze"] = Field(
        "lora",
        description="lora: train a LoRA adapter; qlora: LoRA over the base weights quantized to 4 bits "
        "(bitsandbytes; a quarter of the memory of 16-bit weights; computes in model.dtype); full: train every "
        "weight; freeze: train only parameters matching `trainable` patterns.",
    )
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: int | None = Field(None, gt=0, description="LoRA alpha; default 2*r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA branch.")
    target_modules: str | list[str] = Field(
        "all-linear",
        description="Modules LoRA wraps: 'all-linear', a list of module names, or a regular expression that "
        "must match a module's whole name (peft's rule), e.g. 'model\\.layers\\.(1[5-9]|2\\d)\\..*_proj' for "
        "the top 15 of 30 layers: backward then stops at layer 15 (faster, and under DP fewer noised weights).",
    )
    quant_type: Literal["nf4", "fp4"] = Field(
        "nf4", description="With method=qlora: the 4-bit data type (nf4: QLoRA's NormalFloat, Dettmers et al. 2023)."
    )
    double_quant: bool = Field(
        True, description="With method=qlora: quantize the quantization constants too (~0.4 bits a weight saved)."
    )
    trainable: list[str] = Field(
        default_factory=list,
        description="With method=freeze: glob patterns of parameter names to train (e.g. 'model.norm.*').",
    )

    @property
    def adapter(self) -> bool:
        """Training leaves a LoRA adapter (lora, and qlora over its 4-bit base)."""
        return self.method in ("lora", "qlora")

    @model_validator(mode="after")
    def _freeze_needs_patterns(self) -> PeftConfig:
        if self.method == "freeze" and not self.trainable:
            raise ValueError("method 'freeze' needs at least one pattern in `trainable`")
        return self


MAX_LENGTH_CAP = 1_048_576  # tokens per row: far past any model's context, short of an accidental 1e9
FORMATS = (
    "instruction",
    "chat",
    "prompt_completion",
    "summarization",
    "concepts",
    "text",
    "classification",
    "preference",
)
CANONICAL_COLUMNS = {
    "instruction": ("instruction", "input", "output"),
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "summarization": ("document", "summary"),
    "concepts": ("concepts", "target", "references"),
    "text": ("text",),
    "classification": ("text", "label"),
    "preference": ("prompt", "chosen", "rejected"),
}
TASKS = ("instruction", "summarization", "constrained_generation", "language_modeling", "classification", "preference")
DEFAULT_TASK = {
    "instruction": "instruction",
    "chat": "instruction",
    "prompt_completion": "instruction",
    "summarization": "summarization",
    "concepts": "constrained_generation",
    "text": "language_modeling",
    "classification": "classification",
    "preference": "preference",
}
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
        default_factory=dict,
        description="Split read for each source that is a hub id or saved DatasetDict "
        "(default: train from hub_split, validation from 'validation', test from 'test').",
    )
    format: Literal[
        "instruction", "chat", "prompt_completion", "summarization", "concepts", "text", "classification", "preference"
    ] = Field("instruction", description="Row format: " + ", ".join(FORMATS) + ".")
    prompt: str | None = Field(
        None,
        description="Instruction put before each document (summarization) or concept list (concepts). "
        "Classification: a template holding {text}, e.g. 'Review: {text}\\nSentiment:' (training, evaluation "
        "and predict read every row through it).",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Map from the format's column names to yours, e.g. {output: response}.",
    )
    labels: list[str] | None = Field(None, description="Label set for classification (default: labels in train).")
    system_prompt: str | None = Field(None, description="System message prepended to every chat prompt.")
    max_length: int = Field(
        1024,
        ge=8,
        le=MAX_LENGTH_CAP,
        description=f"Maximum tokens per row (prompt + completion); at most {MAX_LENGTH_CAP:,}.",
    )
    overlength: Literal["error", "truncate", "drop"] = Field(
        "error",
        description="Rows longer than max_length: error (stop and report), truncate (keep the start; with a "
        "classification data.prompt, the text is cut and the template kept whole), or drop. "
        "Never silent: counts go to the data report.",
    )
    group_by_length: bool = Field(
        False, description="Batch training rows of similar length together (less padding), shuffled per epoch."
    )
    packing: bool = Field(
        False,
        description="Pack several training rows into each max_length sequence (no padding; each row "
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
    train_limit: int | None = Field(
        None,
        gt=0,
        description="Few-shot: train on only this many rows (stratified "
        "by label for classification), drawn with sample_seed.",
    )
    sample_seed: int | None = Field(None, description="Seed of the train_limit draw (default: the run's seed).")
    split_seed: int | None = Field(
        None,
        description="Seed of the train/validation/test split when there is no "
        "validation file (default: the run's seed; `tunesmith curve` keeps it fixed).",
    )

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


class PreferenceConfig(Strict):
    """Preference tuning (task: preference, data.format: preference): the policy learns to rank each
    pair's `chosen` answer above its `rejected` one."""

    loss: Literal["dpo", "ipo", "simpo"] = Field(
        "dpo",
        description="dpo: -log sigmoid(beta * margin of the log-ratios to the reference model) (Rafailov et al. "
        "2023); ipo: (length-normalised margin - 1/(2 beta))^2 (Azar et al. 2023); simpo: reference-free, "
        "-log sigmoid(beta * margin of the mean token log-probs - gamma) (Meng et al. 2024). The reference "
        "model is the base: its log-probs are computed once before training (no second copy in memory).",
    )
    beta: float = Field(0.1, gt=0, description="Strength of the preference (dpo, simpo) or IPO's tau.")
    gamma: float = Field(0.5, ge=0, description="simpo: the target reward margin (TRL's simpo_gamma).")
    sft_weight: float = Field(
        0.0,
        ge=0,
        description="Adds this times the chosen answer's mean token negative log-likelihood to each pair's loss "
        "(RPO, Pang et al. 2024; TRL's loss_type [sigmoid, sft], there averaged over the batch's tokens): DPO alone "
        "can lower the chosen answer's likelihood along with the rejected one's, and the model's answers with it.",
    )


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
        "warn",
        description="A loss spike (over spike_factor x the recent median) is logged (warn), not applied "
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
    head_lr: float | None = Field(None, gt=0, lt=1, description="Classifiers: the new head's peak rate (None: lr).")
    layer_decay: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Layer-wise lr decay: of L layers, layer i "
        "trains at lr x layer_decay^(L-i), embeddings at lr x layer_decay^(L+1).",
    )
    chunked_loss: bool = Field(
        True, description="Project only target positions to the vocabulary, in chunks (same loss, far less memory)."
    )
    cache_frozen_layers: bool = Field(
        False,
        description="LoRA on the top layers only: keep each row's output of the frozen layers below them, so "
        "later epochs skip their forward (same steps, Llama-family decoders).",
    )
    ema_decay: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Evaluate and save an exponential moving average of the trainable weights, "
        "avg <- decay x avg + (1 - decay) x weights after each update (None: the last weights). Averages out "
        "update noise, e.g. DP-SGD's, at no privacy cost.",
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
        None,
        description="Classification: an instruction model prompted zero-shot as the 'before' row "
        "(e.g. smollm2-135m-instruct); without it the 'before' is the majority-class baseline. Generative "
        "tasks prompt the base model itself.",
    )
    baselines: list[Literal["zero_shot", "few_shot"]] = Field(
        default_factory=list,
        description="Prompting baselines shown next to the fine-tuned model: few_shot puts "
        "few_shot_k solved training rows in the prompt as earlier chat turns. Classification prompts "
        "eval.baseline_model; generative tasks prompt the base model (whose plain row is the zero-shot one).",
    )
    few_shot_k: int = Field(4, ge=1, le=64, description="Solved examples in the few-shot prompt.")
    decoding: Decoding = Field(
        default_factory=Decoding,
        description="How generated outputs are decoded "
        "(evaluation, baselines, tunesmith generate): default greedy, one output.",
    )


class LogConfig(Strict):
    trackers: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list,
        description="Experiment trackers that also receive every metric (the run "
        "directory is always written). Each needs its package installed.",
    )
    project: str | None = Field(None, description="Tracker project / experiment name (default: the run name).")
    mlflow_uri: str | None = Field(None, description="MLflow tracking URI (default: SQLite under <run>/trackers/).")
