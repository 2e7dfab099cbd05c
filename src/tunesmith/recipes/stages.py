"""Multi-stage (intermediate-task) fine-tuning: `stages:` in a config, then its own task last.

Each stage is an ordinary run (<output_dir>/<name>-stageN-<stage>) that starts from the previous
stage's weights. With `stage_mode: merge` a LoRA stage's adapter is merged into its base and saved as a
plain model directory (<run>/merged), which the next stage loads with a fresh adapter. With
`stage_mode: stack` nothing is merged on disk: the next stage lists the earlier adapters in
`model.adapters` (folded into the base when it loads) and trains a new adapter on top, so the final
run is the base plus a few small adapters. After every stage the
model is also scored on the final task's validation data, so the report shows what each stage did
for the task that matters. The final stage is the run named by the config.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from tunesmith.config import Config, stage_config
from tunesmith.console import console
from tunesmith.rundir import RunDir


def weights_of(run: RunDir, cfg: Config, mode: str) -> dict:
    """The model section's changes that make the next stage start from this run's weights."""
    if mode == "stack":
        return {"adapters": [*cfg.model.adapters, str(run / "adapter")]}
    if cfg.peft.adapter:
        from tunesmith.inference import export_merged

        target = run / "merged"
        export_merged(run, str(target))
        return {"name": str(target), "revision": None, "adapters": []}
    return {"name": str(run / "model"), "revision": None, "adapters": []}


def final_task_metrics(final: Config, model: dict) -> dict:
    """The final task's validation metrics of a model, without training it."""
    from tunesmith.recipes import recipe_for

    cfg = stage_config(final, len(final.stages), model)
    recipe = recipe_for(cfg)
    with tempfile.TemporaryDirectory() as scratch:
        s = recipe.setup(cfg, RunDir(Path(scratch)))
        return recipe.evaluate(s, "finetuned")["validation"]


def _origin(cfg: Config) -> str:
    return " + ".join([cfg.model.name, *cfg.model.adapters])


def train_staged(cfg: Config, overwrite: bool = False) -> RunDir:
    from tunesmith.recipes import recipe_for
    from tunesmith.report.console import print_stages

    model, rows = None, []
    for i, stage in enumerate(cfg.stages):
        scfg = stage_config(cfg, i, model)
        console.print(
            f"[bold]stage {i + 1}/{len(cfg.stages) + 1}[/]: {stage.name} ({scfg.task_name}) from {_origin(scfg)}"
        )
        run = recipe_for(scfg).train(scfg, overwrite=overwrite)
        model = weights_of(run, scfg, cfg.stage_mode)
        own = run.read_json("eval.json")["finetuned"]["validation"]
        rows.append(
            {
                "stage": stage.name,
                "task": scfg.task_name,
                "run": str(run.path),
                "own": own,
                "final_task": final_task_metrics(cfg, model),
            }
        )
    final = stage_config(cfg, len(cfg.stages), model)
    console.print(
        f"[bold]stage {len(cfg.stages) + 1}/{len(cfg.stages) + 1}[/]: final task ({final.task_name}) "
        f"from {_origin(final)}"
    )
    run = recipe_for(final).train(final, overwrite=overwrite, report_html=False)
    report = run.read_json("eval.json")
    rows.append(
        {
            "stage": "final",
            "task": final.task_name,
            "run": str(run.path),
            "own": report["finetuned"]["validation"],
            "final_task": report["finetuned"]["validation"],
        }
    )
    report["stages"] = rows
    run.write_json("eval.json", report)
    print_stages(rows)
    from tunesmith.report.compare import compare

    compare([r["run"] for r in rows], run / "stages.html", title=f"Stages of '{cfg.name}'")
    from tunesmith.recipes.loop import write_run_report

    write_run_report(run)  # here, not in the loop: the report shows the stages table
    return run
