"""Which rows each optimizer step consumes, as a pure function of (seed, step).

A plan computed from the step number alone is what makes resume exact: a resumed run asks for
step k and gets the same rows as the uninterrupted run, without replaying a data loader. The same
shape serves Poisson sampling for DP-SGD (a sampled logical batch split into physical micro-batches)
and sharding across processes (each rank takes its slice of the step's rows).
"""

from __future__ import annotations

import math

import torch


class ShuffledPlan:
    """Reshuffle every epoch; each step takes `batch_size * grad_accum * world_size` rows."""

    def __init__(self, n_rows: int, batch_size: int, grad_accum: int, seed: int, world_size: int = 1, rank: int = 0):
        self.n_rows, self.batch_size, self.grad_accum = n_rows, batch_size, grad_accum
        self.seed, self.world_size, self.rank = seed, world_size, rank
        self.rows_per_step = batch_size * grad_accum * world_size
        self.steps_per_epoch = math.ceil(n_rows / self.rows_per_step)
        # Rows per forward pass. Out-of-memory back-off lowers it; the step's rows stay the same, so
        # the effective batch (and, with a summed loss, the gradient) does not change.
        self.micro_size = batch_size
        self._order: tuple[int, list[int]] | None = None

    def epoch_order(self, epoch: int) -> list[int]:
        if self._order is None or self._order[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(self.n_rows, generator=g).tolist())
        return self._order[1]

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def step_rows(self, step: int) -> list[int]:
        """All rows (every rank) of optimizer step `step` (0-based)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        return self.epoch_order(epoch)[k * self.rows_per_step : (k + 1) * self.rows_per_step]

    def micro_batches(self, step: int) -> list[list[int]]:
        """This rank's micro-batches for `step`; the last step of an epoch may be short."""
        rows = self.step_rows(step)
        per_rank = math.ceil(len(rows) / self.world_size)
        return self.split(rows[self.rank * per_rank : (self.rank + 1) * per_rank])

    def split(self, rows: list[int]) -> list[list[int]]:
        """This rank's rows of a step as micro-batches of `micro_size`."""
        return [rows[i : i + self.micro_size] for i in range(0, len(rows), self.micro_size)]


class LengthGroupedPlan(ShuffledPlan):
    """Rows of similar length in the same micro-batch (less padding), still shuffled every epoch:
    the epoch's random order is cut into windows of 64 steps, each window sorted by length, and the
    window's steps shuffled again so long and short steps interleave. A pure function of (seed,
    epoch) like the plain plan, so resume stays exact."""

    WINDOW_STEPS = 64

    def __init__(
        self, lengths: list[int], batch_size: int, grad_accum: int, seed: int, world_size: int = 1, rank: int = 0
    ):
        super().__init__(len(lengths), batch_size, grad_accum, seed, world_size, rank)
        self.lengths = lengths

    def epoch_order(self, epoch: int) -> list[int]:
        if self._order is not None and self._order[0] == epoch:
            return self._order[1]
        base = super().epoch_order(epoch)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 7_919)
        window, step = self.WINDOW_STEPS * self.rows_per_step, self.rows_per_step
        order: list[int] = []
        for w in range(0, len(base), window):
            chunk = sorted(base[w : w + window], key=lambda i: -self.lengths[i])
            steps = [chunk[k : k + step] for k in range(0, len(chunk), step)]
            full = [s for s in steps if len(s) == step]  # a short step stays last: it ends the epoch
            order += [i for k in torch.randperm(len(full), generator=g).tolist() for i in full[k]]
            order += [i for s in steps if len(s) < step for i in s]
        self._order = (epoch, order)
        return order


class ReplayPlan(ShuffledPlan):
    """Each step's task rows plus `k` rows of a replay pool, so the replayed share of the step's rows is
    `fraction`. Replay rows are indices n_task.. n_task + n_replay - 1 of the training list, drawn
    without replacement from a generator seeded by (seed, step): a pure function of the step."""

    def __init__(
        self,
        n_task: int,
        n_replay: int,
        fraction: float,
        batch_size: int,
        grad_accum: int,
        seed: int,
        world_size: int = 1,
        rank: int = 0,
    ):
        super().__init__(n_task, batch_size, grad_accum, seed, world_size, rank)
        self.n_replay = n_replay
        self.k = min(n_replay, max(1, round(self.rows_per_step * fraction / (1 - fraction))))

    def step_rows(self, step: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + 104_729 + step)
        replay = torch.randperm(self.n_replay, generator=g)[: self.k].tolist()
        return super().step_rows(step) + [self.n_rows + j for j in replay]
