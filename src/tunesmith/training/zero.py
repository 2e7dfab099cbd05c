"""DeepSpeed ZeRO (stages 1, 2 and 3) under tunesmith's own loop, through accelerate.

accelerate's DeepSpeed wrapper steps inside `backward()`; tunesmith must see the step's loss before
deciding to apply it (non-finite and spike skips), so the loop drives the engine itself: it marks the
last micro-batch as the accumulation boundary, calls `engine.step()` only for a step it keeps, and
discards the reduced gradients of one it skips. ZeRO-2 partitions gradients and optimizer state; ZeRO-3
partitions the parameters too, and gathers them in every forward (a collective): so under ZeRO-3 every
rank runs as many forwards as the busiest (training, evaluation and generation pad the short ranks),
and whole tensors are gathered for checkpoints and the saved adapter.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager, nullcontext

import torch

from tunesmith.errors import UserError


def _import_only_when_used() -> None:
    """accelerate's unwrap_model imports DeepSpeed whenever it is installed, only to isinstance-check for its
    engine, and that import prints "Setting accelerator to CPU" on every run. A model can only be a
    DeepSpeedEngine once deepspeed is imported (accelerate imports it to engage ZeRO), so "already imported"
    gives the same answer without the import."""
    from accelerate.utils import other

    if getattr(other, "is_deepspeed_available", None) is not None:
        other.is_deepspeed_available = lambda: "deepspeed" in sys.modules


_import_only_when_used()  # at import: models.py and processes.py import this module before any model is saved


def requested() -> bool:
    """Whether `accelerate launch` (a DeepSpeed config) asked for DeepSpeed, before any state exists."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def engaged(accelerator) -> bool:
    return str(accelerator.distributed_type).endswith("DEEPSPEED")


def configure(cfg, accelerator) -> None:
    """Fill the batch fields accelerate leaves 'auto' from the config (processes.engage refuses the
    settings no sharded engine can honour first)."""
    plugin = accelerator.state.deepspeed_plugin
    stage = plugin.zero_stage
    if stage not in (1, 2, 3):
        raise UserError(f"DeepSpeed ZeRO stage {stage}: tunesmith runs stages 1, 2 and 3")
    ds = plugin.deepspeed_config
    t = cfg.train
    ds["train_micro_batch_size_per_gpu"] = t.batch_size
    ds["gradient_accumulation_steps"] = t.grad_accum
    ds["train_batch_size"] = t.batch_size * t.grad_accum * accelerator.num_processes
    # The pre-clip norm is what tunesmith logs; 0 turns DeepSpeed's clipping off.
    ds["gradient_clipping"] = float(t.max_grad_norm or 0.0)
    ds["zero_allow_untested_optimizer"] = True  # tunesmith's torch AdamW is the client optimizer
    if stage == 3:  # the adapter or model is saved whole, gathered from every rank's partition
        ds.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True


def gathers_in_forward(accelerator) -> bool:
    """ZeRO-3: every forward is a collective, so all ranks must run the same number of them."""
    if not str(getattr(accelerator, "distributed_type", "")).endswith("DEEPSPEED"):
        return False
    return accelerator.state.deepspeed_plugin.zero_stage == 3


def gathered(engine, params: list, modify: bool = False):
    """Whole tensors of ZeRO-3-partitioned `params` inside the block (a collective: every rank enters);
    with `modify`, what the block writes is partitioned again on the way out. Elsewhere a no-op."""
    if engine is None or engine.zero_optimization_stage() != 3:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)


def backward(engine, loss: torch.Tensor, boundary: bool) -> None:
    """One micro-batch's backward. The loss is already scaled by the loop (summed over the step's
    targets), so the engine must not divide it by its accumulation count again."""
    engine.set_gradient_accumulation_boundary(boundary)
    engine.backward(loss, scale_wrt_gas=False)


def step(engine) -> float:
    """Clip (DeepSpeed's gradient_clipping) and update. Returns the pre-clip norm; inf when DeepSpeed
    found a non-finite gradient and skipped the update itself."""
    engine.step()
    norm = engine.get_global_grad_norm()
    return float("inf") if norm is None else float(norm)


def discard(engine) -> None:
    """Drop a reduced step that tunesmith decided not to apply, with the resets DeepSpeed's own step
    makes for an overflowed one, so the next step starts from zero gradients and an unchanged
    optimizer. In the configurations the tests run, ZeRO would also have overwritten these buffers
    in the next step; this does not rely on that."""
    opt = engine.optimizer
    if engine.zero_optimization_stage() == 3:
        opt._overflow_clean_up(opt.loss_scale)
        return
    from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID

    opt.micro_step_id = INITIAL_MICRO_STEP_ID
    opt.zero_grad(set_to_none=True)
    if hasattr(opt, "_release_preflattened_grad_buffers"):
        opt._release_preflattened_grad_buffers()
    for buffers in (getattr(opt, "averaged_gradients", {}), getattr(opt, "all_grad_tensors", {})):
        for key in list(buffers):
            buffers[key] = None


@contextmanager
def base_optimizer(engine):
    """The torch optimizer over this rank's fp32 partition: what a checkpoint saves per rank. ZeRO-3
    lists its partitions in the optimizer's param groups only around a step (and its own saves)."""
    opt = engine.optimizer
    stage3 = engine.zero_optimization_stage() == 3
    if stage3:
        opt._set_fp32_optimizer_param_groups()
    try:
        yield opt.optimizer
    finally:
        if stage3:
            opt._clear_fp32_optimizer_param_groups()


def weights_changed(engine) -> None:
    """After tunesmith wrote parameters (resume, rollback, best weights), the fp32 master partition the
    optimizer updates must follow, or the next step would undo the write."""
    engine.optimizer.refresh_fp32_params()
