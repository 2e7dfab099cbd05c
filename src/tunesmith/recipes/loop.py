"""A run's sequence, the same for every recipe: open or resume the run, base evaluation, fit, save,
fine-tuned evaluation, report. And `tunesmith eval`, which scores a finished run's base and fine-tuned model
again through the same recipe.

A recipe (causal_lm.py, classification.py; the Recipe protocol in recipe.py) builds a `Setup` with
building.build() (data, model, how to collate a batch, how to compute a summed loss and count its targets)
and supplies evaluate() and save(); fitting.py holds the fitting loop, state.py checkpoints and resume.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from accelerate.utils import broadcast_object_list

from tunesmith import inference
from tunesmith.config import Config
from tunesmith.config.decoding import for_command
from tunesmith.console import console
from tunesmith.errors import UserError
from tunesmith.recipes import recipe_for
from tunesmith.recipes.building import Setup
from tunesmith.recipes.fitting import fit
from tunesmith.recipes.opening import open_run, set_up
from tunesmith.recipes.recipe import Recipe
from tunesmith.report.console import print_before_after
from tunesmith.rundir import RunDir
from tunesmith.security import check_path
from tunesmith.training import trackers
from tunesmith.training.processes import process_state


def train(
    cfg: Config,
    recipe: Recipe,
    resume: bool = False,
    overwrite: bool = False,
    allow_drift: bool = False,
    fallback: bool = False,
    on_eval: Callable[[int, dict], None] | None = None,
    report_html: bool = True,
) -> RunDir:
    """setup -> evaluate the base model -> fit -> save -> evaluate the fine-tuned model -> report.
    `report_html=False` leaves report.html to the caller (a staged run writes it once its stages are known)."""
    if not process_state().is_main_process:
        console.quiet = True  # one process talks
    run, opened = open_on_main(cfg, resume, overwrite, allow_drift, fallback)
    try:
        return run_locked(cfg, recipe, run, opened, allow_drift, on_eval, report_html)
    finally:
        run.unlock()


def open_on_main(cfg: Config, resume: bool, overwrite: bool, allow_drift: bool, fallback: bool) -> tuple[RunDir, list]:
    """Only the main process creates, checks, locks and cleans the run directory. Returns it and `opened`:
    [what open_run() found] on the main process, [None] on the others until run_locked() hears it."""
    state = process_state()
    opened: list = [None]
    run = RunDir(cfg.run_dir, writer=False)
    if state.is_main_process:
        try:
            run, *rest = open_run(cfg, resume, overwrite, allow_drift, fallback)
            opened = [tuple(rest)]
        except BaseException as err:
            opened = [getattr(err, "exit_code", 1)]
            if state.num_processes > 1:
                broadcast_object_list(opened)  # the other ranks wait in run_locked() for the outcome
            raise
    return run, opened


def run_locked(
    cfg: Config,
    recipe: Recipe,
    run: RunDir,
    opened: list,
    allow_drift: bool,
    on_eval: Callable[[int, dict], None] | None,
    report_html: bool,
) -> RunDir:
    """train() once the main process holds the run directory's lock; `opened` says what open_run() found."""
    resume, latest, before = agree_on_opening(opened)
    s, updates, data_step = set_up(cfg, recipe, run, latest, before, allow_drift)
    s.evaluation.on_eval = on_eval
    report = report_so_far(s, resume, latest, updates, data_step)
    if cfg.eval.before_after and "base" not in report:
        report["base"] = recipe.evaluate(s, "base")  # before any update: for LoRA and full fine-tuning alike
        run.write_json("eval.json", report)
    summary = fit(s, updates, data_step)
    recipe.save(s)
    report["finetuned"] = recipe.evaluate(s, "finetuned")
    finish(s, report, summary, report_html)
    return run


def agree_on_opening(opened: list) -> tuple[bool, Path | None, dict | None]:
    """The main process's (resume, checkpoint to resume from, the run's record before), on every rank; or
    the exit code of the error it has already reported."""
    opened = broadcast_object_list(opened)  # every rank starts from the same checkpoint
    if isinstance(opened[0], int):
        raise SystemExit(opened[0])  # the main process has reported the error
    resume, latest, before = opened[0]
    return resume, Path(latest) if latest else None, before


def report_so_far(s: Setup, resume: bool, latest: Path | None, updates: int, data_step: int) -> dict:
    """eval.json as a resumed run left it (its base evaluation is not repeated), or a fresh one. The metrics
    log is cut back to the checkpoint, so no step is logged twice."""
    run = s.run
    if latest:
        run.truncate_log(updates, data_step)
        console.print(f"Resumed from {latest} (step {updates} of {s.optim.total_steps})")
    elif resume:
        run.truncate_log(0, 0)  # nothing to continue from: start over without logging steps twice
        console.print("[yellow]No usable checkpoint: training starts from step 0.[/]")
    report = run.read_json("eval.json", {}) if resume else {}
    report["task"] = s.cfg.task_name
    return report


