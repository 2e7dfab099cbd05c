"""The fitting loop every recipe shares: forward and backward over a step's micro-batches, the update,
and the bookkeeping after it. How a step is taken (plain, DP-SGD, DeepSpeed) is the stepper's
(training/steppers.py); this loop never asks which one it has.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from tunesmith.config import Config
from tunesmith.console import console
from tunesmith.errors import TrainingHalted
from tunesmith.evaluation.forgetting import over_limit
from tunesmith.recipes.building import Setup
from tunesmith.recipes.state import load_trainable, rollback, save_checkpoint, trainable_state
from tunesmith.training import trackers
from tunesmith.training.frozen_prefix import summary_of
from tunesmith.training.guards import is_oom
from tunesmith.training.progress import TrainProgress
from tunesmith.training.signals import GracefulStop


@dataclass
class Update:
    """One applied update, for the bookkeeping after it."""

    step: int  # updates so far, this one included
    data_step: int
    loss: float
    lr: float
    grad_norm: float
    targets: int  # the step's targets (tokens or rows), every rank's
    tokens: int  # this rank's real tokens
    started: float  # time.perf_counter() when the step began


def fit(s: Setup, updates: int = 0, data_step: int = 0) -> dict:
    """Train until `total_steps` optimizer updates. A step whose loss or gradient is not finite (or,
    by `train.on_spike`, spikes) is skipped whole (weights, optimizer and schedule untouched) and does
    not count as an update; its rows are consumed all the same, so no batch is replayed."""
    acc, consecutive_skips, stopped_early = s.accelerator, 0, False
    s.model.train()
    with TrainProgress(s.optim.total_steps, updates) as progress, GracefulStop() as stop:
        while updates < s.optim.total_steps and not out_of_budget(s, updates):
            started = time.perf_counter()
            step_rows, n_targets = rows_of(s, data_step)
            data_step += 1
            if n_targets == 0 and not s.optim.stepper.takes_empty_steps:
                continue  # every row of the step was excluded after spikes: nothing to learn, no update
            loss_sum, real_tokens, micro = accumulate(s, data_step - 1, step_rows, n_targets)
            # Unscaled, noised (DP), L2-SP, clipped; the norm before clipping.
            grad_norm = s.optim.stepper.prepare_grads(data_step - 1)
            step_loss = acc.reduce(torch.tensor(loss_sum, device=acc.device), "sum").item() / max(n_targets, 1)
            lr = s.optim.scheduler.get_last_lr()[0]  # the rate this update uses, logged with it
            problem = verdict(s, step_loss, grad_norm, n_targets, data_step)
            grad_norm = None if problem else s.optim.stepper.step(grad_norm)  # None: not applied
            if grad_norm is None:  # weights, optimizer and schedule untouched
                problem = problem or "nonfinite"  # DeepSpeed found a non-finite gradient itself
                s.optim.stepper.discard()
            else:
                s.optim.scheduler.step()
                updates, consecutive_skips = updates + 1, 0
                if s.books.average is not None:
                    s.books.average.update()
            s.optim.optimizer.zero_grad(set_to_none=True)
            if problem == "nonfinite":
                consecutive_skips += 1
                skipped(s, updates, data_step, micro, consecutive_skips)
                continue
            if data_step in s.books.spikes.flagged:
                updates, data_step = spiked(s, updates, data_step, micro, step_rows, step_loss)
                if problem:
                    continue
            done = Update(updates, data_step, step_loss, lr, float(grad_norm), n_targets, real_tokens, started)
            stopped_early = after_update(s, done, progress, stop)
            if stopped_early:
                break
        if selects_best(s.cfg) and not stopped_early:
            evaluate_during_training(s, updates, progress)  # the last step competes for "best" too
    return finish(s, updates, data_step, stopped_early)


def accumulate(s: Setup, step: int, step_rows: list[int], n_targets: int) -> tuple[float, int, list]:
    """Forward and backward over this rank's rows of `step`, in micro-batches. On out-of-memory the
    micro-batch halves (accumulation doubles) and the step starts over: same rows, same summed loss."""
    acc, rows = s.accelerator, s.data.rows["train"]
    while True:
        micro = [[rows[i] for i in m] for m in s.optim.plan.split(step_rows)]
        # A short last step can leave a rank fewer micro-batches than the others: zero-weight passes pad it.
        pad = s.optim.stepper.forwards(len(micro)) - len(micro)
        weights = [1.0] * len(micro) + [0.0] * pad
        micro += [[rows[s.optim.plan.step_rows(step)[0]]] for _ in range(pad)]
        loss_sum, real_tokens = 0.0, 0
        try:
            for i, (batch_rows, weight) in enumerate(zip(micro, weights)):
                batch = {k: v.to(acc.device) for k, v in s.data.collate(batch_rows).items()}
                last = i == len(micro) - 1
                with s.optim.stepper.micro_batch(last):
                    with s.optim.precision.autocast():
                        loss, _ = s.optim.loss_sum(s.model, batch)
                    s.optim.stepper.backward(loss, weight, n_targets, last)
                loss_sum += loss.detach().sum().item() * weight  # DP ghost clipping's loss is per example
                if weight:  # padding passes feed no tokens
                    real_tokens += tokens_in(batch)
            return loss_sum, real_tokens, micro
        except RuntimeError as exc:
            if not (is_oom(exc) and s.cfg.train.oom_backoff):
                raise
            batch = loss = None  # drop the references that hold activations before retrying
            back_off(s, step)


def rows_of(s: Setup, data_step: int) -> tuple[list[int], int]:
    """This rank's train rows of `data_step` (less those excluded after spikes), and the targets (tokens, or
    rows) of the whole step, every micro-batch and every rank: what the step's loss is normalised by."""
    acc = s.accelerator
    rows = [i for m in s.optim.plan.micro_batches(data_step) for i in m if i not in s.books.excluded]
    n_local = s.optim.count([s.data.rows["train"][i] for i in rows])
    return rows, acc.reduce(torch.tensor(n_local, device=acc.device), "sum").item()


