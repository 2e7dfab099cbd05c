"""`tunesmith eval RUN`: score the base and the fine-tuned model of a finished run again, on any split.

It rebuilds the run's recipe setup (same data pipeline, same metrics), scores the base model, loads
the run's saved weights into the same model, and scores again, so both rows come from one code path.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from tunesmith.config.decoding import for_command
from tunesmith.errors import UserError
from tunesmith.inference import check_saved_weights, load_saved_weights, open_run, weights_dir
from tunesmith.recipes import recipe_for
from tunesmith.recipes.loop import merge_samples
from tunesmith.report.console import print_before_after
from tunesmith.rundir import RunDir
from tunesmith.security import check_path


def evaluate_run(run_path: str, split: str = "validation", data: str | None = None,
                 num_candidates: int | None = None, decoding: list[str] | None = None) -> dict:
    """`num_candidates`, `decoding` (KEY=VALUE): overrides of the run's eval.decoding, recorded in eval.json."""
    run, cfg = open_run(run_path)
    cfg.eval.decoding = for_command(cfg.eval.decoding, cfg.task_name, num_candidates, decoding)
    weights_dir(run)  # damaged or missing weight files stop here, before the base model loads
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
        check_saved_weights(model, run)  # a mismatch stops before the base model is scored
        fresh = {"base": recipe.evaluate(s, "base")}
        load_saved_weights(model, run)
        fresh["finetuned"] = recipe.evaluate(s, "finetuned")
    fresh["samples"] = merge_samples(fresh)
    source = "test" if data is not None else split
    report = run.read_json("eval.json", {})
    for which in ("base", "finetuned"):
        report.setdefault(which, {})[key] = fresh[which][source]
        if source in fresh[which].get("decoding", {}):
            report[which].setdefault("decoding", {})[key] = fresh[which]["decoding"][source]
    run.write_json("eval.json", report)
    shown = {"task": cfg.task_name, "base": {key: fresh["base"][source]}, "finetuned": {key: fresh["finetuned"][source]},
             "samples": fresh["samples"] if source == "validation" else []}
    print_before_after(shown)
    return shown
