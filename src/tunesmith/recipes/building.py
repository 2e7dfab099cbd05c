"""Building a run: a recipe's freshly loaded model wrapped with the accelerator, optimizer, schedule,
batch plan and the stepper that takes its optimizer steps (training/steppers.py), in one `Setup` made of
parts by concern: the data, the optimisation, the bookkeeping between updates, the evaluation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
from accelerate import Accelerator
from transformers import PreTrainedTokenizerBase

from tunesmith.config import Config
from tunesmith.data.prepare import Examples
from tunesmith.errors import UserError
from tunesmith.privacy.sampling import PoissonPlan, units_of
from tunesmith.report.console import print_setup
from tunesmith.rundir import RunDir
from tunesmith.training import processes, steppers, trackers, zero
from tunesmith.training.averaging import WeightAverage, average_weights
from tunesmith.training.early_stopping import EarlyStopper
from tunesmith.training.frozen_prefix import cache_frozen_layers
from tunesmith.training.guards import SpikeDetector
from tunesmith.training.loss import causal_lm_loss_sum, chunked_loss_sum
from tunesmith.training.optim import build_optimizer, build_scheduler
from tunesmith.training.plan import LengthGroupedPlan, ReplayPlan, ShuffledPlan
from tunesmith.training.precision import Precision
from tunesmith.training.processes import collective_forward, device_kwargs, engine_name
from tunesmith.training.watch import Watch

if TYPE_CHECKING:
    from tunesmith.privacy.dp import DPSGD


@dataclass
class Data:
    """What the run learns from and is scored on, and how its rows become a batch."""

    examples: Examples  # validated rows by split, the data report and fingerprint, a classifier's labels
    rows: dict[str, list]  # split -> prepared rows; a causal LM's retention sets as "retention:<name>"
    collate: Callable[[list], dict[str, torch.Tensor]]


@dataclass
class Optimisation:
    """How an update is made: the rows of each step, the loss they are summed into, and the stepper that
    turns their gradients into an update (plain, DP-SGD or DeepSpeed: training/steppers.py)."""

    plan: ShuffledPlan  # which train rows each step and rank gets
    total_steps: int
    loss_sum: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, int]]  # summed loss, target count
    count: Callable[[list], int]  # targets in a micro-batch, what a step's loss is normalised by: tokens or rows
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    stepper: steppers.Stepper
    precision: Precision
    dp: DPSGD | None  # DP-SGD (privacy:): per-example clipping, noise and the accountant


@dataclass
class Bookkeeping:
    """What the fitting loop carries from one update to the next; a checkpoint saves it (state.py)."""

    stopper: EarlyStopper
    spikes: SpikeDetector
    watch: Watch  # overfitting and flat-loss warnings
    counters: dict = field(default_factory=lambda: {"skipped_nonfinite": 0, "tokens": 0})
    excluded: set[int] = field(default_factory=set)  # train rows rolled back after spikes; never fed again
    spike_rows: dict[int, list[int]] = field(default_factory=dict)  # data step -> rows, for rollback
    best_weights: dict[str, torch.Tensor] | None = None  # the trainables at the best evaluation so far
    average: WeightAverage | None = None  # train.ema_decay: what evaluations and the saved model use


@dataclass
class Evaluation:
    """What evaluations during training use besides the model: the recipe's cheap metrics, who else sees
    them, and the base model's retention scores that say how much was forgotten."""

    quick_eval: Callable[[Setup, str], dict]  # cheap metrics used during training and for early stopping
    on_eval: Callable[[int, dict], None] | None = None  # sees each evaluation (a search's pruner)
    retention_base: dict[str, float] = field(default_factory=dict)  # retention set -> the base model's perplexity
    # The same measurement whole, until the base model's evaluation reuses it instead of measuring again.
    retention_at_start: dict[str, dict] | None = None
    chunked: bool = True  # preference runs: answer log-probs through the chunked output layer (else the logits)


@dataclass
class Setup:
    """A run ready to fit: its settings and directory, the model it trains, and the four parts above."""

    cfg: Config
    run: RunDir
    accelerator: Accelerator
    model: torch.nn.Module  # as accelerate prepared it; accelerator.unwrap_model() gives the bare one
    tokenizer: PreTrainedTokenizerBase
    model_path: str  # where the base weights were loaded from
    data: Data
    optim: Optimisation
    books: Bookkeeping
    evaluation: Evaluation
    engine: torch.nn.Module | None = None  # the DeepSpeed engine (the prepared model) under accelerate's DeepSpeed


