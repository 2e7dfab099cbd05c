"""`tunesmith search CONFIG --budget 45m`: a wall-clock budget for a whole study.

Like `--trials`, the budget is the study's: a re-run (after a kill, or to go on) counts the time the
study's earlier runs spent (kept in the study as `search_seconds`, saved every few seconds). With a shared
`search.storage`, workers' clocks overlap, so there each run's budget is its own and starts afresh.

- Before any trial, a budget that cannot hold one trial is refused (exit 2). One trial is estimated as the
  study's shortest complete trial or, in a study without one, by a timed probe: the config as written,
  trained for PROBE_STEPS steps under <name>-search/probe/ (not a trial), then
  probe seconds + (planned steps - PROBE_STEPS) x seconds per step. Evaluations during and before training
  are left out, so the estimate is a lower bound: a budget under it cannot fit.
- No trial starts when the time left is under the estimate of the next one: the mean of the study's
  complete trials (the probe's estimate until one completes).
- A trial still training at the deadline gets SIGTERM: it commits a checkpoint as any run does on SIGTERM
  and is recorded pruned with `stopped: deadline`, never complete. A trial already past its training (in its
  final evaluation) finishes, so a search can end that evaluation's length after the deadline.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Self

import optuna

from tunesmith.config import Config, derive
from tunesmith.errors import UserError
from tunesmith.training.signals import GracefulStop

PROBE_STEPS = 3
SAVE_EVERY_S = 5.0
_DURATION = re.compile(r"(?:(\d+(?:\.\d*)?)h)?(?:(\d+(?:\.\d*)?)m)?(?:(\d+(?:\.\d*)?)s)?")
DURATION_HINT = "Write a duration with units h, m, s: e.g. 90s, 45m, 1.5h, 2h30m."


def parse_budget(text: str) -> float:
    """'90s', '45m', '1.5h', '2h30m' -> seconds."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None or not any(match.groups()):
        raise UserError(f"--budget {text!r} is not a duration", hint=DURATION_HINT)
    seconds = sum(float(v) * unit for v, unit in zip(match.groups(), (3600, 60, 1)) if v)
    if seconds <= 0:
        raise UserError(f"--budget {text!r} leaves no time for a trial", hint=DURATION_HINT)
    return seconds


