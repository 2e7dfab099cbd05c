"""A run directory from its opening to the first training step: create or reopen and lock it, set the
run up, and either commit (an --overwrite'n run is deleted only now) or leave everything as it was."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from tunesmith.config import Config
from tunesmith.config_drift import check_drift, secret_hashes
from tunesmith.errors import UserError
from tunesmith.recipes.building import Setup
from tunesmith.recipes.recipe import Recipe
from tunesmith.recipes.state import pick_checkpoint, restore
from tunesmith.rundir import RunDir
from tunesmith.training.guards import is_oom


def open_run(cfg: Config, resume: bool, overwrite: bool, allow_drift: bool, fallback: bool) -> tuple:
    """Create or reopen the run directory and lock it; returns (the locked RunDir, resume, checkpoint path or
    None, the run's record before: run.json and config.yaml)."""
    if cfg.train.resume == "auto" and not overwrite and (cfg.run_dir / "config.yaml").exists():
        resume = True
    run = RunDir.create(cfg, resume, overwrite)
    before = None
    try:
        if resume:
            check_drift(run, cfg, allow_drift)
        # Verify the checkpoint before loading data or weights: a refused resume should take seconds.
        latest = pick_checkpoint(run / "checkpoints", fallback) if resume else None
        config = run / "config.yaml"
        before = (
            {"run": run.read_json("run.json"), "config": config.read_text() if config.exists() else None}
            if resume
            else None
        )
        run.write_config(cfg)
        run.update_run(
            status="running",
            started=time.time(),
            task=cfg.task_name,
            secret_hashes=secret_hashes(cfg),
            pid=os.getpid(),
            host=socket.gethostname(),
        )
    except BaseException:
        run.abandon(before)
        raise
    return run, resume, str(latest) if latest else None, before


def set_up(
    cfg: Config, recipe: Recipe, run: RunDir, latest: Path | None, before: dict | None, allow_drift: bool
) -> tuple[Setup, int, int]:
    """recipe.setup() and the checkpoint's state: (Setup, updates, data step). Any failure (bad data or
    model, or anything else) leaves no half-made run to block the corrected one, brings a replaced run
    back and leaves a refused resume's record as it was."""
    try:
        try:
            s = recipe.setup(cfg, run)
        except (MemoryError, RuntimeError) as err:
            if not isinstance(err, MemoryError) and not is_oom(err):
                raise
            raise UserError(
                f"Could not build the model: {str(err).splitlines()[0][:300]}",
                hint="Lower peft.r, data.max_length or the model size for this machine.",
            ) from None
        updates, data_step = restore(s, latest, allow_drift) if latest else (0, 0)
    except BaseException:
        run.abandon(before)
        raise
    run.commit()
    return s, updates, data_step
