"""Shared helpers for the reliability tests (RELIABILITY.md sections 1, 2 and 5).

- `rel_config`: the tiny-Llama run used throughout (64 rows, LoRA r=4 with dropout, cosine warmup).
- `cli`: the real CLI in a fresh process (tests/_cli.py `run_cli`) with `ENV`, either plain
  (`python -m tunesmith`) or through `RUNNER`, a small `python -c` program that installs one fault
  (SIGKILL at a chosen point, NaN at chosen data steps) or records the row ids each micro-batch consumes,
  then calls `tunesmith.cli.main()`. Faults are installed from outside by wrapping tunesmith functions;
  src/ has no test hooks. In-process runs use tests/_cli.py `invoke_cli`.
- readers for metrics.jsonl, adapters and checkpoints.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from _cli import run_cli
from safetensors.torch import load_file

from tunesmith.recipes import building
from tunesmith.training.plan import ShuffledPlan

HERE = Path(__file__).resolve().parent
# tests/conftest.py by path: `import conftest` could resolve to another conftest.py on sys.path.
_spec = importlib.util.spec_from_file_location("_tunesmith_tests_conftest", HERE.parent / "conftest.py")
fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixtures)
write_config, write_jsonl, instruction_rows = fixtures.write_config, fixtures.write_jsonl, fixtures.instruction_rows


class _Env(Mapping):
    """The environment for CLI subprocesses: os.environ as it is when a child starts (so the test's own
    TUNESMITH_HOME, set by tests/conftest.py after this module was imported), plus quiet, one-thread settings."""

    FIXED = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "COLUMNS": "500"}

    def _now(self) -> dict:
        return {**os.environ, **self.FIXED}

    def __getitem__(self, key: str) -> str:
        return self._now()[key]

    def __iter__(self):
        return iter(self._now())

    def __len__(self) -> int:
        return len(self._now())


ENV = _Env()

# Runs `tunesmith <argv>` after installing the fault described by the JSON in $TS_FAULT:
#   record_rows: path      append {"ids": [...]} per micro-batch collated for training
#   kill_after_step: N     SIGKILL right after the metrics line of optimizer update N is written
#   kill_on_collate: N     SIGKILL when the N-th training micro-batch is about to be collated
#   nan_data_steps: [..]   the model's final norm outputs NaN (training forward only) at these
#                          1-based data steps (`data_step` in metrics.jsonl)
#   nan_from: k            the same for every data step >= k
#   skip_rng_restore: true a resume does not restore the random streams (a control that must fail R1)
#   kill_before_part: N    SIGKILL when this rank is about to write its part of the N-th checkpoint
#   kill_before_optimizer_part: N   the same, just before its optimizer shard (ZeRO, FSDP), after its RNG part
#   rank: R                under torchrun, the kill faults above hit rank R only
RUNNER = r"""
import json, os, signal, sys
fault = json.loads(os.environ.get("TS_FAULT") or "{}")
import torch
from tunesmith import cli
from tunesmith.recipes import building
from tunesmith.rundir import RunDir
from tunesmith.training.plan import ShuffledPlan

current = {"data_step": 0, "collated": 0, "parts": 0}
RANK = int(os.environ.get("RANK", "0"))  # under torchrun; faults with "rank" hit only that process
mine = fault.get("rank", RANK) == RANK
real_micro_batches = ShuffledPlan.micro_batches
def micro_batches(self, step):
    current["data_step"] = step + 1  # fit() asks for the 0-based step, then logs step + 1
    return real_micro_batches(self, step)
ShuffledPlan.micro_batches = micro_batches

def poisoned(data_step):
    return data_step in fault.get("nan_data_steps", ()) or ("nan_from" in fault and data_step >= fault["nan_from"])

real_build = building.build
def build(*args, **fns):
    collate = fns["collate"]
    def recording_collate(rows):
        current["collated"] += 1
        if current["collated"] == fault.get("kill_on_collate") and mine:
            os.kill(os.getpid(), signal.SIGKILL)
        if "record_rows" in fault:
            with open(fault["record_rows"], "a") as f:
                line = {"data_step": current["data_step"], "rank": RANK, "ids": [r.id for r in rows]}
                f.write(json.dumps(line) + "\n")
        return collate(rows)
    fns["collate"] = recording_collate
    s = real_build(*args, **fns)
    if "nan_data_steps" in fault or "nan_from" in fault:
        norm = s.accelerator.unwrap_model(s.model).get_base_model().model.norm
        norm.register_forward_hook(
            lambda mod, inputs, out: out * float("nan") if mod.training and poisoned(current["data_step"]) else None)
    return s
building.build = build

real_log = RunDir.log
def log(self, record):
    real_log(self, record)
    if "loss" in record and record.get("step") == fault.get("kill_after_step") and mine:
        os.kill(os.getpid(), signal.SIGKILL)
RunDir.log = log

if "kill_before_part" in fault or "kill_before_optimizer_part" in fault:
    from tunesmith.training import checkpoint
    real_part = checkpoint.write_part
    key, prefix = (("kill_before_part", "rng-rank") if "kill_before_part" in fault
                   else ("kill_before_optimizer_part", "optimizer-rank"))
    def write_part(staging, tensors, meta=None):
        if any(name.startswith(prefix) for name in tensors):
            current["parts"] += 1
            if current["parts"] == fault[key] and mine:
                os.kill(os.getpid(), signal.SIGKILL)
        return real_part(staging, tensors, meta)
    checkpoint.write_part = write_part

if fault.get("skip_rng_restore"):
    from tunesmith.training import checkpoint
    checkpoint.set_rng_state = lambda meta, tensors: None

