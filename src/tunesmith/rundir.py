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
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import yaml

from tunesmith.config import Config, config_from_dict, dump_config
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

    @classmethod
    def create(cls, cfg: Config, resume: bool, overwrite: bool) -> RunDir:
        run = cls(cfg.run_dir)
        exists = run.path.exists() and any(run.path.iterdir())
        if resume:
            if not exists:
                raise UserError(f"--resume: no run at {run.path}")
        elif exists:
            if not overwrite:
                raise UserError(f"Run directory {run.path} already exists",
                                hint="Use --resume to continue it, --overwrite to replace it, or set name=...")
            shutil.rmtree(run.path)
        run.path.mkdir(parents=True, exist_ok=True)
        return run

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        run = cls(Path(path))
        if not (run.path / "config.yaml").is_file():
            raise UserError(f"{path}: not a tunesmith run directory (no config.yaml)")
        return run

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def config(self) -> Config:
        return config_from_dict(yaml.safe_load((self / "config.yaml").read_text()), str(self / "config.yaml"))

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
