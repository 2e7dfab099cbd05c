"""The training loop every recipe shares: one optimizer step on one screen, checkpoints, resume.

A recipe (causal_lm.py, classification.py) builds a `Setup` (data, model, how to collate a batch,
how to compute a summed loss and count its targets) and supplies evaluate() and save(); `train()`
here runs the same sequence for all of them: base evaluation, fit, save, fine-tuned evaluation.
"""

from __future__ import annotations

import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch
from accelerate import Accelerator

from tunesmith.config import Config
from tunesmith.data.prepare import Examples
from tunesmith.errors import UserError
from tunesmith.reporting import print_before_after, print_setup
from tunesmith.rundir import RunDir
from tunesmith.training import checkpoint as ckpt
from tunesmith.training.early_stopping import EarlyStopper
from tunesmith.training.optim import build_optimizer, build_scheduler
from tunesmith.training.plan import ShuffledPlan
from tunesmith.training.progress import TrainProgress, console


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
    best_weights: dict[str, torch.Tensor] | None = None
    counters: dict = field(default_factory=lambda: {"skipped_nonfinite": 0, "tokens": 0})
    extra: dict = field(default_factory=dict)  # recipe-specific state (label map, samples...)


def build(cfg: Config, run: RunDir, examples: Examples, data: dict, tokenizer, model, model_path: str, **fns) -> Setup:
    """Wrap a freshly loaded model with the optimizer, schedule, batch plan and accelerator."""
    accelerator = Accelerator(mixed_precision="bf16" if cfg.train.precision == "bf16" else "no")
    optimizer = build_optimizer(model, cfg.train)
    model, optimizer = accelerator.prepare(model, optimizer)
    t = cfg.train
    plan = ShuffledPlan(len(data["train"]), t.batch_size, t.grad_accum, cfg.seed,
                        accelerator.num_processes, accelerator.process_index)
    total = t.max_steps or math.ceil(t.epochs * plan.steps_per_epoch)
    s = Setup(cfg, run, accelerator, examples, data, tokenizer, model, optimizer,
              build_scheduler(optimizer, t, total), plan, total, model_path, **fns)
    s.stopper = EarlyStopper(t.early_stopping)
    print_setup(s)
    return s