sys.argv = ["tunesmith", *sys.argv[1:]]
cli.main()
"""


def cli(*args, fault: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`tunesmith <args>` in a fresh process; with `fault`, through RUNNER."""
    if fault is None:
        return run_cli(*args, env=ENV, timeout=timeout)
    return run_cli(*args, program=("-c", RUNNER), env={**ENV, "TS_FAULT": json.dumps(fault)}, timeout=timeout)


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _state(s) -> dict:
    """Everything a skipped step must leave untouched, hashed; plus finiteness and the raw weights."""
    model = s.accelerator.unwrap_model(s.model)
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = s.optim.optimizer.state_dict()
    opt_tensors = [v for st in opt["state"].values() for v in st.values() if torch.is_tensor(v)]
    return {
        "params": {n: _digest(p) for n, p in params.items()},
        "optimizer": {
            f"{pid}.{k}": _digest(v) if torch.is_tensor(v) else v
            for pid, st in opt["state"].items()
            for k, v in st.items()
        },
        "lr": [g["lr"] for g in s.optim.optimizer.param_groups],
        "scheduler": s.optim.scheduler.last_epoch,
        "finite": all(bool(torch.isfinite(t).all()) for t in list(params.values()) + opt_tensors),
        "weights": params,
    }


class Probe:
    """Installs faults in an in-process run and records the training state at every data step."""

    def __init__(self, monkeypatch, nan_at=(), scale_loss_at=None, sgd=False, factor=1e6):
        self.s = None
        self.data_step = 0
        self.micro = 0
        self.before: dict[int, dict] = {}  # 1-based data step -> state before it ran
        self.nan_at, self.scale_loss_at = set(nan_at), scale_loss_at
        real_build, real_micro_batches = building.build, ShuffledPlan.micro_batches
        probe = self

        def micro_batches(plan, step):
            probe.data_step, probe.micro = step + 1, 0
            if probe.s is not None:
                probe.before[step + 1] = _state(probe.s)
            return real_micro_batches(plan, step)

        def build(*args, **fns):
            loss_sum = fns["loss_sum"]

            def scaled_loss(model, batch):
                loss, n = loss_sum(model, batch)
                probe.micro += 1
                at = probe.scale_loss_at
                hit = probe.data_step in at if isinstance(at, (set, list, tuple)) else probe.data_step == at
                if hit and probe.micro == 1 and model.training:
                    loss = loss * factor  # one micro-batch's loss explodes
                return loss, n

            fns["loss_sum"] = scaled_loss
            s = real_build(*args, **fns)
            norm = s.accelerator.unwrap_model(s.model).get_base_model().model.norm
            norm.register_forward_hook(
                lambda mod, i, out: out * float("nan") if mod.training and probe.data_step in probe.nan_at else None
            )
            probe.s = s
            return s

        monkeypatch.setattr(ShuffledPlan, "micro_batches", micro_batches)
        monkeypatch.setattr(building, "build", build)
        if sgd:
            monkeypatch.setattr(
                building,
                "build_optimizer",
                lambda model, t: torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=t.lr),
            )


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Accelerate keeps one process-wide state; a bf16 or fp16 run after an fp32 one needs it reset.
    Autouse in every test module that imports it."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def rel_config(tmp_path: Path, model: Path, n_rows: int = 64, **train) -> dict:
    """The R1 run: 64 rows, LoRA r=4 with dropout 0.1, batch 4 x GA 2, cosine with warmup, seed 0."""
    train_file = write_jsonl(tmp_path / "data" / "train.jsonl", instruction_rows(n_rows))
    val_file = write_jsonl(tmp_path / "data" / "val.jsonl", instruction_rows(12, seed=1))
    return {
        "name": "rel",
        "output_dir": str(tmp_path / "runs"),
        "seed": 0,
        "model": {"name": str(model)},
        "peft": {"method": "lora", "r": 4, "dropout": 0.1},
        "data": {
            "train": str(train_file),
            "validation": str(val_file),
            "format": "instruction",
            "max_length": 128,
            "overlength": "drop",
        },
        "train": {
            "lr": 1e-2,
            "batch_size": 4,
            "grad_accum": 2,
            "warmup_steps": 3,
            "schedule": "cosine",
            "max_steps": 24,
            **train,
        },
        # Keep the final evaluation cheap: these tests are about training state, not metrics.
        "eval": {
            "batch_size": 8,
            "max_new_tokens": 2,
            "samples": 0,
            "before_after": False,
            "generate_rows": 2,
            "max_rows": 4,
        },
    }


def records(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def step_lines(run_dir: Path) -> list[dict]:
    """Metrics lines of optimizer updates, in file order."""
    return [r for r in records(run_dir) if "loss" in r]


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / "adapter" / "adapter_model.safetensors"))


def assert_tensors_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    unequal = [n for n in a if not torch.equal(a[n], b[n])]
    assert not unequal, f"{len(unequal)} of {len(a)} tensors differ, e.g. {unequal[:3]}"


def checkpoint_steps(run_dir: Path) -> list[int]:
    root = Path(run_dir) / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in root.glob("step-*")) if root.is_dir() else []


def leftovers(run_dir: Path) -> list[str]:
    root = Path(run_dir) / "checkpoints"
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".")) if root.is_dir() else []


def row_log(path: Path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines()] if Path(path).exists() else []


def says(text: str, phrase: str) -> bool:
    """`phrase` occurs in console output, ignoring whitespace (rich wraps long lines at the terminal width)."""
    return "".join(phrase.split()) in "".join(text.split())


def killed(res: subprocess.CompletedProcess) -> bool:
    return res.returncode == -9
