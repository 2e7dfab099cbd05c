"""train.ema_decay: an exponential moving average of the trainable weights, evaluated and saved in place
of the last weights (Polyak averaging).

Why: each update of a small-batch or DP-SGD run carries noise (DP-SGD adds it on purpose), and the last
weights hold the last steps' noise whole; an average over recent updates keeps their common direction and
cancels much of the noise. De et al. 2022 ("Unlocking high-accuracy differentially private image
classification through scale") report gains from it under DP-SGD. It reads only the weights the run
already released to the optimizer, so under DP it is post-processing: no privacy cost.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from tunesmith.errors import UserError


class WeightAverage:
    """average <- decay x average + (1 - decay) x weights after every applied update; it starts at the
    weights training starts from."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.average = {n: p.detach().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for name, p in self.params.items():
            self.average[name].lerp_(p.detach(), 1 - self.decay)

    @contextmanager
    def applied(self):
        """The model holds the average inside the block and its own weights again after it."""
        own = {n: p.detach().clone() for n, p in self.params.items()}
        self.copy_in(self.average)
        try:
            yield
        finally:
            self.copy_in(own)

    @torch.no_grad()
    def copy_in(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, p in self.params.items():
            p.copy_(tensors[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.cpu().clone() for n, t in self.average.items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor] | None) -> None:
        """A checkpoint's average; None (a checkpoint written without train.ema_decay) starts it at the
        weights just restored."""
        if tensors is None:
            tensors = self.params
        if set(tensors) != set(self.params):
            raise UserError("the checkpoint's weight average does not match the model's trainable weights")
        with torch.no_grad():
            for name, t in tensors.items():
                self.average[name].copy_(t.detach())


def average_weights(model: torch.nn.Module, decay: float | None, gathers_in_forward: bool) -> WeightAverage | None:
    if decay is None:
        return None
    if gathers_in_forward:
        raise UserError(
            "train.ema_decay needs whole weights on each process; ZeRO-3 and FSDP shard them",
            hint="Use DDP or ZeRO-1/2, or leave train.ema_decay unset.",
        )
    return WeightAverage(model, decay)
