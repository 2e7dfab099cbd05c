"""`tunesmith search CONFIG --trials N`: an Optuna study over the config's `search:` block.

Each trial is an ordinary run (<output_dir>/<name>-search/trials/<name>-tNNN) trained with the sampled
values; its validation evaluations (`eval.every`) are reported to the pruner, which stops trials that
fall behind the median of earlier ones. The study lives in a database (SQLite in the search directory
by default), so a killed search continues where it was when run again, and several machines can share
one study through a common database URL. A trial whose process died stops sending heartbeats and is
marked failed: recorded, never lost, never the best. `--budget` bounds the study's wall-clock time
(search/budget.py): no trial starts that cannot finish, and one still training at the deadline is stopped.
"""

from __future__ import annotations

import time
from pathlib import Path

import optuna
import yaml

from tunesmith.config import Config, derive, dump_config
from tunesmith.console import console
from tunesmith.errors import TrainingHalted, UserError
from tunesmith.rundir import RunDir
from tunesmith.search.budget import Clock, Deadline, check_fits, hms, markdown

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)


def search_dir(cfg: Config) -> Path:
    return Path(cfg.output_dir) / f"{cfg.name}-search"


def open_study(cfg: Config) -> optuna.Study:
    sc = cfg.search
    folder = search_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    url = sc.storage or f"sqlite:///{folder.resolve() / 'study.db'}"
    storage = optuna.storages.RDBStorage(url, heartbeat_interval=sc.heartbeat_s, grace_period=3 * sc.heartbeat_s)
    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=sc.startup_trials)
        if sc.pruner == "median"
        else optuna.pruners.NopPruner()
    )
    _, direction = sc.objective(cfg.train.early_stopping.metric)
    study = optuna.create_study(
        study_name=cfg.name, storage=storage, pruner=pruner, direction=direction, load_if_exists=True
    )
    study.sampler = sampler_for(cfg, len(study.get_trials(deepcopy=False)), shared=sc.storage is not None)
    return study


def sampler_for(cfg: Config, trials_so_far: int, shared: bool) -> optuna.samplers.BaseSampler:
    """A sampler seeded from the config's seed and the study's size: a re-run of a killed search must
    not propose trial 0's values again (a sampler seeded with the seed alone restarts its stream).
    Workers sharing a database start at the same size, so there the stream is left unseeded."""
    seed = None if shared else cfg.seed * 100_003 + trials_so_far
    kind = optuna.samplers.TPESampler if cfg.search.sampler == "tpe" else optuna.samplers.RandomSampler
    return kind(seed=seed)


def with_params(cfg: Config, params: dict, **top) -> Config:
    """The config without its search block, with the sampled values (and top-level fields) set."""
    return derive(cfg, {**params, **top}, top.get("name", cfg.name), drop=("search",))


def trial_config(cfg: Config, params: dict, number: int) -> Config:
    return with_params(
        cfg,
        {**params, "train.resume": "never"},
        name=f"{cfg.name}-t{number:03d}",
        output_dir=str(search_dir(cfg) / "trials"),
    )


def objective(cfg: Config, metric: str, deadline: Deadline | None = None):
    from tunesmith.recipes import recipe_for

    def run_trial(trial: optuna.Trial) -> float:
        if deadline is not None:
            deadline.trial = trial.number
        params = {key: dist.suggest(trial, key) for key, dist in cfg.search.space.items()}
        tcfg = trial_config(cfg, params, trial.number)
        console.print(f"[bold]trial {trial.number}[/]: {params}")

        def report(step: int, metrics: dict) -> None:
            if isinstance(metrics.get(metric), (int, float)):
                trial.report(float(metrics[metric]), step)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"{metric} {metrics[metric]:.4f} at step {step}")

        trial.set_user_attr("run_dir", str(tcfg.run_dir))
        try:
            run = recipe_for(tcfg).train(tcfg, overwrite=True, on_eval=report)
        except optuna.TrialPruned:
            RunDir(tcfg.run_dir).update_run(status="pruned")
            raise
        except SystemExit:
            if deadline is None or not deadline.stopped(trial.number):
                raise  # the user's SIGTERM: the search ends as a run does
            # Stopped at the budget's deadline: its checkpoint is committed (run status "interrupted"); the
            # study records it pruned, with the last validation value it reported if any, never complete.
            trial.set_user_attr("stopped", "deadline")
            raise optuna.TrialPruned("stopped at the budget's deadline") from None
        except (UserError, TrainingHalted) as err:  # this trial's values do not work: failed, the study goes on
            trial.set_user_attr("error", str(err).splitlines()[0][:300])
            raise
        value = run.read_json("eval.json")["finetuned"]["validation"].get(metric)
        if not isinstance(value, (int, float)):
            raise UserError(f"search.metric '{metric}' is not among the validation metrics of this task")
        return float(value)

    return run_trial