def finish(s: Setup, report: dict, summary: dict, report_html: bool) -> None:
    """The final metrics line, eval.json (samples side by side, the training summary, the privacy
    guarantee), run.json's status, the before/after table and report.html."""
    cfg, run = s.cfg, s.run
    run.log({"step": summary["steps"], "eval": report["finetuned"]["validation"], "final": True})
    trackers.log(s.accelerator, cfg, {"eval": report["finetuned"]["validation"]}, summary["steps"])
    trackers.finish(s.accelerator, cfg)
    report["samples"] = merge_samples(report)
    report["training"] = summary
    if s.optim.dp is not None:
        dp = s.optim.dp
        report["privacy"] = dp.summary()
        report["epsilon"], report["delta"] = report["privacy"]["epsilon"], report["privacy"]["delta"]
        console.print(
            f"Privacy guarantee: {report['privacy']['guarantee']} after {dp.steps_taken} steps "
            f"(noise multiplier {dp.sigma:.3f}, sample rate {dp.sample_rate:.4g}, {cfg.privacy.accountant})"
        )
    run.write_json("eval.json", report)
    run.update_run(status="finished", finished=time.time(), model_path=s.model_path, steps=summary["steps"])
    print_before_after(report)
    if run.writer and report_html:
        write_run_report(run)
    if torch.distributed.is_initialized():
        process_state().destroy_process_group()  # a clean exit under torchrun, without NCCL's leak warning


def write_run_report(run: RunDir) -> None:
    """report.html next to eval.json. The run has finished: a failure here is reported, not fatal."""
    from tunesmith.report.html import write_report

    try:
        console.print(f"Report: {write_report(run.path)}")
    except Exception as err:  # noqa: BLE001 (any plotting failure must not lose a finished run)
        console.print(
            f"[yellow]report.html was not written: {type(err).__name__}: {err}; try `tunesmith report {run.path}`[/]"
        )


def merge_samples(report: dict) -> list[dict]:
    """Line up base and fine-tuned outputs of the same rows: {id, prompt, base, finetuned, reference}."""
    base = {x["id"]: x for x in report.get("base", {}).pop("samples", [])}
    merged = []
    for ft in report["finetuned"].pop("samples", []):
        output = ft.pop("output")
        merged.append({**ft, "base": base.get(ft["id"], {}).get("output"), "finetuned": output})
    return merged


def evaluate_run(
    run_path: str,
    split: str = "validation",
    data: str | None = None,
    num_candidates: int | None = None,
    decoding: list[str] | None = None,
) -> dict:
    """`tunesmith eval RUN`: score a finished run's base and fine-tuned model again, on any split or a file.
    It rebuilds the run's recipe setup (same data pipeline, same metrics), scores the base model, loads the
    run's saved weights into the same model and scores again, so both rows come from one code path.
    `num_candidates`, `decoding` (KEY=VALUE): overrides of the run's eval.decoding, recorded in eval.json."""
    run, cfg = inference.open_run(run_path)
    cfg.eval.decoding = for_command(cfg.eval.decoding, cfg.task_name, num_candidates, decoding)
    inference.weights_dir(run)  # damaged or missing weight files stop here, before the base model loads
    key = split
    if data is not None:
        check_path(data, "--data", cfg.allowed_roots)
        cfg.data.test, key = data, f"data:{Path(data).name}"
    elif split == "test" and cfg.data.test is None and cfg.data.test_fraction == 0:
        raise UserError(f"{run.path}: the run has no test split", hint="Pass --data FILE to score a file.")
    recipe = recipe_for(cfg)
    with tempfile.TemporaryDirectory() as scratch:
        s = recipe.setup(cfg, RunDir(Path(scratch)))
        model = s.accelerator.unwrap_model(s.model)
        inference.check_saved_weights(model, run)  # a mismatch stops before the base model is scored
        fresh = {"base": recipe.evaluate(s, "base")}
        inference.load_saved_weights(model, run)
        fresh["finetuned"] = recipe.evaluate(s, "finetuned")
    fresh["samples"] = merge_samples(fresh)
    source = "test" if data is not None else split
    report = run.read_json("eval.json", {})
    for which in ("base", "finetuned"):
        report.setdefault(which, {})[key] = fresh[which][source]
        if source in fresh[which].get("decoding", {}):
            report[which].setdefault("decoding", {})[key] = fresh[which]["decoding"][source]
    run.write_json("eval.json", report)
    shown = {
        "task": cfg.task_name,
        "base": {key: fresh["base"][source]},
        "finetuned": {key: fresh["finetuned"][source]},
        "samples": fresh["samples"] if source == "validation" else [],
    }
    print_before_after(shown)
    return shown
