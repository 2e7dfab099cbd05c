"""Fine-tune a causal language model (formats: instruction, chat, prompt_completion, text).

Run:  tunesmith train examples/alpaca-smollm2.yaml [key=value ...] [--resume]

setup()    data is read and validated before any weights load, then tokenizer, model, PEFT, optimizer
fit()      the training loop; the optimizer step is on one screen
evaluate() the base and the fine-tuned model on the same held-out rows
save()     the adapter (or full model) in a format plain transformers/peft load
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from tunesmith import models
from tunesmith.config import Config
from tunesmith.data.collate import collate, count_targets
from tunesmith.data.prepare import Examples, load_examples, tokenize_splits
from tunesmith.data.tokenize import TokenizedSplit
from tunesmith.evaluation.generate import generate
from tunesmith.evaluation.lm import evaluate_loss
from tunesmith.reporting import print_before_after, print_setup
from tunesmith.rundir import RunDir
from tunesmith.training import checkpoint as ckpt
from tunesmith.training.early_stopping import EarlyStopper
from tunesmith.training.loss import causal_lm_loss_sum
from tunesmith.training.optim import build_optimizer, build_scheduler
from tunesmith.training.plan import ShuffledPlan
from tunesmith.training.progress import TrainProgress, console


@dataclass
class Setup:
    cfg: Config
    run: RunDir
    accelerator: Accelerator
    examples: Examples
    data: dict[str, TokenizedSplit]
    tokenizer: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    plan: ShuffledPlan
    total_steps: int
    stopper: EarlyStopper
    model_path: str
    best_weights: dict[str, torch.Tensor] | None = None
    counters: dict = field(default_factory=lambda: {"skipped_nonfinite": 0, "tokens": 0})


def setup(cfg: Config, run: RunDir) -> Setup:
    examples = load_examples(cfg)  # bad rows stop the run here, before any weights load
    model_path = models.resolve(cfg.model)
    tokenizer = models.load_tokenizer(model_path, cfg.model)
    data = tokenize_splits(cfg, examples, tokenizer)
    run.write_json("data_report.json", examples.report)

    accelerator = Accelerator(mixed_precision="bf16" if cfg.train.precision == "bf16" else "no")
    set_seed(cfg.seed)  # before the model: LoRA's A matrices are initialised from it
    model = models.apply_peft(models.load_causal_lm(model_path, cfg.model), cfg.peft)
    optimizer = build_optimizer(model, cfg.train)
    model, optimizer = accelerator.prepare(model, optimizer)

    t = cfg.train
    plan = ShuffledPlan(len(data["train"].rows), t.batch_size, t.grad_accum, cfg.seed,
                        accelerator.num_processes, accelerator.process_index)
    total = t.max_steps or math.ceil(t.epochs * plan.steps_per_epoch)
    scheduler = build_scheduler(optimizer, t, total)
    s = Setup(cfg, run, accelerator, examples, data, tokenizer, model, optimizer, scheduler, plan, total,
              EarlyStopper(t.early_stopping), model_path)
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
        from tunesmith.errors import UserError

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


def run_eval(s: Setup, split: str = "validation") -> dict:
    pad = s.tokenizer.pad_token_id
    return evaluate_loss(s.model, s.data[split].rows, s.cfg.eval.batch_size, pad, s.accelerator.device, s.cfg.eval.max_rows)


def fit(s: Setup, start_step: int = 0) -> dict:
    cfg, acc, model, opt = s.cfg, s.accelerator, s.model, s.optimizer
    train_rows, pad = s.data["train"].rows, s.tokenizer.pad_token_id
    trainable = [p for p in model.parameters() if p.requires_grad]
    consecutive_skips, stopped_early, done = 0, False, start_step
    model.train()
    with TrainProgress(s.total_steps, start_step) as progress:
        for step in range(start_step, s.total_steps):
            t0 = time.perf_counter()
            micro = [[train_rows[i] for i in idx] for idx in s.plan.micro_batches(step)]
            # Normalise by the target tokens of the whole step (every micro-batch, every rank).
            n_targets = acc.reduce(torch.tensor(sum(count_targets(m) for m in micro), device=acc.device), "sum").item()
            loss_sum, real_tokens = 0.0, 0
            for i, rows in enumerate(micro):
                batch = {k: v.to(acc.device) for k, v in collate(rows, pad).items()}
                sync = nullcontext() if i == len(micro) - 1 else acc.no_sync(model)
                with sync:
                    with acc.autocast():
                        loss, _ = causal_lm_loss_sum(model, batch)
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
    metrics = run_eval(s)
    s.run.log({"step": step, "eval": metrics})
    progress.eval(step, metrics)
    value = metrics.get(s.cfg.train.early_stopping.metric.removeprefix("eval_"))
    if s.stopper.update(value, step) and s.cfg.train.early_stopping.patience:
        s.best_weights = trainable_state(s)
    s.model.train()
    return s.stopper.should_stop


def sample_prompts(s: Setup) -> list:
    rows = [ex for ex in s.examples.splits["validation"] if ex.prompt is not None][: s.cfg.eval.samples]
    return rows


def evaluate(s: Setup, which: str) -> dict:
    """Loss/perplexity on every held-out split, plus sample generations."""
    results = {split: run_eval(s, split) for split in ("validation", "test") if split in s.data}
    rows = sample_prompts(s)
    if rows:
        outs = generate(s.accelerator.unwrap_model(s.model), s.tokenizer, [ex.prompt for ex in rows],
                        s.cfg.eval.max_new_tokens, s.cfg.eval.batch_size, s.accelerator.device)
        results["samples"] = [{"id": ex.id, which: o} for ex, o in zip(rows, outs)]
    s.model.train()
    return results


def save(s: Setup) -> None:
    model = s.accelerator.unwrap_model(s.model)
    if not s.accelerator.is_main_process:
        return
    target = s.run / ("adapter" if s.cfg.peft.method == "lora" else "model")
    model.save_pretrained(target, safe_serialization=True)
    s.tokenizer.save_pretrained(target)


def train(cfg: Config, resume: bool = False, overwrite: bool = False) -> RunDir:
    run = RunDir.create(cfg, resume, overwrite)
    if resume:
        from tunesmith.resume import check_drift

        check_drift(run, cfg)
    run.write_config(cfg)
    run.update_run(status="running", started=time.time(), task="causal_lm")
    s = setup(cfg, run)
    latest = ckpt.latest_checkpoint(run / "checkpoints") if resume else None
    start = restore(s, latest) if latest else 0
    if latest:
        run.truncate_log(start)
        console.print(f"Resumed from {latest} (step {start} of {s.total_steps})")
    report = run.read_json("eval.json", {}) if resume else {}
    if cfg.eval.before_after and "base" not in report:
        report["base"] = evaluate(s, "base")  # before any update: for LoRA and full fine-tuning alike
        run.write_json("eval.json", report)
    summary = fit(s, start)
    save(s)
    report["finetuned"] = evaluate(s, "finetuned")
    run.log({"step": summary["steps"], "eval": report["finetuned"]["validation"], "final": True})
    report["samples"] = merge_samples(s, report)
    report["training"] = summary
    run.write_json("eval.json", report)
    run.update_run(status="finished", finished=time.time(), model_path=s.model_path, steps=summary["steps"])
    print_before_after(report)
    return run


def merge_samples(s: Setup, report: dict) -> list[dict]:
    refs = {ex.id: ex for ex in sample_prompts(s)}
    merged = []
    for i, ft in enumerate(report["finetuned"].pop("samples", [])):
        base = report.get("base", {}).get("samples", [])
        ex = refs.get(ft["id"])
        merged.append({"id": ft["id"], "prompt": ex.prompt[-1]["content"] if ex else None,
                       "base": base[i]["base"] if i < len(base) else None, "finetuned": ft["finetuned"],
                       "reference": ex.completion if ex else None})
    report.get("base", {}).pop("samples", None)
    return merged