def search(cfg: Config, trials: int | None, budget: float | None = None) -> optuna.Study:
    """Run the study up to `trials` finished trials in all and/or `budget` seconds in all, whichever ends first."""
    if trials is None and budget is None:
        raise UserError("Give --trials, --budget or both")
    if cfg.search is None:
        raise UserError(
            "This config has no search: block",
            hint="Add search.space, e.g. search: {space: {train.lr: {log_uniform: [1.0e-5, 1.0e-3]}}}",
        )
    metric, direction = cfg.search.objective(cfg.train.early_stopping.metric)
    if cfg.eval.every is None and cfg.search.pruner != "none":
        console.print("[yellow]eval.every is not set: trials have no intermediate evaluations to prune on[/]")
    study = open_study(cfg)
    optuna.storages.fail_stale_trials(study)  # trials of a killed search, silent past the grace period
    clock = Clock(study, shared=cfg.search.storage is not None, budget=budget)
    done = len(study.get_trials(deepcopy=False, states=FINISHED))
    limits = ([f"running up to {trials}"] if trials else []) + (
        [f"budget {hms(budget)} ({hms(clock.left())} left)"] if budget else []
    )
    console.print(f"Study '{cfg.name}' ({direction} {metric}): {done} trials finished, " + ", ".join(limits))
    more = trials is None or done < trials
    if more and budget is not None:
        check_fits(clock, cfg, search_dir(cfg))  # before any trial: a budget that cannot hold one is refused
        more = clock.next_fits()
    if more:
        callbacks = [clock, *([optuna.study.MaxTrialsCallback(trials, states=FINISHED)] if trials else [])]
        with Deadline(clock) as deadline:
            study.optimize(
                objective(cfg, metric, deadline),
                callbacks=callbacks,
                catch=(UserError, TrainingHalted),
                gc_after_trial=True,
            )
    clock.save()
    if trials and clock.ended is None:
        clock.ended = f"--trials {trials} reached"
    write_outputs(cfg, study, metric, clock.summary() if budget else None)
    return study


def write_outputs(cfg: Config, study: optuna.Study, metric: str, budget: dict | None = None) -> None:
    """trials.md, best.yaml, the plots, and compare.html (every trial's curves overlaid); under a budget,
    trials.md and study.yaml also say what the budget held."""
    from tunesmith.report.search import plots, trials_table

    folder = search_dir(cfg)
    rows = trials_table(study, metric) + (f"\n\n{markdown(budget)}" if budget else "")
    (folder / "trials.md").write_text(rows + "\n", encoding="utf-8")
    console.print(rows)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if complete:
        best = study.best_trial
        (folder / "best.yaml").write_text(
            f"# best of study '{cfg.name}': trial {best.number}, {metric} "
            f"{best.value:.4f}\n" + dump_config(with_params(cfg, best.params, name=f"{cfg.name}-best")),
            encoding="utf-8",
        )
        console.print(f"Best: trial {best.number}, {metric} {best.value:.4f} -> {folder / 'best.yaml'}")
    plots(study, folder, metric)
    trial_runs = [
        t.user_attrs["run_dir"]
        for t in study.get_trials(deepcopy=False)
        if Path(t.user_attrs.get("run_dir", "/nonexistent"), "run.json").is_file()
    ]
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)):
        run = RunDir(Path(t.user_attrs.get("run_dir", "/nonexistent")))
        if run.read_json("run.json", {}).get("status") == "running":  # left so by an error or a kill
            run.update_run(status="failed" if "error" in t.user_attrs else "killed")
    if trial_runs:
        from tunesmith.report.compare import compare

        compare(trial_runs, folder / "compare.html", title=f"Search '{cfg.name}': {len(trial_runs)} trials")
    record = {
        "study": cfg.name,
        "metric": metric,
        "direction": study.direction.name.lower(),
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
        **({"budget": budget} if budget else {}),
    }
    (folder / "study.yaml").write_text(yaml.safe_dump(record))