def build(
    cfg: Config,
    run: RunDir,
    examples: Examples,
    rows: dict,
    tokenizer: PreTrainedTokenizerBase,
    model: torch.nn.Module,
    model_path: str,
    *,
    collate: Callable[[list], dict[str, torch.Tensor]],
    loss_sum: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, int]],
    count: Callable[[list], int],
    quick_eval: Callable[[Setup, str], dict],
) -> Setup:
    """Wrap a freshly loaded model with the optimizer, schedule, batch plan and accelerator."""
    accelerator = make_accelerator(cfg, run)
    if collective_forward(accelerator) and loss_sum is chunked_loss_sum:
        # The chunked loss recomputes lm_head in the backward, after ZeRO-3/FSDP has freed the gathered weight.
        loss_sum = causal_lm_loss_sum
    if cfg.train.gradient_checkpointing:
        checkpoint_activations(model, accelerator)
    if cfg.train.cache_frozen_layers:
        cache_frozen_layers(model, accelerator.device)
    model, optim = optimisation(cfg, examples, rows, model, accelerator, loss_sum, count)
    t = cfg.train
    books = Bookkeeping(
        EarlyStopper(t.early_stopping), SpikeDetector(t.spike_factor, t.spike_window), Watch(optim.total_steps)
    )
    books.average = average_weights(accelerator.unwrap_model(model), t.ema_decay, collective_forward(accelerator))
    s = Setup(
        cfg,
        run,
        accelerator,
        model,
        tokenizer,
        model_path,
        Data(examples, rows, collate),
        optim,
        books,
        Evaluation(quick_eval),
        engine=model if zero.engaged(accelerator) else None,
    )
    run.update_run(
        processes=accelerator.num_processes,
        distributed=engine_name(accelerator),
        device=str(accelerator.device),
        total_steps=optim.total_steps,  # what a progress view (tunesmith ui) counts towards
    )
    trackers.start(accelerator, cfg, run.path)
    print_setup(s)
    return s


def make_accelerator(cfg: Config, run: RunDir) -> Accelerator:
    # fp16 is handled by Precision (its own GradScaler): accelerate has none on CPU.
    accelerator = Accelerator(
        mixed_precision="bf16" if cfg.train.precision == "bf16" else "no",
        cpu=device_kwargs()["cpu"],
        **trackers.accelerator_kwargs(cfg, run.path),
    )
    processes.engage(cfg, accelerator)  # DeepSpeed or FSDP settled (and refusals) before the model is wrapped
    return accelerator


def optimisation(
    cfg: Config, examples: Examples, rows: dict, model, accelerator: Accelerator, loss_sum, count
) -> tuple[torch.nn.Module, Optimisation]:
    """The batch plan, optimizer, schedule and stepper, with the model as accelerate (or DP-SGD) prepared it."""
    t = cfg.train
    optimizer = build_optimizer(model, t)
    plan = batch_plan(cfg, examples, rows, accelerator)
    total = t.max_steps or math.ceil(t.epochs * plan.steps_per_epoch)
    dp = None
    if cfg.privacy:
        # Opacus costs seconds to import: only private runs pay for it.
        from tunesmith.privacy.dp import DPSGD

        dp = DPSGD(model, optimizer, cfg.privacy, plan.n_units, plan.sample_rate, total, cfg.seed)
    if dp is not None and accelerator.num_processes > 1:
        # No DDP wrapper: its gradient all-reduce and per-forward buffer broadcasts assume every rank runs
        # the same micro-batches, which Poisson shards do not. DPSGD sums the clipped gradients itself.
        model, optimizer = dp.share(model.to(accelerator.device)), accelerator.prepare(optimizer)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    precision = Precision(t.precision, accelerator)
    scheduler = build_scheduler(optimizer, t, total)
    stepper = steppers.choose(accelerator, model, optimizer, precision, cfg, dp)
    return model, Optimisation(plan, total, loss_sum, count, optimizer, scheduler, stepper, precision, dp)


def checkpoint_activations(model, accelerator) -> None:
    # Non-reentrant checkpointing works with frozen inputs (LoRA) and with DDP's hooks. ZeRO-3 and FSDP
    # free each gathered weight after its forward, which non-reentrant checkpointing kept a reference to.
    reentrant = collective_forward(accelerator)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


def batch_plan(cfg: Config, examples: Examples, data: dict, accelerator) -> ShuffledPlan:
    """Which train rows each step and rank gets. Takes the replay rows out of `data` (they ride after the task's)."""
    t = cfg.train
    shape = (t.batch_size, t.grad_accum, cfg.seed, accelerator.num_processes, accelerator.process_index)
    replay = data.pop("replay", None)
    if cfg.privacy is not None:  # Poisson sampling of privacy.expected_batch_size rows, in micro-batches of batch_size
        if accelerator.num_processes > 1 and cfg.privacy.secure_mode:
            raise UserError("privacy.secure_mode runs on one process: each rank's CSPRNG would draw other noise")
        where_user = {ex.where: ex.user for ex in examples.splits["train"]}
        users = [where_user[r.where] for r in data["train"]] if cfg.privacy.unit == "user" else None
        return PoissonPlan(
            units_of(users, len(data["train"])),
            cfg.expected_batch(accelerator.num_processes),
            t.batch_size,
            cfg.seed,
            accelerator.num_processes,
            accelerator.process_index,
            lengths=[len(r.input_ids) for r in data["train"]],
        )
    if replay:  # replayed general text rides after the task rows; the plan mixes it into every step
        n_task = len(data["train"])
        data["train"] = data["train"] + replay
        return ReplayPlan(n_task, len(replay), cfg.retention.replay.fraction, *shape)
    if cfg.data.group_by_length:
        return LengthGroupedPlan([len(r.input_ids) for r in data["train"]], *shape)
    return ShuffledPlan(len(data["train"]), *shape)
