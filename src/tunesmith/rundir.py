"""The run directory: the contract between commands.

<output_dir>/<name>/
  config.yaml        resolved configuration
  data_report.json   rows, bad rows, duplicates, leakage, token lengths
  metrics.jsonl      one line per logged step and per evaluation
  eval.json          {"base": {...}, "finetuned": {...}, "samples": [...]}
  run.json           status, model path, parameter counts, timings
  adapter/           PEFT adapter (LoRA), loadable with plain peft
  model/             full weights (full / freeze fine-tuning)
  checkpoints/step-N/
  .lock              held (flock) by the process that trains the run; holds its pid and host
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import socket
import time
from pathlib import Path

from tunesmith.config import Config, dump_config, load_config
from tunesmith.errors import UserError
from tunesmith.security import redact


def _clean(obj):
    """JSON has no NaN/inf: write them as null so every reader can parse the file."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


class RunDir:
    """`writer=False` is the view of every process but the main one under several processes: it
    reads, and its writes are dropped, so one process owns every file."""

    def __init__(self, path: Path, writer: bool = True):
        self.path = Path(path)
        self.writer = writer
        self.aside: Path | None = None  # the run --overwrite replaces, until the new one trains
        self.created = False  # whether this process made the directory (then abandon() removes it)
        self._lock: int | None = None

    @classmethod
    def create(cls, cfg: Config, resume: bool, overwrite: bool) -> RunDir:
        """Make (or reopen) the run directory and take its lock. --overwrite moves the old run aside
        (`.<name>.old-<pid>`): commit() deletes it once the new run trains, abandon() puts it back."""
        if resume and overwrite:
            raise UserError("--resume and --overwrite contradict each other", hint="Pass one of them.")
        run = cls(cfg.run_dir)
        try:
            exists = run.path.is_dir() and any(run.path.iterdir())
            if run.path.exists() and not run.path.is_dir():
                raise NotADirectoryError(20, "Not a directory", str(run.path))
            if resume and not exists:
                raise UserError(f"--resume: no run at {run.path}")
            if exists and not resume and not overwrite:
                raise UserError(
                    f"Run directory {run.path} already exists",
                    hint="Use --resume to continue it, --overwrite to replace it, or set name=...",
                )
            if exists:
                run.lock()  # refused while another process trains it, also under --overwrite
            if exists and overwrite:
                run.aside = run.path.with_name(f".{run.path.name}.old-{os.getpid()}")
                if run.aside.exists():
                    shutil.rmtree(run.aside)
                run.path.rename(run.aside)  # the lock moves with it; no other process can reach it now
                run.unlock()
            run.path.mkdir(parents=True, exist_ok=True)
            run.created = not resume
            if run._lock is None:
                run.lock()
        except OSError as err:
            run.abandon(None)
            raise UserError(
                f"Cannot use {run.path} as the run directory: {err.strerror or err}",
                hint="output_dir must be a directory you can write to.",
            ) from None
        except BaseException:
            run.abandon(None)
            raise
        return run

    def lock(self) -> None:
        """Take the run's advisory lock for this process's life (the kernel drops it when the process
        dies, so a killed run's lock is taken over). Refused while another process holds it; this
        process may lock its own run again (a RunDir it did not unlock)."""
        fd = os.open(self / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        for attempt in range(5):  # `tunesmith runs` probes the lock for an instant
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").split()
                if holder[:2] == [str(os.getpid()), socket.gethostname()]:
                    self._lock = fd
                    return
                if attempt == 4:
                    os.close(fd)
                    who = f"pid {holder[0]}" + (f" on {holder[1]}" if len(holder) > 1 else "") if holder else "?"
                    raise UserError(
                        f"{self.path} is in use by another tunesmith process ({who})",
                        hint="Wait for it to finish, or stop it, before training this run again.",
                    ) from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self._lock = fd

    def unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor releases the flock
            self._lock = None

    def commit(self) -> None:
        """The new run has started training: the run it replaces goes."""
        if self.aside is not None:
            shutil.rmtree(self.aside, ignore_errors=True)
            self.aside = None

    def abandon(self, before: dict | None) -> None:
        """Undo create(): remove a half-made new run and put back the run it was to replace; a resumed
        run gets back the record it had (`before`: its run.json and config.yaml)."""
        if not self.writer:  # the main process owns the directory
            return
        if self.created:
            shutil.rmtree(self.path, ignore_errors=True)
        elif before is not None:
            if before["run"] is None:
                (self / "run.json").unlink(missing_ok=True)
            else:
                self.write_json("run.json", before["run"])
            if before["config"] is not None:
                self.write_text("config.yaml", before["config"])
        if self.aside is not None and not self.path.exists():
            self.aside.rename(self.path)
        self.aside, self.created = None, False
        self.unlock()

    def holder_alive(self) -> bool | None:
        """Whether the process that last took this run's lock still runs: None when nothing says."""
        try:
            fd = os.open(self / ".lock", os.O_RDONLY)
        except OSError:
            fd = None
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return False  # nobody holds it
            except BlockingIOError:
                return True
            finally:
                os.close(fd)
        info = self.read_json("run.json", {}) or {}
        if not isinstance(info.get("pid"), int) or info.get("host") != socket.gethostname():
            return None
        try:
            os.kill(info["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # alive, another user's
        return True

    def status(self) -> str:
        """run.json's status, but "killed" for a run that says it is running while no process trains it."""
        status = str((self.read_json("run.json", {}) or {}).get("status", "-"))
        return "killed" if status == "running" and self.holder_alive() is False else status

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        run = cls(Path(path))
        if not (run.path / "config.yaml").is_file():
            raise UserError(f"{path}: not a tunesmith run directory (no config.yaml)")
        return run

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def config(self) -> Config:
        # The same loader as a config the user wrote: a damaged file is a clear error, not a traceback.
        return load_config(self / "config.yaml")

    def write_config(self, cfg: Config) -> None:
        self.write_text("config.yaml", dump_config(cfg))

    def write_text(self, name: str, text: str) -> None:
        if not self.writer:
            return
        tmp = self / f".{name}.tmp"
        tmp.write_text(redact(text), encoding="utf-8")  # secrets never reach the run directory
        tmp.replace(self / name)

    def write_json(self, name: str, obj) -> None:
        self.write_text(name, json.dumps(_clean(obj), indent=2, ensure_ascii=False) + "\n")

    def read_json(self, name: str, default=None):
        p = self / name
        return json.loads(p.read_text()) if p.exists() else default

    def log(self, record: dict) -> None:
        if not self.writer:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(redact(json.dumps(_clean(record))) + "\n")

    def update_run(self, **fields) -> None:
        info = self.read_json("run.json", {})
        info.update(fields)
        self.write_json("run.json", info)

    def truncate_log(self, step: int, data_step: int) -> None:
        """On resume, drop lines logged after the checkpoint: the resumed run writes them again.
        Skipped-step records carry the data step: they can follow the checkpoint at the same update count."""
        p = self / "metrics.jsonl"
        if p.exists():

            def before(rec: dict) -> bool:
                return rec["data_step"] <= data_step if "data_step" in rec else rec.get("step", 0) <= step

            keep = [ln for ln in p.read_text().splitlines() if ln and before(json.loads(ln))]
            self.write_text("metrics.jsonl", "".join(ln + "\n" for ln in keep))
