"""One object per way of taking an optimizer step, each with the same methods: the loop calls them and never
asks which one it has. `choose()` picks one when a run is built.

Plain      accelerate (one process, DDP, FSDP2): its backward and clipping, Precision's fp16 loss scaling, L2-SP
Private    DP-SGD (privacy/dp.py): each example clipped after its micro-batch, noise added once per step
DeepSpeed  DeepSpeed ZeRO (zero.py): the engine's backward, and its own clipping and update

Per step the loop runs `micro_batch(last)` around each micro-batch's forward and `backward()`, then
`prepare_grads()` (unscale -> DP noise -> L2-SP -> clip: the pre-clip norm), its finiteness and spike checks,
then `step()` or `discard()`, then zero_grad. An out-of-memory retry calls `reset()` first. L2-SP is Plain's
alone: DP-SGD and the sharded engines refuse it (config.py, processes.engage), as they refuse fp16.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Protocol

import torch

from tunesmith.training import processes, zero
from tunesmith.training.precision import Precision


class Stepper(Protocol):
    """What the loop calls, in this order per step; every way of stepping answers all of it."""

    takes_empty_steps: bool  # whether a step with no targets is still taken (DP-SGD: a noise-only step)

    def forwards(self, n: int) -> int: ...  # micro-batches this rank runs for its n (padding short ranks)
    def micro_batch(self, last: bool) -> AbstractContextManager: ...  # around one forward and backward
    def backward(self, loss: torch.Tensor, weight: float, n_targets: int, last: bool) -> None: ...
    def prepare_grads(self, step: int) -> torch.Tensor: ...  # the pre-clip norm
    def step(self, grad_norm: torch.Tensor) -> torch.Tensor | None: ...  # the norm to log; None: not applied
    def discard(self) -> None: ...  # a step not applied
    def reset(self) -> None: ...  # a half-accumulated step dropped (out-of-memory retry)
    def budget_spent(self, updates: int) -> str | None: ...  # why no further step may be taken
    def epsilon(self) -> float | None: ...  # privacy spent so far, where it is accounted


class Plain:
    """accelerate's step (one process, DDP or FSDP2), with Precision's fp16 scaler and L2-SP."""

    takes_empty_steps = False  # a step without targets (its rows excluded after spikes) makes no update

    def __init__(
        self, accelerator, model, optimizer, precision: Precision, max_grad_norm: float | None, l2sp: float = 0.0
    ):
        self.acc, self.model, self.optimizer, self.precision = accelerator, model, optimizer, precision
        self.max_grad_norm = max_grad_norm or float("inf")
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.l2sp = l2sp
        # L2-SP pulls toward the pretrained values: keep them (a copy of the trainables)
        self.anchors = [p.detach().clone() for p in self.trainable] if l2sp else []
        # ZeRO and FSDP reduce gradients in every backward (a collective): every rank runs as many as the busiest
        self.collective = processes.sharded(accelerator) and accelerator.num_processes > 1

    def forwards(self, n: int) -> int:
        """How many micro-batches this rank runs for its `n`: short ranks pad with zero-weight passes. DDP
        needs at least one (its all-reduce is in the last backward); ZeRO and FSDP need the busiest rank's."""
        most = max(n, 1)
        if self.collective:
            most = int(self.acc.gather(torch.tensor([most], device=self.acc.device)).max())
        return most

    def micro_batch(self, last: bool) -> AbstractContextManager:
        """Around one micro-batch's forward and backward: DDP reduces gradients in the last one only."""
        return nullcontext() if last else self.acc.no_sync(self.model)

    def loss_weight(self, weight: float, n_targets: int) -> float:
        # DDP averages gradients over ranks, so scale the sum back up by the world size.
        return weight * self.acc.num_processes / max(n_targets, 1)

    def backward(self, loss: torch.Tensor, weight: float, n_targets: int, last: bool) -> None:
        """`loss` is the micro-batch's summed loss: normalised here by the targets of the whole step."""
        self.acc.backward(self.precision.scale(loss * self.loss_weight(weight, n_targets)))

    def prepare_grads(self, step: int) -> torch.Tensor:
        """The step's gradient as the update will use it; returns its norm before clipping."""
        self.precision.unscale(self.optimizer)  # clipping and the finiteness check see true gradients
        with torch.no_grad():  # L2-SP: the penalty's gradient, l2sp * (w - w0), once per step
            for p, p0 in zip(self.trainable, self.anchors):
                if p.grad is not None:
                    p.grad.add_(p - p0, alpha=self.l2sp)
        return self.acc.clip_grad_norm_(self.trainable, self.max_grad_norm)

    def step(self, grad_norm: torch.Tensor) -> torch.Tensor | None:
        """Apply the update. Returns the norm to log, or None when the update was not applied."""
        self.precision.step(self.optimizer)
        return grad_norm

    def discard(self) -> None:
        """A step the loop decided not to apply (non-finite or a spike)."""
        self.precision.skipped()  # after an fp16 overflow this halves the scale

    def reset(self) -> None:
        """Drop a half-accumulated step: it starts over after an out-of-memory back-off."""
        self.optimizer.zero_grad(set_to_none=True)

    def budget_spent(self, updates: int) -> str | None:
        """Why no further step may be taken (DP-SGD's privacy budget), else None."""
        return None

    def epsilon(self) -> float | None:
        """The privacy spent so far, for a stepper that accounts for it."""
        return None