def hms(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    h, rest = divmod(round(seconds), 3600)
    return (f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m") + f"{rest % 60:02d}s"


def trial_seconds(t: optuna.trial.FrozenTrial) -> float:
    return (t.datetime_complete - t.datetime_start).total_seconds()


def complete_seconds(study: optuna.Study) -> list[float]:
    return [trial_seconds(t) for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]


class Clock:
    """The study's search time: what earlier runs spent plus this run's, saved in the study."""

    KEY = "search_seconds"

    def __init__(self, study: optuna.Study, shared: bool, budget: float | None):
        self.study, self.shared, self.budget = study, shared, budget
        self.carried = 0.0 if shared else float(study.user_attrs.get(self.KEY, 0.0))
        self.started = time.monotonic()
        self.estimate: float | None = None  # seconds of one trial
        self.estimate_from = ""
        self.probe: dict | None = None
        self.ended: str | None = None  # why no further trial started, when the budget ended the search

    def used(self) -> float:
        return self.carried + time.monotonic() - self.started

    def left(self) -> float:
        return math.inf if self.budget is None else self.budget - self.used()

    def save(self) -> None:
        if not self.shared:
            self.study.set_user_attr(self.KEY, round(self.used(), 1))

    def next_estimate(self) -> float:
        """The next trial's length: the mean complete trial, else the probe's lower bound."""
        done = complete_seconds(self.study)
        if done:
            self.estimate, self.estimate_from = sum(done) / len(done), f"mean of {len(done)} complete trial(s)"
        return self.estimate or 0.0

    def next_fits(self) -> bool:
        estimate, left = self.next_estimate(), self.left()
        if left >= estimate and left > 0:
            return True
        self.ended = (
            f"the budget is spent ({hms(self.used())} used)"
            if left <= 0
            else f"the next trial (~{hms(estimate)}, {self.estimate_from}) would not fit in the {hms(left)} left"
        )
        return False

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """An optimize() callback after each trial: save the time, stop when the next trial cannot fit."""
        self.save()
        if self.budget is not None and not self.next_fits():
            study.stop()

    def summary(self) -> dict:
        states: dict[str, int] = {}
        for t in self.study.get_trials(deepcopy=False):
            state = t.state.name.lower() + (" at the deadline" if "stopped" in t.user_attrs else "")
            states[state] = states.get(state, 0) + 1
        return {
            "budget": hms(self.budget),
            "budget_s": self.budget,
            "used_s": round(self.used(), 1),
            "earlier_runs_s": round(self.carried, 1),
            "restarts": self.shared,
            "trial_estimate_s": round(self.estimate, 1) if self.estimate else None,
            "estimate_from": self.estimate_from,
            "probe": self.probe,
            "trials": states,
            "ended": self.ended,
        }


def markdown(summary: dict) -> str:
    trials = ", ".join(f"{n} {state}" for state, n in summary["trials"].items()) or "none"
    lines = [
        f"Budget {summary['budget']}: used {hms(summary['used_s'])} "
        f"({hms(summary['earlier_runs_s'])} by earlier runs of the study"
        + ("; this worker's budget restarts with each run" if summary["restarts"] else "")
        + f"). "
        f"Trials within it: {trials}."
    ]
    if summary["ended"]:
        lines.append(f"No further trial started: {summary['ended']}.")
    return "\n".join(lines)


def check_fits(clock: Clock, cfg: Config, folder: Path) -> None:
    """Refuse (exit 2, before any trial) a budget that cannot hold one trial; set the clock's first estimate."""
    done = complete_seconds(clock.study)
    if done:
        shortest = min(done)
        clock.estimate, clock.estimate_from = shortest, "shortest complete trial of the study"
        if clock.budget < shortest:
            raise UserError(
                f"--budget {hms(clock.budget)} cannot fit one trial: the shortest complete trial of "
                f"study '{cfg.name}' took {hms(shortest)}",
                hint="Give a budget longer than one trial, or leave --budget out.",
            )
        return
    if clock.left() <= 0:
        return  # spent by earlier runs of the study: no trial starts, and nothing to probe for
    clock.probe = probe(cfg, folder)
    clock.estimate, clock.estimate_from = clock.probe["estimate_s"], "timed probe (a lower bound)"
    if clock.left() < clock.estimate:
        p = clock.probe
        raise UserError(
            f"--budget {hms(clock.budget)} cannot fit one trial: {hms(clock.left())} left, and one trial takes "
            f"at least {hms(clock.estimate)}",
            [
                (
                    f"timed probe: {p['steps']} steps in {p['seconds']:.1f}s (model load included), "
                    f"{p['step_s']:.3g} s/step x {p['planned_steps']} planned steps; evaluations not counted"
                ),
                *([f"{hms(clock.carried)} spent by earlier runs of this study"] if clock.carried else []),
            ],
            hint="The rule: budget left >= probe seconds + (planned steps - probe steps) x seconds per step. "
            "Give a longer --budget, fewer steps (train.max_steps, train.epochs), or leave --budget out.",
        )


def probe(cfg: Config, folder: Path) -> dict:
    """Train the config as written (search values unset) for PROBE_STEPS steps and time it."""
    from tunesmith.console import console
    from tunesmith.recipes import recipe_for

    t = cfg.train
    pcfg = derive(
        cfg,
        {
            "train.max_steps": PROBE_STEPS,
            "train.log_every": 1,
            "train.save_every": None,
            "train.on_spike": "warn",
            "train.resume": "never",
            "eval.every": None,
            "eval.before_after": False,
            "eval.samples": 0,
            "eval.max_rows": 2,
            "eval.generate_rows": 1,
            "eval.baselines": [],
            "log.trackers": [],
            "name": f"{cfg.name}-probe",
            "output_dir": str(folder / "probe"),
        },
        "budget probe",
        drop=("search",),
    )
    console.print(f"[bold]budget probe[/]: {PROBE_STEPS} steps of the config as written, to time one trial")
    started = time.monotonic()
    run = recipe_for(pcfg).train(pcfg, overwrite=True, report_html=False)
    seconds = time.monotonic() - started
    lines = [ln for ln in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln and '"eval"' not in ln]
    times = [float(json.loads(ln)["time"]) for ln in lines]
    step_s = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else seconds / max(len(times), 1)
    rows = run.read_json("data_report.json")["rows"]["train"]
    planned = t.max_steps or math.ceil(t.epochs * math.ceil(rows / (t.batch_size * t.grad_accum)))
    estimate = seconds + max(planned - len(times), 0) * step_s
    return {
        "steps": len(times),
        "seconds": round(seconds, 2),
        "step_s": round(step_s, 4),
        "planned_steps": planned,
        "estimate_s": round(estimate, 1),
        "run_dir": str(run.path),
    }


class Deadline:
    """While a search runs trials: saves the clock every SAVE_EVERY_S seconds and, past the budget, sends the
    process SIGTERM once the running trial is in its training loop (its GracefulStop holds SIGTERM), so the
    trial stops as a run does on SIGTERM. Until then (model loading) it waits; a SIGTERM nobody else
    handles (the user's, outside training) still ends the search, with exit code 143."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.trial: int | None = None  # the number of the trial running now
        self.sent: int | None = None  # the trial the deadline's SIGTERM went to
        self._done = threading.Event()
        self._previous = None

    def stopped(self, number: int) -> bool:
        return self.sent == number

    def _handle(self, signum, frame) -> None:
        if self.sent is not None and self.sent == self.trial:
            return  # the deadline's own signal, reaching us after the trial's training loop had ended
        if signal.getsignal(signum) is not self._handle:
            return  # chained from the trial's GracefulStop, which stops the trial (exit 143, as today)
        raise SystemExit(128 + signum)

    def _watch(self) -> None:
        saved = time.monotonic()
        while not self._done.wait(0.2):
            if time.monotonic() - saved >= SAVE_EVERY_S:
                self.clock.save()
                saved = time.monotonic()
            handler = signal.getsignal(signal.SIGTERM)
            training = isinstance(getattr(handler, "__self__", None), GracefulStop)
            if self.trial is not None and self.sent != self.trial and self.clock.left() <= 0 and training:
                self.sent = self.trial
                os.kill(os.getpid(), signal.SIGTERM)

    def __enter__(self) -> Self:
        if self.clock.budget is not None and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        self._thread = threading.Thread(target=self._watch, name="search-deadline", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
