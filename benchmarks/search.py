"""The Rotten Tomatoes search of issue #7, with a kill -9 in the middle of the study.

Run:  .venv/bin/python benchmarks/search.py [--trials 12] [--kill-after 4]
      .venv/bin/python benchmarks/search.py --report-only   (search.json from the study as it is)

Starts `tunesmith search examples/sentiment-rotten-tomatoes.yaml --trials N`, waits until `kill-after`
trials have finished and the next one has trained for a minute, kills the whole process group with
SIGKILL, waits past the heartbeat grace period, and runs the same command again, which must continue
the same study. Writes benchmarks/results/search.json and copies the study's trials.md, best.yaml and
plots to benchmarks/results/search/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "benchmarks" / "results" / "runs"
CONFIG = "examples/sentiment-rotten-tomatoes.yaml"
NAME = "sentiment-rotten-tomatoes"
FOLDER = RUNS / f"{NAME}-search"


def counts() -> dict:
    if not (FOLDER / "study.db").exists():
        return {}
    study = optuna.load_study(study_name=NAME, storage=f"sqlite:///{FOLDER / 'study.db'}")
    out: dict = {}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name.lower()] = out.get(t.state.name.lower(), 0) + 1
    out["numbers"] = [t.number for t in study.get_trials(deepcopy=False)]
    return out


def launch(trials: int, log) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tunesmith", "search", CONFIG, f"--trials={trials}", f"output_dir={RUNS}"],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--kill-after", type=int, default=4)
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    if args.report_only:
        return report({"command": f"tunesmith search {CONFIG} --trials {args.trials}"})
    shutil.rmtree(FOLDER, ignore_errors=True)
    record: dict = {"command": f"tunesmith search {CONFIG} --trials {args.trials}", "started": time.time()}
    with open(ROOT / "benchmarks" / "results" / "search.log", "w") as log:
        proc = launch(args.trials, log)
        while True:  # finished trials, then one more that has been running for a minute
            time.sleep(10)
            c = counts()
            finished = sum(c.get(s, 0) for s in ("complete", "pruned", "fail"))
            if finished >= args.kill_after and c.get("running"):
                time.sleep(60)
                break
            if proc.poll() is not None:
                raise SystemExit(f"search ended before the kill point (exit {proc.returncode})")
        record["before_kill"] = counts()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        record["killed_at"] = time.time()
        print("killed:", record["before_kill"], flush=True)
        time.sleep(70)  # past the heartbeat grace period (3 x 20 s), so the killed trial is marked failed
        proc = launch(args.trials, log)
        record["rerun_exit"] = proc.wait()
    report(record)


def report(record: dict) -> None:
    record["after"] = counts()
    record["finished"] = time.time()
    study = optuna.load_study(study_name=NAME, storage=f"sqlite:///{FOLDER / 'study.db'}")
    record["trials"] = [
        {
            "number": t.number,
            "state": t.state.name.lower(),
            "value": t.value,
            "started": str(t.datetime_start),
            "completed": str(t.datetime_complete),
            "last_intermediate": (t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None),
            "params": t.params,
            "seconds": ((t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None),
        }
        for t in study.get_trials()
    ]
    best = study.best_trial
    record["best"] = {"number": best.number, "value": best.value, "params": best.params}
    out = ROOT / "benchmarks" / "results" / "search"
    out.mkdir(exist_ok=True)
    for name in ("trials.md", "best.yaml", "history.png", "importance.png", "compare.html"):
        if (FOLDER / name).exists():
            shutil.copy(FOLDER / name, out / name)
    (ROOT / "benchmarks" / "results" / "search.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["after"]), json.dumps(record["best"]), flush=True)


if __name__ == "__main__":
    main()
