"""The run directory's life: --overwrite keeps the old run until the new one trains, a failed setup
leaves no half-made run, one process at a time owns a run (a lock), a killed run shows as killed,
and a run directory that cannot be made is an error message, not a traceback.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from io import StringIO
from pathlib import Path

import pytest
import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cli import invoke_cli  # noqa: E402
from _harness import (  # noqa: E402
    ENV,
    cli,
    fresh_accelerator_state,  # noqa: F401  (autouse fixture)
    write_config,
    write_jsonl,
)

from tunesmith import models  # noqa: E402
from tunesmith.recipes import loop  # noqa: E402
from tunesmith.report.console import runs_table  # noqa: E402
from tunesmith.rundir import RunDir  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def own_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path / "home"))


def _quick(cfg: dict) -> dict:
    cfg["train"]["max_steps"] = 2
    cfg["eval"] = {"batch_size": 8, "max_new_tokens": 2, "samples": 0, "before_after": False, "max_rows": 4}
    return cfg


@pytest.fixture
def finished(tmp_path, tiny_config):
    """A finished tiny run: its config path, its directory and the bytes of the files it must keep."""
    path = write_config(tmp_path, _quick(tiny_config))
    assert invoke_cli("train", path).returncode == 0
    run = tmp_path / "runs" / "tiny"
    kept = {
        p.relative_to(run): p.read_bytes()
        for p in [run / "eval.json", run / "run.json", *sorted((run / "adapter").iterdir())]
    }
    return path, run, kept


def _intact(run: Path, kept: dict) -> None:
    assert {name: (run / name).read_bytes() for name in kept} == kept
    assert not list(run.parent.glob(f".{run.name}.old-*")), "the moved-aside copy was left behind"


def _table(folder: Path) -> str:
    out = StringIO()
    Console(file=out, width=300).print(runs_table(folder))
    return out.getvalue()


def _status_of(folder: Path, name: str) -> str:
    line = next(ln for ln in _table(folder).splitlines() if f" {name} " in ln)
    return line.strip(" │|").split("│")[-1].strip()


# -- --overwrite keeps the old run until the new one has started training --------------------------------


@pytest.mark.parametrize("broken", ["missing data", "bad rows", "bad model"])
def test_failed_overwrite_keeps_the_finished_run(finished, tmp_path, broken):
    path, run, kept = finished
    bad_rows = write_jsonl(tmp_path / "data" / "bad.jsonl", ["{not json"] * 10)
    override = {
        "missing data": f"data.train={tmp_path / 'data' / 'trian.jsonl'}",
        "bad rows": f"data.train={bad_rows}",
        "bad model": f"model.name={tmp_path / 'no-such-model'}",
    }[broken]
    res = invoke_cli("train", path, override, "--overwrite")
    assert res.returncode == 2
    assert "error:" in res.stderr
    _intact(run, kept)


def test_overwrite_deletes_the_old_run_only_once_the_new_one_trains(finished, monkeypatch):
    path, run, kept = finished
    seen = []
    real_fit = loop.fit

    def fit(s, *args):
        seen.append((list(run.parent.glob(".tiny.old-*")), (run / "eval.json").exists()))
        return real_fit(s, *args)

    monkeypatch.setattr(loop, "fit", fit)
    assert invoke_cli("train", path, "--overwrite", "seed=1").returncode == 0
    assert seen == [([], False)]  # setup succeeded: the old run was gone, the new one in its place
    assert (run / "eval.json").read_bytes() != kept[Path("eval.json")]


def test_any_exception_in_setup_restores_the_old_run(finished, monkeypatch):
    path, run, kept = finished
    monkeypatch.setattr(models, "apply_peft", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        invoke_cli("train", path, "--overwrite")
    _intact(run, kept)


# -- a failed setup leaves no half-made run ----------------------------------------------------------------


def test_any_exception_in_setup_of_a_new_run_leaves_no_run_directory(tmp_path, tiny_config, monkeypatch):
    path = write_config(tmp_path, _quick(tiny_config))
    monkeypatch.setattr(models, "apply_peft", lambda *a, **k: (_ for _ in ()).throw(ValueError("boom")))
    with pytest.raises(ValueError, match="boom"):
        invoke_cli("train", path)
    assert not (tmp_path / "runs" / "tiny").exists()


def test_any_exception_in_setup_of_a_resume_leaves_its_record(finished, monkeypatch):
    path, run, kept = finished
    config = (run / "config.yaml").read_bytes()
    monkeypatch.setattr(models, "apply_peft", lambda *a, **k: (_ for _ in ()).throw(ValueError("boom")))
    with pytest.raises(ValueError, match="boom"):
        invoke_cli("train", path, "--resume")
    _intact(run, kept)
    assert (run / "config.yaml").read_bytes() == config


def test_absurd_lora_rank_is_an_error_message_and_leaves_no_run(tmp_path, tiny_config):
    path = write_config(tmp_path, _quick(tiny_config))
    res = invoke_cli("train", path, "peft.r=1000000000")
    assert res.returncode == 2
    err = res.stderr
    assert "could not build the model" in err.lower(), err[-2000:]
    assert not (tmp_path / "runs" / "tiny").exists()


# -- one process owns a run --------------------------------------------------------------------------------


def test_a_second_process_on_a_locked_run_is_refused_naming_the_pid(finished):
    path, run, kept = finished
    holder = RunDir(run)
    holder.lock()  # this test process plays the first run, still training
    try:
        for flag in ("--resume", "--overwrite"):
            res = cli("train", path, flag, timeout=120)
            assert res.returncode == 2, res.stderr[-3000:]
            assert f"pid {os.getpid()}" in res.stderr and "Traceback" not in res.stderr, res.stderr[-3000:]
            _intact(run, kept)
    finally:
        holder.unlock()


def test_the_lock_of_a_killed_process_is_taken_over_and_the_run_shows_as_killed(finished, tmp_path):
    path, run, kept = finished
    holder = (
        "import os, signal, sys; from tunesmith.rundir import RunDir; r = RunDir(sys.argv[1]); r.lock(); "
        "r.update_run(status='running'); print('locked', flush=True); os.kill(os.getpid(), signal.SIGKILL)"
    )
    res = subprocess.run([sys.executable, "-c", holder, str(run)], capture_output=True, text=True, env=ENV, timeout=120)
    assert res.returncode == -signal.SIGKILL and "locked" in res.stdout, res.stderr[-2000:]
    assert json.loads((run / "run.json").read_text())["status"] == "running"
    assert _status_of(tmp_path / "runs", "tiny") == "killed"
    assert invoke_cli("train", path, "--overwrite").returncode == 0  # the stale lock does not block
    assert _status_of(tmp_path / "runs", "tiny") == "finished"


def test_runs_shows_a_running_run_whose_pid_is_dead_as_killed(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    alive_run, dead_run = tmp_path / "runs" / "alive", tmp_path / "runs" / "dead"
    for run, pid in ((alive_run, os.getpid()), (dead_run, dead.pid)):
        run.mkdir(parents=True)
        (run / "config.yaml").write_text("model:\n  name: m\n")
        (run / "run.json").write_text(json.dumps({"status": "running", "pid": pid, "host": socket.gethostname()}))
    assert _status_of(tmp_path / "runs", "dead") == "killed"
    assert _status_of(tmp_path / "runs", "alive") == "running"


# -- refusals that must be messages --------------------------------------------------------------------------


def test_resume_and_overwrite_together_are_refused(finished):
    path, run, kept = finished
    res = invoke_cli("train", path, "--resume", "--overwrite")
    assert res.returncode == 2
    assert "--resume" in res.stderr
    _intact(run, kept)


@pytest.mark.parametrize("where", ["output_dir", "run"])
def test_an_output_dir_that_is_a_file_is_an_error_message(tmp_path, tiny_config, where):
    blocker = tmp_path / "runs" if where == "output_dir" else tmp_path / "runs" / "tiny"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a directory\n")
    path = write_config(tmp_path, _quick(tiny_config))
    res = invoke_cli("train", path)
    assert res.returncode == 2
    assert "not a directory" in res.stderr.lower()
    assert blocker.read_text() == "not a directory\n"


def test_an_unwritable_output_dir_is_an_error_message(tmp_path, tiny_config, monkeypatch):
    """As root chmod stops nothing: the permission error the kernel would raise is raised for the output dir."""
    out = tmp_path / "runs"
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self == out or out in self.parents:
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    path = write_config(tmp_path, _quick(tiny_config))
    res = invoke_cli("train", path)
    assert res.returncode == 2
    assert "permission denied" in res.stderr.lower()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
def test_a_read_only_output_dir_is_an_error_message(tmp_path, tiny_config):
    out = tmp_path / "runs"
    out.mkdir()
    out.chmod(0o555)
    try:
        path = write_config(tmp_path, _quick(tiny_config))
        res = invoke_cli("train", path)
        assert res.returncode == 2
        assert "permission denied" in res.stderr.lower()
    finally:
        out.chmod(0o755)