def tokens_in(batch: dict[str, torch.Tensor]) -> int:
    """Real tokens in a collated batch; a packed batch's mask is 4-D, so it says how many."""
    return int(batch["n_tokens"] if "n_tokens" in batch else batch["attention_mask"].sum())


def back_off(s: Setup, step: int) -> None:
    """After out-of-memory in `step`: drop the half-accumulated step and halve the micro-batch, or halt at 1."""
    s.optim.stepper.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    plan = s.optim.plan
    if plan.micro_size == 1:
        s.run.update_run(status="halted")
        raise TrainingHalted(
            "Out of memory with a micro-batch of 1 row; halted. The last committed "
            "checkpoint is intact; lower data.max_length or use a smaller model."
        ) from None
    plan.micro_size //= 2
    per_step = math.ceil(plan.rows_per_step / s.accelerator.num_processes / plan.micro_size)
    message = (
        f"out of memory at data step {step + 1}: micro-batch {plan.micro_size * 2} -> "
        f"{plan.micro_size}, {per_step} micro-batches per step (effective batch unchanged, "
        f"{plan.rows_per_step} rows)"
    )
    console.print(f"[yellow]{message}[/]")
    s.run.log({"data_step": step + 1, "oom_backoff": plan.micro_size, "warning": message})


def out_of_budget(s: Setup, updates: int) -> bool:
    """Whether the stepper allows no further step (DP-SGD: one more would exceed the privacy budget)."""
    reason = s.optim.stepper.budget_spent(updates)
    if reason:
        console.print(reason)
        s.books.counters["stopped_at_budget"] = True
    return bool(reason)


def verdict(s: Setup, loss: float, grad_norm: torch.Tensor, n_targets: int, data_step: int) -> str | None:
    """Why this step must not be applied ("nonfinite", or "spike" under on_spike skip/rollback), else None."""
    if not (math.isfinite(loss) and bool(torch.isfinite(grad_norm))):
        return "nonfinite"
    if n_targets and s.books.spikes.check(loss, data_step) and s.cfg.train.on_spike != "warn":
        return "spike"
    return None


