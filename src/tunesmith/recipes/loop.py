"""A run's sequence, the same for every recipe: open or resume the run, base evaluation, fit, save,
fine-tuned evaluation, report.

A recipe (causal_lm.py, classification.py; the Recipe protocol in recipe.py) builds a `Setup` with
building.build() (data, model, how to collate a batch, how to compute a summed loss and count its targets)
and supplies evaluate() and save(); fitting.py holds the fitting loop, state.py checkpoints and resume.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
from accelerate.utils import broadcast_object_list

from tunesmith.config import Config
from tunesmith.recipes.fitting import fit
from tunesmith.recipes.opening import open_run, set_up
from tunesmith.recipes.recipe import Recipe
from tunesmith.reporting import print_before_after
from tunesmith.rundir import RunDir
from tunesmith.training import trackers
from tunesmith.training.processes import process_state
from tunesmith.training.progress import console


def train(cfg: Config, recipe: Recipe, resume: bool = False, overwrite: bool = False, allow_drift: bool = False,
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


def run_locked(cfg: Config, recipe: Recipe, run: RunDir, opened: list, allow_drift: bool, on_eval, report_html: bool) -> RunDir:
    """train() once the main process holds the run directory's lock; `opened` says what open_run() found."""
    state = process_state()
    opened = broadcast_object_list(opened)  # every rank starts from the same checkpoint
    if isinstance(opened[0], int):
        raise SystemExit(opened[0])  # the main process has reported the error
    resume, latest, before = opened[0]
    latest = Path(latest) if latest else None
    s, updates, data_step = set_up(cfg, recipe, run, latest, before, allow_drift)
    s.evaluation.on_eval = on_eval
    if latest:
        run.truncate_log(updates, data_step)
        console.print(f"Resumed from {latest} (step {updates} of {s.optim.total_steps})")
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
    if s.optim.dp is not None:
        report["privacy"] = s.optim.dp.summary()
        report["epsilon"], report["delta"] = report["privacy"]["epsilon"], report["privacy"]["delta"]
        dp = s.optim.dp
        console.print(f"Privacy guarantee: {report['privacy']['guarantee']} after {dp.steps_taken} steps "
                      f"(noise multiplier {dp.sigma:.3f}, sample rate {dp.sample_rate:.4g}, {cfg.privacy.accountant})")
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
