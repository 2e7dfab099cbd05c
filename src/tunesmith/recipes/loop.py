"""The training loop every recipe shares: one optimizer step on one screen, checkpoints, resume.

A recipe (causal_lm.py, classification.py) builds a `Setup` (data, model, how to collate a batch,
how to compute a summed loss and count its targets) and supplies evaluate() and save(); `train()`
here runs the same sequence for all of them: base evaluation, fit, save, fine-tuned evaluation.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from tunesmith.config import Config
from tunesmith.data.prepare import Examples
from tunesmith.errors import TrainingHalted, UserError
from tunesmith.recipes.opening import open_run, set_up
from tunesmith.recipes.state import load_trainable, rollback, save_checkpoint, trainable_state
from tunesmith.reporting import print_before_after, print_setup
from tunesmith.rundir import RunDir
from tunesmith.evaluation.forgetting import over_limit
from tunesmith.privacy.dp import DPSGD
from tunesmith.privacy.sampling import PoissonPlan, units_of
from tunesmith.training.early_stopping import EarlyStopper
from tunesmith.training import processes, trackers, zero
from tunesmith.training.loss import causal_lm_loss_sum, chunked_loss_sum
from tunesmith.training.guards import Precision, SpikeDetector, is_oom
from tunesmith.training.optim import build_optimizer, build_scheduler
from tunesmith.training.plan import LengthGroupedPlan, ReplayPlan, ShuffledPlan
from tunesmith.training.processes import collective_forward, device_kwargs, engine_name, process_state
from tunesmith.training.progress import TrainProgress, console
from tunesmith.training.signals import GracefulStop
from tunesmith.training.watch import Watch


@dataclass
class Setup:
    cfg: Config
    run: RunDir
    accelerator: Accelerator
    examples: Examples
    data: dict[str, list]  # split -> prepared rows
    tokenizer: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    plan: ShuffledPlan
    total_steps: int
    model_path: str
    collate: Callable[[list], dict[str, torch.Tensor]]
    loss_sum: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, int]]  # summed loss, target count
    count: Callable[[list], int]  # targets in a micro-batch: tokens for LMs, rows for classifiers
    quick_eval: Callable[[Setup, str], dict]  # cheap metrics used during training and for early stopping
    stopper: EarlyStopper = None  # type: ignore[assignment]
    precision: Precision = None  # type: ignore[assignment]
    spikes: SpikeDetector = None  # type: ignore[assignment]
    excluded: set[int] = field(default_factory=set)  # train rows rolled back after spikes; never fed again
    spike_rows: dict[int, list[int]] = field(default_factory=dict)  # data step -> rows, for rollback
    anchors: list[torch.Tensor] | None = None  # pretrained values of the trainables, for L2-SP
    best_weights: dict[str, torch.Tensor] | None = None
    dp: DPSGD | None = None  # DP-SGD (privacy:): per-example clipping, noise and the accountant
    engine: object = None  # the DeepSpeed engine (the prepared model) under accelerate's DeepSpeed
    on_eval: Callable[[int, dict], None] | None = None  # sees each evaluation (a search's pruner)
    watch: Watch | None = None  # overfitting and flat-loss warnings
    counters: dict = field(default_factory=lambda: {"skipped_nonfinite": 0, "tokens": 0})
    extra: dict = field(default_factory=dict)  # recipe-specific state (label map, samples...)


def build(cfg: Config, run: RunDir, examples: Examples, data: dict, tokenizer, model, model_path: str, **fns) -> Setup:
    """Wrap a freshly loaded model with the optimizer, schedule, batch plan and accelerator."""
    # fp16 is handled by Precision (its own GradScaler): accelerate has none on CPU.
    accelerator = Accelerator(mixed_precision="bf16" if cfg.train.precision == "bf16" else "no",
                              cpu=device_kwargs()["cpu"], **trackers.accelerator_kwargs(cfg, run.path))
    processes.engage(cfg, accelerator)  # DeepSpeed or FSDP settled (and refusals) before the model is wrapped
    if collective_forward(accelerator) and fns.get("loss_sum") is chunked_loss_sum:
        # The chunked loss recomputes lm_head in the backward, after ZeRO-3/FSDP has freed the gathered weight.
        fns["loss_sum"] = causal_lm_loss_sum
    if cfg.train.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs (LoRA) and with DDP's hooks. ZeRO-3 and FSDP
        # free each gathered weight after its forward, which non-reentrant checkpointing kept a reference to.
        reentrant = collective_forward(accelerator)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    optimizer = build_optimizer(model, cfg.train)
    t = cfg.train
    shape = (t.batch_size, t.grad_accum, cfg.seed, accelerator.num_processes, accelerator.process_index)
    replay = data.pop("replay", None)
    if cfg.privacy is not None:  # Poisson sampling; expected batch batch_size * grad_accum * processes, as without DP
        if accelerator.num_processes > 1 and cfg.privacy.secure_mode:
            raise UserError("privacy.secure_mode runs on one process: each rank's CSPRNG would draw other noise")
        where_user = {ex.where: ex.user for ex in examples.splits["train"]}
        users = [where_user[r.where] for r in data["train"]] if cfg.privacy.unit == "user" else None
        plan = PoissonPlan(units_of(users, len(data["train"])), t.batch_size * t.grad_accum * accelerator.num_processes,
                           t.batch_size, cfg.seed, accelerator.num_processes, accelerator.process_index)
    elif replay:  # replayed general text rides after the task rows; the plan mixes it into every step
        n_task = len(data["train"])
        data["train"] = data["train"] + replay
        plan = ReplayPlan(n_task, len(replay), cfg.retention.replay.fraction, *shape)
    elif cfg.data.group_by_length:
        plan = LengthGroupedPlan([len(r.input_ids) for r in data["train"]], *shape)
    else:
        plan = ShuffledPlan(len(data["train"]), *shape)
    total = t.max_steps or math.ceil(t.epochs * plan.steps_per_epoch)
    dp = DPSGD(model, optimizer, cfg.privacy, plan.n_units, plan.sample_rate, total, cfg.seed) if cfg.privacy else None
    if dp is not None and accelerator.num_processes > 1:
        # No DDP wrapper: its gradient all-reduce and per-forward buffer broadcasts assume every rank runs
        # the same micro-batches, which Poisson shards do not. DPSGD sums the clipped gradients itself.
        model, optimizer = dp.share(model.to(accelerator.device)), accelerator.prepare(optimizer)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    s = Setup(cfg, run, accelerator, examples, data, tokenizer, model, optimizer,
              build_scheduler(optimizer, t, total), plan, total, model_path, **fns)
    s.stopper, s.dp, s.watch = EarlyStopper(t.early_stopping), dp, Watch(total)
    s.engine = model if zero.engaged(accelerator) else None
    run.update_run(processes=accelerator.num_processes, distributed=engine_name(accelerator),
                   device=str(accelerator.device))
    s.precision = Precision(t.precision, accelerator)
    trackers.start(accelerator, cfg, run.path)
    if cfg.retention.l2sp:  # L2-SP pulls toward the pretrained values: keep them (a copy of the trainables)
        s.anchors = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    s.spikes = SpikeDetector(t.spike_factor, t.spike_window)
    print_setup(s)
    return s


def fit(s: Setup, updates: int = 0, data_step: int = 0) -> dict:
    """Train until `total_steps` optimizer updates. A step whose loss or gradient is not finite (or,
    by `train.on_spike`, spikes) is skipped whole (weights, optimizer and schedule untouched) and does
    not count as an update; its rows are consumed all the same, so no batch is replayed."""
    cfg, acc, opt = s.cfg, s.accelerator, s.optimizer
    trainable = [p for p in s.model.parameters() if p.requires_grad]
    consecutive_skips, stopped_early = 0, False
    s.model.train()
    with TrainProgress(s.total_steps, updates) as progress, GracefulStop() as stop:
        while updates < s.total_steps:
            if s.dp is not None and s.dp.budget_exhausted():
                console.print(f"Privacy budget: one more step would exceed epsilon {cfg.privacy.target_epsilon}; "
                              f"stopping at step {updates} (epsilon {s.dp.epsilon():.3f})")
                s.counters["stopped_at_budget"] = True
                break
            t0 = time.perf_counter()
            step_rows = [i for m in s.plan.micro_batches(data_step) for i in m if i not in s.excluded]
            data_step += 1
            # Normalise by the targets (tokens, or rows) of the whole step: every micro-batch, every rank.
            n_local = s.count([s.data["train"][i] for i in step_rows])
            n_targets = acc.reduce(torch.tensor(n_local, device=acc.device), "sum").item()
            if n_targets == 0 and s.dp is None:
                continue  # every row of the step was excluded after spikes: nothing to learn, no update
            loss_sum, real_tokens, micro = accumulate(s, data_step - 1, step_rows, n_targets)
            s.precision.unscale(opt)
            if s.dp is not None:  # each example was clipped after its micro-batch; noise once, account once
                s.dp.privatize(data_step - 1)
            if s.anchors is not None:  # L2-SP: the penalty's gradient, l2sp * (w - w0), once per step
                with torch.no_grad():
                    for p, p0 in zip(trainable, s.anchors):
                        if p.grad is not None:
                            p.grad.add_(p - p0, alpha=cfg.retention.l2sp)
            # Pre-clip norm. Under DP the clipping was per example: the noisy mean is not clipped again.
            # Under DeepSpeed the engine clips as it steps, and reports the norm then.
            grad_norm = torch.tensor(0.0) if s.engine is not None else acc.clip_grad_norm_(
                trainable, (s.dp is None and cfg.train.max_grad_norm) or float("inf"))
            step_loss = acc.reduce(torch.tensor(loss_sum, device=acc.device), "sum").item() / max(n_targets, 1)
            lr = s.scheduler.get_last_lr()[0]  # the rate this update uses, logged with it
            problem = None if math.isfinite(step_loss) and bool(torch.isfinite(grad_norm)) else "nonfinite"
            if problem is None and n_targets and s.spikes.check(step_loss, data_step) and cfg.train.on_spike != "warn":
                problem = "spike"
            if problem is None and s.engine is not None:  # DeepSpeed skips a non-finite gradient's update itself
                grad_norm = torch.tensor(zero.step(s.engine))
                problem = None if bool(torch.isfinite(grad_norm)) else "nonfinite"
            elif problem is None:
                s.precision.step(opt)
            if problem is None:
                s.scheduler.step()
                updates += 1
                consecutive_skips = 0
            else:
                s.precision.skipped()
                if s.engine is not None:
                    zero.discard(s.engine)
            opt.zero_grad(set_to_none=True)
            if problem == "nonfinite":
                consecutive_skips += 1
                skipped(s, updates, data_step, micro, consecutive_skips)
                continue
            if data_step in s.spikes.flagged:
                updates, data_step = spiked(s, updates, data_step, micro, step_rows, step_loss)
                if problem:
                    continue
            if acc.num_processes > 1:  # every rank's tokens, so tokens/s is the whole launch's
                real_tokens = int(acc.reduce(torch.tensor(real_tokens, device=acc.device), "sum").item())
            s.counters["tokens"] += real_tokens
            tps = real_tokens / (time.perf_counter() - t0)
            logged = updates % cfg.train.log_every == 0
            eps = s.dp.epsilon() if s.dp is not None and logged else None
            privacy = {"epsilon": round(eps, 4) if math.isfinite(eps) else None, "rows": n_targets} if eps is not None else {}
            if logged and acc.is_main_process:
                record = {"step": updates, "epoch": s.plan.epoch_of(data_step - 1), "loss": step_loss, "lr": lr,
                          "grad_norm": float(grad_norm), "tokens_per_s": round(tps, 1), "tokens": s.counters["tokens"],
                          **privacy}
                s.run.log(record)
                trackers.log(acc, cfg, record, updates)
            progress.step(updates, step_loss, lr, float(grad_norm), tps, eps)
            warn(s, updates, s.watch.step(updates, step_loss))
            if cfg.eval.every and updates % cfg.eval.every == 0 and updates < s.total_steps:
                stopped_early = evaluate_during_training(s, updates, progress)
            if (cfg.train.save_every and updates % cfg.train.save_every == 0) or stop.requested:
                save_checkpoint(s, updates, data_step)
            if stop.requested:
                console.print(f"Stopped by signal {stop.received} at step {updates}; checkpoint committed. "
                              "Continue with --resume.")
                s.run.update_run(status="interrupted", step=updates)
                raise SystemExit(stop.exit_code)
            if stopped_early:
                console.print(f"Early stopping at step {updates}: " + s.extra.pop(
                    "stop_reason", f"no improvement in {s.stopper.bad_evals} evaluations"))
                break
        if selects_best(cfg) and not stopped_early:
            evaluate_during_training(s, updates, progress)  # the last step competes for "best" too
    if s.stopper.best_step is not None and s.best_weights is not None and selects_best(cfg):
        load_trainable(s, s.best_weights)  # restore the best evaluation's weights, not the last
        console.print(f"Restored the best weights (step {s.stopper.best_step}, "
                      f"{cfg.train.early_stopping.metric} {s.stopper.best:.4f})")
    elif cfg.retention.max_increase is not None and s.stopper.best_step is None:
        console.print("[yellow]No evaluation stayed within retention.max_increase: the last weights are kept[/]")
    summary = {"steps": updates, "data_steps": data_step, "stopped_early": stopped_early, **s.counters}
    if torch.cuda.is_available():
        summary["gpu_peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return summary


def accumulate(s: Setup, step: int, step_rows: list[int], n_targets: int) -> tuple[float, int, list]:
    """Forward and backward over this rank's rows of `step`, in micro-batches. On out-of-memory the
    micro-batch halves (accumulation doubles) and the step starts over: same rows, same summed loss."""
    acc, rows = s.accelerator, s.data["train"]
    while True:
        micro = [[rows[i] for i in m] for m in s.plan.split(step_rows)]
        if not micro and s.dp is not None:
            return 0.0, 0, []  # Poisson sampling drew no rows: the step is noise only
        # A short last step can leave a rank no rows: a zero-weight pass keeps DDP in step. ZeRO and FSDP
        # reduce gradients in every backward (a collective), so there every rank runs as many as the busiest.
        weights, most = [1.0] * len(micro), max(len(micro), 1)
        if processes.sharded(acc) and acc.num_processes > 1:
            most = int(acc.gather(torch.tensor([most], device=acc.device)).max())
        micro += [[rows[s.plan.step_rows(step)[0]]]] * (most - len(micro))
        weights += [0.0] * (most - len(weights))
        loss_sum, real_tokens = 0.0, 0
        try:
            for i, (batch_rows, weight) in enumerate(zip(micro, weights)):
                batch = {k: v.to(acc.device) for k, v in s.collate(batch_rows).items()}
                last = i == len(micro) - 1
                with nullcontext() if last or s.engine is not None else acc.no_sync(s.model):
                    with s.precision.autocast():
                        loss, _ = s.loss_sum(s.model, batch)
                    # DDP averages gradients over ranks, so scale the sum back up by the world size. DP
                    # needs each example's own gradient: no step-wide normalisation before clipping.
                    scale = 1.0 if s.dp is not None else weight * acc.num_processes / max(n_targets, 1)
                    if s.engine is not None:
                        zero.backward(s.engine, loss * scale, boundary=last)
                    else:
                        acc.backward(s.precision.scale(loss * scale))
                if s.dp is not None:
                    s.dp.accumulate()
                loss_sum += loss.item() * weight
                if weight:  # a packed batch's mask is 4-D: it says how many tokens are real
                    real_tokens += int(batch["n_tokens"] if "n_tokens" in batch else batch["attention_mask"].sum())
            return loss_sum, real_tokens, micro
        except RuntimeError as exc:
            if not (is_oom(exc) and s.cfg.train.oom_backoff):
                raise
            batch = loss = None  # drop the references that hold activations before retrying
            s.optimizer.zero_grad(set_to_none=True)
            if s.engine is not None:
                zero.discard(s.engine)
            if s.dp is not None:
                s.dp.reset()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if s.plan.micro_size == 1:
                s.run.update_run(status="halted")
                raise TrainingHalted("Out of memory with a micro-batch of 1 row; halted. The last committed "
                                     "checkpoint is intact; lower data.max_length or use a smaller model.") from None
            s.plan.micro_size //= 2
            per_step = math.ceil(s.plan.rows_per_step / acc.num_processes / s.plan.micro_size)
            message = (f"out of memory at data step {step + 1}: micro-batch {s.plan.micro_size * 2} -> "
                       f"{s.plan.micro_size}, {per_step} micro-batches per step (effective batch unchanged, "
                       f"{s.plan.rows_per_step} rows)")
            console.print(f"[yellow]{message}[/]")
            s.run.log({"data_step": step + 1, "oom_backoff": s.plan.micro_size, "warning": message})


def spiked(s: Setup, updates: int, data_step: int, micro: list, indices: list[int], loss: float) -> tuple[int, int]:
    """Log a spike; under on_spike=rollback, enough of them in the window restore the last checkpoint."""
    t = s.cfg.train
    s.counters["spikes"] = s.counters.get("spikes", 0) + 1
    ids = [r.id for m in micro for r in m]
    s.spike_rows[data_step] = indices
    s.run.log({"step": updates, "data_step": data_step, "spike": round(loss, 6), "rows": ids,
               "applied": t.on_spike == "warn"})
    console.print(f"[yellow]loss spike at data step {data_step}: {loss:.4f} "
                  f"({'applied' if t.on_spike == 'warn' else 'not applied'})[/]")
    if t.on_spike != "rollback" or len(s.spikes.flagged) < t.spike_rollback_after:
        return updates, data_step
    if s.counters.get("rollbacks", 0) >= t.max_rollbacks:
        s.run.update_run(status="halted", step=updates)
        raise TrainingHalted(f"Loss spikes persist after {t.max_rollbacks} rollbacks (train.max_rollbacks); halted. "
                             "Excluding rows did not help: lower train.lr or raise train.spike_factor.")
    return rollback(s, [i for d in s.spikes.flagged for i in s.spike_rows.get(d, [])], updates, data_step)


def skipped(s: Setup, updates: int, data_step: int, micro: list, consecutive: int) -> None:
    s.counters["skipped_nonfinite"] += 1
    s.run.log({"step": updates, "data_step": data_step, "skipped": "nonfinite",
               "rows": [r.id for m in micro for r in m]})
    console.print(f"[yellow]non-finite loss or gradient at data step {data_step}: step skipped[/]")
    if consecutive >= s.cfg.train.max_consecutive_skips:
        s.run.update_run(status="halted", step=updates)
        raise TrainingHalted(f"{consecutive} consecutive non-finite steps (train.max_consecutive_skips); halted. "
                             "The last committed checkpoint is intact; lower train.lr or check the data.")


def evaluate_during_training(s: Setup, step: int, progress: TrainProgress) -> bool:
    """Evaluate, keep the best weights, and say whether to stop. An evaluation whose forgetting is over
    retention.max_increase is never the best, whatever its task metric."""
    metrics = s.quick_eval(s, "validation")
    limit = s.cfg.retention.max_increase
    over = over_limit(metrics.get("forgetting_ratio"), limit)
    if over:
        metrics["over_forgetting_limit"] = True
        console.print(f"[yellow]step {step}: forgetting {metrics['forgetting_ratio']:.3f}x is over "
                      f"retention.max_increase ({1 + limit:.3f}x): not a candidate for best[/]")
    s.run.log({"step": step, "eval": metrics})
    trackers.log(s.accelerator, s.cfg, {"eval": metrics}, step)
    progress.eval(step, metrics)
    warn(s, step, s.watch.evaluated(step, metrics.get("loss")))
    if s.on_eval is not None:
        s.on_eval(step, metrics)
    value = metrics.get(s.cfg.train.early_stopping.metric.removeprefix("eval_"))
    if s.stopper.update(None if over else value, step) and selects_best(s.cfg):
        s.best_weights = trainable_state(s)
    s.model.train()
    if over and s.cfg.retention.stop_when_exceeded:
        s.extra["stop_reason"] = f"forgetting over retention.max_increase at step {step}"
        return True
    return s.stopper.should_stop


def warn(s: Setup, step: int, message: str | None) -> None:
    if message:
        console.print(f"[yellow]warning: {message}[/]")
        s.run.log({"step": step, "warning": message})


def selects_best(cfg: Config) -> bool:
    """Whether evaluations pick the weights kept at the end (else the last weights are kept)."""
    return bool(cfg.train.early_stopping.patience) or cfg.retention.max_increase is not None


def train(cfg: Config, recipe, resume: bool = False, overwrite: bool = False, allow_drift: bool = False,
          fallback: bool = False, on_eval: Callable[[int, dict], None] | None = None,
          report_html: bool = True) -> RunDir:
    """setup -> evaluate the base model -> fit -> save -> evaluate the fine-tuned model -> report.
    `report_html=False` leaves report.html to the caller (a staged run writes it once its stages are known)."""
    state = process_state()
    if not state.is_main_process:
        console.quiet = True  # one process talks
    opened: list = [None]
    run = RunDir(cfg.run_dir, writer=False)
    if state.is_main_process:  # only the main process creates, checks, locks and cleans the run directory
        try:
            run, *rest = open_run(cfg, resume, overwrite, allow_drift, fallback)
            opened = [tuple(rest)]
        except BaseException as err:
            opened = [getattr(err, "exit_code", 1)]
            if state.num_processes > 1:
                broadcast_object_list(opened)
            raise
    try:
        return run_locked(cfg, recipe, run, opened, allow_drift, on_eval, report_html)
    finally:
        run.unlock()


def run_locked(cfg: Config, recipe, run: RunDir, opened: list, allow_drift: bool, on_eval, report_html: bool) -> RunDir:
    """train() once the main process holds the run directory's lock; `opened` says what open_run() found."""
    state = process_state()
    opened = broadcast_object_list(opened)  # every rank starts from the same checkpoint
    if isinstance(opened[0], int):
        raise SystemExit(opened[0])  # the main process has reported the error
    resume, latest, before = opened[0]
    latest = Path(latest) if latest else None
    s, updates, data_step = set_up(cfg, recipe, run, latest, before, allow_drift)
    s.on_eval = on_eval
    if latest:
        run.truncate_log(updates, data_step)
        console.print(f"Resumed from {latest} (step {updates} of {s.total_steps})")
    elif resume:
        run.truncate_log(0, 0)  # nothing to continue from: start over without logging steps twice
        console.print("[yellow]No usable checkpoint: training starts from step 0.[/]")
    report = run.read_json("eval.json", {}) if resume else {}
    report["task"] = cfg.task_name
    if cfg.eval.before_after and "base" not in report:
        report["base"] = recipe.evaluate(s, "base")  # before any update: for LoRA and full fine-tuning alike
        run.write_json("eval.json", report)
    summary = fit(s, updates, data_step)
    recipe.save(s)
    report["finetuned"] = recipe.evaluate(s, "finetuned")
    run.log({"step": summary["steps"], "eval": report["finetuned"]["validation"], "final": True})
    trackers.log(s.accelerator, cfg, {"eval": report["finetuned"]["validation"]}, summary["steps"])
    trackers.finish(s.accelerator, cfg)
    report["samples"] = merge_samples(report)
    report["training"] = summary
    if s.dp is not None:
        report["privacy"] = s.dp.summary()
        report["epsilon"], report["delta"] = report["privacy"]["epsilon"], report["privacy"]["delta"]
        console.print(f"Privacy guarantee: {report['privacy']['guarantee']} after {s.dp.steps_taken} steps "
                      f"(noise multiplier {s.dp.sigma:.3f}, sample rate {s.dp.sample_rate:.4g}, {cfg.privacy.accountant})")
    run.write_json("eval.json", report)
    run.update_run(status="finished", finished=time.time(), model_path=s.model_path, steps=summary["steps"])
    print_before_after(report)
    if run.writer and report_html:
        write_run_report(run)
    if torch.distributed.is_initialized():
        state.destroy_process_group()  # a clean exit under torchrun, without NCCL's leak warning
    return run


def write_run_report(run: RunDir) -> None:
    """report.html next to eval.json. The run has finished: a failure here is reported, not fatal."""
    from tunesmith.report import write_report

    try:
        console.print(f"Report: {write_report(run.path)}")
    except Exception as err:  # noqa: BLE001 (any plotting failure must not lose a finished run)
        console.print(f"[yellow]report.html was not written: {type(err).__name__}: {err}; "
                      f"try `tunesmith report {run.path}`[/]")


def merge_samples(report: dict) -> list[dict]:
    """Line up base and fine-tuned outputs of the same rows: {id, prompt, base, finetuned, reference}."""
    base = {x["id"]: x for x in report.get("base", {}).pop("samples", [])}
    merged = []
    for ft in report["finetuned"].pop("samples", []):
        output = ft.pop("output")
        merged.append({**ft, "base": base.get(ft["id"], {}).get("output"), "finetuned": output})
    return merged