def after_update(s: Setup, done: Update, progress: TrainProgress, stop: GracefulStop) -> bool:
    """The bookkeeping after an applied update: the metrics line, progress, warnings, evaluation, checkpoint,
    a requested stop. Returns whether early stopping ends training here."""
    cfg, updates = s.cfg, done.step
    tps, eps = log_update(s, done)
    progress.step(updates, done.loss, done.lr, done.grad_norm, tps, eps)
    warn(s, updates, s.books.watch.step(updates, done.loss))
    stop_reason = None
    if cfg.eval.every and updates % cfg.eval.every == 0 and updates < s.optim.total_steps:
        stop_reason = evaluate_during_training(s, updates, progress)
    if (cfg.train.save_every and updates % cfg.train.save_every == 0) or stop.requested:
        save_checkpoint(s, updates, done.data_step)
    if stop.requested:
        console.print(
            f"Stopped by signal {stop.received} at step {updates}; checkpoint committed. Continue with --resume."
        )
        s.run.update_run(status="interrupted", step=updates)
        raise SystemExit(stop.exit_code)
    if stop_reason:
        console.print(f"Early stopping at step {updates}: {stop_reason}")
    return stop_reason is not None


def log_update(s: Setup, done: Update) -> tuple[float, float | None]:
    """Count the update's tokens and write its metrics line (every train.log_every updates, with the epsilon
    spent under DP-SGD). Returns tokens/s and that epsilon (None when not logged or not private)."""
    cfg, acc, updates = s.cfg, s.accelerator, done.step
    tokens = done.tokens
    if acc.num_processes > 1:  # every rank's tokens, so tokens/s is the whole launch's
        tokens = int(acc.reduce(torch.tensor(tokens, device=acc.device), "sum").item())
    s.books.counters["tokens"] += tokens
    tps = tokens / (time.perf_counter() - done.started)
    logged = updates % cfg.train.log_every == 0
    eps = s.optim.stepper.epsilon() if logged else None
    if logged and acc.is_main_process:
        record = {
            "step": updates,
            "epoch": s.optim.plan.epoch_of(done.data_step - 1),
            "loss": done.loss,
            "lr": done.lr,
            "grad_norm": done.grad_norm,
            "tokens_per_s": round(tps, 1),
            "tokens": s.books.counters["tokens"],
        }
        if eps is not None:
            record.update(epsilon=round(eps, 4) if math.isfinite(eps) else None, rows=done.targets)
        s.run.log(record)
        trackers.log(acc, cfg, record, updates)
    return tps, eps


