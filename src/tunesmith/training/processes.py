"""The launch's processes: one, or several under `accelerate launch` / `torchrun`, and which engine
accelerate picked for them: DDP, DeepSpeed ZeRO (zero.py) or FSDP2; Megatron-LM is refused.

Sharded engines (ZeRO-3, FSDP) gather parameters in every forward, a collective: every rank must run
as many forwards as the busiest, so training, evaluation and generation pad the short ranks.
"""

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
    if engine == "MEGATRON_LM":
        raise UserError(
            "accelerate's MEGATRON_LM engine is not supported: tunesmith runs DDP, DeepSpeed ZeRO or FSDP",
            hint="Launch with configs/accelerate/ddp.yaml, zero2.yaml, zero3.yaml or fsdp.yaml, or with torchrun.",
        )
    return state


def engage(cfg, accelerator) -> None:
    """Settle the engine before the model is wrapped. accelerate selects FSDP for GPUs only; on CPU ranks
    an FSDP launch is engaged here (torch's FSDP2 runs over gloo). Then refuse what sharding changes."""
    cpu_fsdp(accelerator)
    if not sharded(accelerator):
        return
    problems = []
    if cfg.privacy is not None:
        problems.append(
            "privacy (DP-SGD): per-example clipping needs each example's whole gradient, which the "
            "engine reduces and partitions first"
        )
    if cfg.retention.l2sp:
        problems.append("retention.l2sp: its gradient is added after backward, to whole tensors")
    if cfg.peft.method == "qlora":
        problems.append("peft.method qlora: bitsandbytes' 4-bit weights are not sharded by this engine; use DDP")
    if cfg.train.precision == "fp16":
        problems.append("train.precision fp16: use bf16 (tunesmith's loss scaler works on whole gradients)")
    if fsdp(accelerator) and accelerator.state.fsdp_plugin.fsdp_version != 2:
        problems.append("FSDP version 1: tunesmith runs FSDP2 (fsdp_version: 2)")
    if problems:
        raise UserError(
            f"This config cannot run under {engine_name(accelerator)}",
            problems,
            hint="Launch with configs/accelerate/ddp.yaml instead, or change the settings above.",
        )
    if zero.engaged(accelerator):
        zero.configure(cfg, accelerator)


def cpu_fsdp(accelerator) -> None:
    """An FSDP launch on CPU ranks: accelerate leaves it MULTI_CPU (DDP), so set FSDP on its state, with
    the plugin made from the launch's FSDP_* settings (as accelerate's own tests do). On the process
    state too: every AcceleratorState() copies the engine from it."""
    if (
        cpu_only()
        and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        and engine_name(accelerator) == "MULTI_CPU"
    ):
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
        PartialState().distributed_type = accelerator.state.distributed_type = DistributedType.FSDP


def fsdp(accelerator) -> bool:
    return engine_name(accelerator) == "FSDP"


def sharded(accelerator) -> bool:
    """DeepSpeed or FSDP: gradients (and optimizer state) partitioned across the ranks."""
    return zero.engaged(accelerator) or fsdp(accelerator)


def collective_forward(accelerator) -> bool:
    """Whether every forward gathers parameters (ZeRO-3, FSDP): then all ranks run the same number."""
    return fsdp(accelerator) or zero.gathers_in_forward(accelerator)


def device_kwargs() -> dict:
    """accelerate only starts DeepSpeed for a non-CPU state, and without a GPU that state has no
    backend: so DeepSpeed on CPU is asked for as non-CPU over gloo, on DeepSpeed's CPU accelerator."""
    if cpu_only() and zero.requested():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        return {"cpu": False, "backend": "gloo"}
    return {"cpu": cpu_only()}


def engine_name(state) -> str:
    return str(getattr(state, "distributed_type", "NO")).split(".")[-1]


def cpu_only() -> bool:
    return not (torch.cuda.is_available() or torch.backends.mps.is_available())