class Private(Plain):
    """DP-SGD. No step-wide normalisation before clipping (each example's own gradient is clipped), no
    DDP wrapper (Poisson shards differ per rank; DPSGD sums the clipped gradients itself)."""

    takes_empty_steps = True  # Poisson sampling may draw no rows: still a noise step and an accountant step

    def __init__(self, accelerator, model, optimizer, precision: Precision, dp, target_epsilon: float | None):
        super().__init__(accelerator, model, optimizer, precision, None)
        self.dp, self.target_epsilon = dp, target_epsilon

    def forwards(self, n: int) -> int:
        return n  # no collective in the backward: a rank without rows runs none

    def loss_weight(self, weight: float, n_targets: int) -> float:
        return 1.0

    def backward(self, loss: torch.Tensor, weight: float, n_targets: int, last: bool) -> None:
        """`loss`: the micro-batch's summed per-example losses; under ghost clipping, the per-example losses."""
        if self.dp.ghost:
            self.dp.ghost_backward(loss)  # two passes: per-example norms, then the clipped sum
        else:
            super().backward(loss, weight, n_targets, last)
        self.dp.accumulate()  # clip each example's gradient and add it to the step's sum

    def prepare_grads(self, step: int) -> torch.Tensor:
        self.precision.unscale(self.optimizer)
        self.dp.privatize(step)  # noise once, account once
        # The clipping was per example: the noisy mean is measured, not clipped again.
        return self.acc.clip_grad_norm_(self.trainable, float("inf"))

    def reset(self) -> None:
        super().reset()
        self.dp.reset()  # the clipped sums of the dropped micro-batches too

    def budget_spent(self, updates: int) -> str | None:
        if not self.dp.budget_exhausted():
            return None
        return (
            f"Privacy budget: one more step would exceed epsilon {self.target_epsilon}; "
            f"stopping at step {updates} (epsilon {self.dp.epsilon():.3f})"
        )

    def epsilon(self) -> float | None:
        return self.dp.epsilon()


class DeepSpeed(Plain):
    """The engine clips as it steps and reports the norm then; it skips a non-finite update itself. Its
    bf16 is its own (fp16 is refused under sharded engines), so Precision's scaler is not involved."""

    def __init__(self, accelerator, model, optimizer, precision: Precision):
        super().__init__(accelerator, model, optimizer, precision, None)
        self.engine = model

    def micro_batch(self, last: bool) -> AbstractContextManager:
        return nullcontext()  # the engine reduces at the boundary backward() marks

    def backward(self, loss: torch.Tensor, weight: float, n_targets: int, last: bool) -> None:
        zero.backward(self.engine, loss * self.loss_weight(weight, n_targets), boundary=last)

    def prepare_grads(self, step: int) -> torch.Tensor:
        return torch.tensor(0.0)  # measured by the engine in step()

    def step(self, grad_norm: torch.Tensor) -> torch.Tensor | None:
        norm = torch.tensor(zero.step(self.engine))
        return norm if bool(torch.isfinite(norm)) else None

    def discard(self) -> None:
        zero.discard(self.engine)

    def reset(self) -> None:
        super().reset()
        zero.discard(self.engine)


def choose(accelerator, model, optimizer, precision: Precision, cfg, dp=None) -> Stepper:
    """The stepper for this run: DP-SGD when `privacy:` is set, DeepSpeed when accelerate engaged it, else plain."""
    if dp is not None:
        return Private(accelerator, model, optimizer, precision, dp, cfg.privacy.target_epsilon)
    if zero.engaged(accelerator):
        return DeepSpeed(accelerator, model, optimizer, precision)
    return Plain(accelerator, model, optimizer, precision, cfg.train.max_grad_norm, cfg.retention.l2sp)
