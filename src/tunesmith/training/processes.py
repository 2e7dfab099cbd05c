"""The launch's processes: one, or several under `accelerate launch` / `torchrun`, and which engine
accelerate picked for them (DDP, DeepSpeed; FSDP and Megatron-LM are refused)."""

from __future__ import annotations

import os

import torch
from accelerate import PartialState

from tunesmith.errors import UserError
from tunesmith.training import zero


def process_state() -> PartialState:
    """The launch's processes (one, or several under accelerate launch / torchrun). Without a GPU the
    processes are CPU ranks over gloo; accelerate only picks that when told the run is CPU-only."""
    state = PartialState(**device_kwargs())
    engine = engine_name(state)
    if engine in ("FSDP", "MEGATRON_LM"):
        # Checkpoints hold whole tensors (safetensors) and resume needs them; tunesmith gathers them for
        # DeepSpeed, but not (yet) for FSDP, whose shards it would save as one rank's: a wrong resume.
        raise UserError(f"accelerate's {engine} engine is not supported yet: tunesmith runs DDP or DeepSpeed "
                        "ZeRO (stages 1 to 3)", hint="Launch with configs/accelerate/ddp.yaml, zero2.yaml or "
                        "zero3.yaml, or with torchrun.")
    return state


def device_kwargs() -> dict:
    """accelerate only starts DeepSpeed for a non-CPU state, and without a GPU that state has no
    backend: so DeepSpeed on CPU is asked for as non-CPU over gloo, on DeepSpeed's CPU accelerator."""
    if cpu_only() and zero.requested():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        return {"cpu": False, "backend": "gloo"}
    return {"cpu": cpu_only()}


def engine_name(state) -> str:
    return str(state.distributed_type).split(".")[-1]


def cpu_only() -> bool:
    return not (torch.cuda.is_available() or torch.backends.mps.is_available())