def trainable_state(s: Setup) -> dict[str, torch.Tensor]:
    model = s.accelerator.unwrap_model(s.model)
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(s: Setup, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(s.accelerator.unwrap_model(s.model).named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)


def save_checkpoint(s: Setup, step: int) -> None:
    opt_meta, opt_tensors = ckpt.optimizer_to_tensors(s.optimizer)
    rng_meta, rng_tensors = ckpt.rng_state()
    tensors = {"trainable.safetensors": trainable_state(s), "optimizer.safetensors": opt_tensors,
               "rng.safetensors": rng_tensors}
    if s.best_weights is not None:
        tensors["best.safetensors"] = s.best_weights
    state = {"step": step, "epoch": s.plan.epoch_of(step), "optimizer": opt_meta, "rng": rng_meta,
             "scheduler": {"last_epoch": s.scheduler.last_epoch}, "early_stopping": s.stopper.state_dict(),
             "counters": s.counters, "fingerprint": s.examples.fingerprint}
    if s.accelerator.is_main_process:
        ckpt.save_checkpoint(s.run / "checkpoints", step, tensors, state, s.cfg.train.save_total_limit)
    s.accelerator.wait_for_everyone()


def restore(s: Setup, path) -> int:
    state, tensors = ckpt.load_checkpoint(path)
    if state["fingerprint"] != s.examples.fingerprint:
        raise UserError(f"Refusing to resume from {path}: the training/validation data changed",
                        [f"dataset fingerprint {state['fingerprint'][:12]} -> {s.examples.fingerprint[:12]}"])
    load_trainable(s, tensors["trainable.safetensors"])
    ckpt.optimizer_from_tensors(s.optimizer, state["optimizer"], tensors["optimizer.safetensors"])
    s.scheduler.last_epoch = state["scheduler"]["last_epoch"]
    s.scheduler._last_lr = [g["lr"] for g in s.optimizer.param_groups]
    s.stopper.load_state_dict(state["early_stopping"])
    s.best_weights = tensors.get("best.safetensors")
    s.counters = state["counters"]
    ckpt.set_rng_state(state["rng"], tensors["rng.safetensors"])
    return state["step"]


def fit(s: Setup, start_step: int = 0) -> dict:
    cfg, acc, model, opt = s.cfg, s.accelerator, s.model, s.optimizer
    train_rows = s.data["train"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    consecutive_skips, stopped_early, done = 0, False, start_step
    model.train()
    with TrainProgress(s.total_steps, start_step) as progress:
        for step in range(start_step, s.total_steps):
            t0 = time.perf_counter()
            micro = [[train_rows[i] for i in idx] for idx in s.plan.micro_batches(step)]
            # Normalise by the targets (tokens, or rows) of the whole step: every micro-batch, every rank.
            n_targets = acc.reduce(torch.tensor(sum(s.count(m) for m in micro), device=acc.device), "sum").item()
            loss_sum, real_tokens = 0.0, 0
            for i, rows in enumerate(micro):
                batch = {k: v.to(acc.device) for k, v in s.collate(rows).items()}
                sync = nullcontext() if i == len(micro) - 1 else acc.no_sync(model)
                with sync:
                    with acc.autocast():
                        loss, _ = s.loss_sum(model, batch)
                    # DDP averages gradients over ranks, so scale the sum back up by the world size.
                    acc.backward(loss * acc.num_processes / max(n_targets, 1))
                loss_sum += loss.item()
                real_tokens += int(batch["attention_mask"].sum())
            grad_norm = acc.clip_grad_norm_(trainable, cfg.train.max_grad_norm or float("inf"))
            step_loss = acc.reduce(torch.tensor(loss_sum, device=acc.device), "sum").item() / max(n_targets, 1)
            lr = s.scheduler.get_last_lr()[0]  # the rate this update uses, logged with it
            if math.isfinite(step_loss) and torch.isfinite(grad_norm):
                opt.step()
                s.scheduler.step()
                consecutive_skips = 0
            else:
                # A non-finite step is skipped whole: weights, optimizer and schedule stay as they were.
                s.counters["skipped_nonfinite"] += 1
                consecutive_skips += 1
                s.run.log({"step": step + 1, "skipped": "nonfinite", "rows": [r.id for m in micro for r in m]})
                if consecutive_skips >= cfg.train.max_consecutive_skips:
                    raise RuntimeError(f"{consecutive_skips} consecutive non-finite steps; halting (last checkpoint kept)")
            opt.zero_grad(set_to_none=True)
            done = step + 1
            s.counters["tokens"] += real_tokens
            tps = real_tokens * acc.num_processes / (time.perf_counter() - t0)
            if done % cfg.train.log_every == 0 and acc.is_main_process:
                s.run.log({"step": done, "epoch": s.plan.epoch_of(step), "loss": step_loss, "lr": lr,
                           "grad_norm": float(grad_norm), "tokens_per_s": round(tps, 1), "tokens": s.counters["tokens"]})
            progress.step(done, step_loss, lr, float(grad_norm), tps)
            if cfg.eval.every and done % cfg.eval.every == 0 and done < s.total_steps:
                stopped_early = evaluate_during_training(s, done, progress)
            if cfg.train.save_every and done % cfg.train.save_every == 0:
                save_checkpoint(s, done)
            if stopped_early:
                console.print(f"Early stopping at step {done}: no improvement in {s.stopper.bad_evals} evaluations")
                break
        if cfg.train.early_stopping.patience and not stopped_early:
            evaluate_during_training(s, done, progress)  # the last step competes for "best" too
    if s.stopper.best_step is not None and s.best_weights is not None and cfg.train.early_stopping.patience:
        load_trainable(s, s.best_weights)  # restore the best evaluation's weights, not the last
        console.print(f"Restored the best weights (step {s.stopper.best_step}, "
                      f"{cfg.train.early_stopping.metric} {s.stopper.best:.4f})")
    return {"steps": done, "stopped_early": stopped_early, **s.counters}


def evaluate_during_training(s: Setup, step: int, progress: TrainProgress) -> bool:
    metrics = s.quick_eval(s, "validation")
    s.run.log({"step": step, "eval": metrics})
    progress.eval(step, metrics)
    value = metrics.get(s.cfg.train.early_stopping.metric.removeprefix("eval_"))
    if s.stopper.update(value, step) and s.cfg.train.early_stopping.patience:
        s.best_weights = trainable_state(s)
    s.model.train()
    return s.stopper.should_stop


def train(cfg: Config, recipe, resume: bool = False, overwrite: bool = False) -> RunDir:
    """setup -> evaluate the base model -> fit -> save -> evaluate the fine-tuned model -> report."""
    run = RunDir.create(cfg, resume, overwrite)
    if resume:
        from tunesmith.resume import check_drift

        check_drift(run, cfg)
    run.write_config(cfg)
    run.update_run(status="running", started=time.time(), task=cfg.task_name)
    try:
        s = recipe.setup(cfg, run)
    except UserError:
        if not resume:  # bad data or model: leave no half-made run behind to block the corrected one
            shutil.rmtree(run.path, ignore_errors=True)
        raise
    latest = ckpt.latest_checkpoint(run / "checkpoints") if resume else None
    start = restore(s, latest) if latest else 0
    if latest:
        run.truncate_log(start)
        console.print(f"Resumed from {latest} (step {start} of {s.total_steps})")
    report = run.read_json("eval.json", {}) if resume else {}
    report["task"] = cfg.task_name
    if cfg.eval.before_after and "base" not in report:
        report["base"] = recipe.evaluate(s, "base")  # before any update: for LoRA and full fine-tuning alike
        run.write_json("eval.json", report)
    summary = fit(s, start)
    recipe.save(s)
    report["finetuned"] = recipe.evaluate(s, "finetuned")
    run.log({"step": summary["steps"], "eval": report["finetuned"]["validation"], "final": True})
    report["samples"] = merge_samples(report)
    report["training"] = summary
    run.write_json("eval.json", report)
    run.update_run(status="finished", finished=time.time(), model_path=s.model_path, steps=summary["steps"])
    print_before_after(report)
    return run


def merge_samples(report: dict) -> list[dict]:
    """Line up base and fine-tuned outputs of the same rows: {id, prompt, base, finetuned, reference}."""
    base = {x["id"]: x for x in report.get("base", {}).pop("samples", [])}
    merged = []
    for ft in report["finetuned"].pop("samples", []):
        output = ft.pop("output")
        merged.append({**ft, "base": base.get(ft["id"], {}).get("output"), "finetuned": output})
    return merged