def finish(s: Setup, updates: int, data_step: int, stopped_early: bool) -> dict:
    """Keep the best evaluation's weights where evaluations select them (else the average of the weights,
    under train.ema_decay, or the last ones); the training summary."""
    cfg = s.cfg
    if s.books.average is not None:
        # What evaluations scored; best_weights (restored below where selected) are averages too.
        load_trainable(s, s.books.average.state_dict(), "the weight average")
    if s.books.stopper.best_step is not None and s.books.best_weights is not None and selects_best(cfg):
        load_trainable(s, s.books.best_weights)  # restore the best evaluation's weights, not the last
        console.print(
            f"Restored the best weights (step {s.books.stopper.best_step}, "
            f"{cfg.train.early_stopping.metric} {s.books.stopper.best:.4f})"
        )
    elif cfg.retention.max_increase is not None and s.books.stopper.best_step is None:
        console.print("[yellow]No evaluation stayed within retention.max_increase: the last weights are kept[/]")
    summary = {"steps": updates, "data_steps": data_step, "stopped_early": stopped_early, **s.books.counters}
    if cfg.train.cache_frozen_layers:
        summary["frozen_layers_cache"] = summary_of(s.accelerator.unwrap_model(s.model))
    if torch.cuda.is_available():
        summary["gpu_peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return summary


def spiked(s: Setup, updates: int, data_step: int, micro: list, indices: list[int], loss: float) -> tuple[int, int]:
    """Log a spike; under on_spike=rollback, enough of them in the window restore the last checkpoint."""
    t = s.cfg.train
    s.books.counters["spikes"] = s.books.counters.get("spikes", 0) + 1
    ids = [r.id for m in micro for r in m]
    s.books.spike_rows[data_step] = indices
    s.run.log(
        {"step": updates, "data_step": data_step, "spike": round(loss, 6), "rows": ids, "applied": t.on_spike == "warn"}
    )
    console.print(
        f"[yellow]loss spike at data step {data_step}: {loss:.4f} "
        f"({'applied' if t.on_spike == 'warn' else 'not applied'})[/]"
    )
    if t.on_spike != "rollback" or len(s.books.spikes.flagged) < t.spike_rollback_after:
        return updates, data_step
    if s.books.counters.get("rollbacks", 0) >= t.max_rollbacks:
        s.run.update_run(status="halted", step=updates)
        raise TrainingHalted(
            f"Loss spikes persist after {t.max_rollbacks} rollbacks (train.max_rollbacks); halted. "
            "Excluding rows did not help: lower train.lr or raise train.spike_factor."
        )
    return rollback(s, [i for d in s.books.spikes.flagged for i in s.books.spike_rows.get(d, [])], updates, data_step)


def skipped(s: Setup, updates: int, data_step: int, micro: list, consecutive: int) -> None:
    s.books.counters["skipped_nonfinite"] += 1
    s.run.log(
        {"step": updates, "data_step": data_step, "skipped": "nonfinite", "rows": [r.id for m in micro for r in m]}
    )
    console.print(f"[yellow]non-finite loss or gradient at data step {data_step}: step skipped[/]")
    if consecutive >= s.cfg.train.max_consecutive_skips:
        s.run.update_run(status="halted", step=updates)
        raise TrainingHalted(
            f"{consecutive} consecutive non-finite steps (train.max_consecutive_skips); halted. "
            "The last committed checkpoint is intact; lower train.lr or check the data."
        )


def evaluate_during_training(s: Setup, step: int, progress: TrainProgress) -> str | None:
    """Evaluate, keep the best weights, and say why training stops here (None: it goes on). An evaluation
    whose forgetting is over retention.max_increase is never the best, whatever its task metric."""
    with averaged(s):
        metrics = s.evaluation.quick_eval(s, "validation")
    limit = s.cfg.retention.max_increase
    over = over_limit(metrics.get("forgetting_ratio"), limit)
    if over:
        metrics["over_forgetting_limit"] = True
        console.print(
            f"[yellow]step {step}: forgetting {metrics['forgetting_ratio']:.3f}x is over "
            f"retention.max_increase ({1 + limit:.3f}x): not a candidate for best[/]"
        )
    s.run.log({"step": step, "eval": metrics})
    trackers.log(s.accelerator, s.cfg, {"eval": metrics}, step)
    progress.eval(step, metrics)
    warn(s, step, s.books.watch.evaluated(step, metrics.get("loss")))
    if s.evaluation.on_eval is not None:
        s.evaluation.on_eval(step, metrics)
    value = metrics.get(s.cfg.train.early_stopping.metric.removeprefix("eval_"))
    if s.books.stopper.update(None if over else value, step) and selects_best(s.cfg):
        with averaged(s):
            s.books.best_weights = trainable_state(s)
    s.model.train()
    if over and s.cfg.retention.stop_when_exceeded:
        return f"forgetting over retention.max_increase at step {step}"
    return f"no improvement in {s.books.stopper.bad_evals} evaluations" if s.books.stopper.should_stop else None


def averaged(s: Setup):
    """The weights evaluations score and may keep: the average under train.ema_decay, else the model's own."""
    return s.books.average.applied() if s.books.average is not None else nullcontext()


def warn(s: Setup, step: int, message: str | None) -> None:
    if message:
        console.print(f"[yellow]warning: {message}[/]")
        s.run.log({"step": step, "warning": message})


def selects_best(cfg: Config) -> bool:
    """Whether evaluations pick the weights kept at the end (else the last weights are kept)."""
    return bool(cfg.train.early_stopping.patience) or cfg.retention.max_increase is not None
