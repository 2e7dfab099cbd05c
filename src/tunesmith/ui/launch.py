"""What the UI starts and stops: the same `tunesmith train` a user would type, in its own process.

A launched run gets its own session (it outlives the browser tab and the UI server); its console output
goes to `<runs>/.ui/<name>.log`. Stop sends SIGTERM to the process that holds the run's lock: the run
writes a checkpoint and says so, and Resume starts `tunesmith train <run>/config.yaml --resume`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tunesmith.config import config_from_dict
from tunesmith.config.yaml_loader import YAML_ERRORS, load_yaml
from tunesmith.errors import ConfigError, UserError
from tunesmith.rundir import RunDir
from tunesmith.ui.guard import NAME
from tunesmith.ui.runs import read_json

STARTUP_S = 60.0  # how long Launch/Resume wait for the run to say it is running


def validate(text: str, runs_root: Path) -> tuple[dict | None, list[str]]:
    """The YAML as the CLI would load it into this runs folder: (tree, []) or (None, every problem with
    its dotted path)."""
    try:
        tree = load_yaml(text) or {}
    except YAML_ERRORS as err:
        mark = getattr(err, "problem_mark", None)
        return None, [f"line {mark.line + 1}: {getattr(err, 'problem', err)}" if mark else str(err)]
    if not isinstance(tree, dict):
        return None, [f"top level: a mapping is needed, not {type(tree).__name__}"]
    tree = {**tree, "output_dir": str(runs_root)}
    try:
        config_from_dict(tree, "the form")
    except ConfigError as err:
        return None, list(err.problems) or [err.title]
    if not NAME.fullmatch(str(tree.get("name", ""))):
        return None, ["name: letters, digits, '.', '_' or '-' (a run directory's name)"]
    return tree, []


def tunesmith_argv(*args: str) -> list[str]:
    """The command line of `tunesmith ARGS` run by this interpreter: what every process the UI starts runs."""
    return [sys.executable, "-m", "tunesmith", *args]


def error_of(output: str, lines: int = 1) -> str:
    """What a failed command said: from its last `error:` line (and the problems listed under it), at most
    `lines` lines; else its last line."""
    said = output.strip().splitlines()
    start = next((i for i in range(len(said) - 1, -1, -1) if said[i].startswith("error:")), None)
    if start is None:
        return said[-1] if said else "no output"
    return "\n".join(said[start : start + lines])


def _start(args: list[str], runs_root: Path, name: str) -> int:
    """Start `tunesmith train ARGS` and wait until the run says it is running (so the page the browser is
    sent to exists and follows it live); a process that exits first failed, and its error is the answer."""
    logs = runs_root / ".ui"
    logs.mkdir(exist_ok=True)
    with open(logs / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(
            tunesmith_argv("train", *args),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # not the server's child in any way that dies with it
        )
    end = time.monotonic() + STARTUP_S
    while time.monotonic() < end and proc.poll() is None:
        info = read_json(RunDir(runs_root / name), "run.json")
        if info.get("status") == "running" and info.get("pid") == proc.pid:
            break
        time.sleep(0.2)
    if proc.poll() is not None and proc.returncode != 0:
        raise UserError(f"{name} did not start (exit {proc.returncode}): {error_of(log_tail(runs_root, name))}")
    return proc.pid


def launch(tree: dict, runs_root: Path) -> str:
    """Write the form's config beside the runs and start training it; returns the run's name."""
    name = str(tree["name"])
    if (runs_root / name).exists():
        raise UserError(f"a run named {name} exists", hint="Change name: in the config.")
    (runs_root / ".ui").mkdir(exist_ok=True)
    config = runs_root / ".ui" / f"{name}.yaml"
    config.write_text(yaml.safe_dump(tree, sort_keys=False), encoding="utf-8")
    _start([str(config)], runs_root, name)
    return name


def resume(run: RunDir, runs_root: Path) -> None:
    if run.holder_alive():
        raise UserError(f"{run.path.name} is running")
    _start([str(run / "config.yaml"), "--resume"], runs_root, run.path.name)


def stop(run: RunDir) -> int:
    """SIGTERM to the process training this run (on this host); returns its pid."""
    info = run.read_json("run.json", {}) or {}
    pid = info.get("pid")
    if not run.holder_alive() or not isinstance(pid, int) or info.get("host") != socket.gethostname():
        raise UserError(f"{run.path.name} is not running here")
    os.kill(pid, signal.SIGTERM)
    return pid


def log_tail(runs_root: Path, name: str, chars: int = 4000) -> str:
    path = runs_root / ".ui" / f"{name}.log"
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""
