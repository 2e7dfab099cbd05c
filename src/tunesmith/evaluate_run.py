"""`tunesmith eval RUN`: score the base and the fine-tuned model of a finished run again, on any split.

It rebuilds the run's recipe setup (same data pipeline, same metrics), scores the base model, loads
the run's saved weights into the same model, and scores again, so both rows come from one code path.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from safetensors.torch import load_file

from tunesmith.errors import UserError
from tunesmith.recipes import recipe_for
from tunesmith.recipes.loop import merge_samples
from tunesmith.reporting import print_before_after
from tunesmith.rundir import RunDir
from tunesmith.security import check_path


def load_saved_weights(s, run: RunDir) -> None:
    model = s.accelerator.unwrap_model(s.model)
    if (run / "adapter").is_dir():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(run / "adapter" / "adapter_model.safetensors")))
    elif (run / "model").is_dir():
        state = {}
        for f in sorted((run / "model").glob("*.safetensors")):
            state.update(load_file(str(f)))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected:
            raise UserError(f"{run / 'model'}: weights do not fit the model", [", ".join(unexpected[:5])])
    else:
        raise UserError(f"{run.path}: no adapter/ or model/ (did the run finish?)")


def evaluate_run(run_path: str, split: str = "validation", data: str | None = None) -> dict:
    run = RunDir.open(run_path)
    cfg = run.config()
    key = split
    if data is not None:
        check_path(data, "--data", cfg.allowed_roots)
        cfg.data.test, key = data, f"data:{Path(data).name}"
    elif split == "test" and cfg.data.test is None and cfg.data.test_fraction == 0:
        raise UserError(f"{run.path}: the run has no test split", hint="Pass --data FILE to score a file.")
    recipe = recipe_for(cfg)
    with tempfile.TemporaryDirectory() as scratch:
        s = recipe.setup(cfg, RunDir(Path(scratch)))
        fresh = {"base": recipe.evaluate(s, "base")}
        load_saved_weights(s, run)
        fresh["finetuned"] = recipe.evaluate(s, "finetuned")
    fresh["samples"] = merge_samples(fresh)
    source = "test" if data is not None else split
    report = run.read_json("eval.json", {})
    for which in ("base", "finetuned"):
        report.setdefault(which, {})[key] = fresh[which][source]
    run.write_json("eval.json", report)
    shown = {"task": cfg.task_name, "base": {key: fresh["base"][source]}, "finetuned": {key: fresh["finetuned"][source]},
             "samples": fresh["samples"] if source == "validation" else []}
    print_before_after(shown)
    return shown
