"""Poisson sampling for DP-SGD, as a pure function of (seed, step) like every other batch plan.

The accountant's guarantee assumes each privacy unit joins each step independently with probability q,
so the logical batch size varies from step to step (and may be zero: that step is still taken, with
noise only). A fixed-size shuffled batch under a Poisson accountant is the shortcut Opacus #80 warns
about. With user-level privacy a sampled user contributes one of their rows, chosen at random, so a
user's total influence on a step is one clipped gradient, whatever the number of rows they wrote.
"""

from __future__ import annotations

import math

import torch

from tunesmith.errors import UserError
from tunesmith.training.plan import ShuffledPlan

SALT = 2_654_435_761  # keeps the sampling stream apart from the shuffling and replay streams


class PoissonPlan:
    """Rows of step k: each unit (row, or user) independently with probability `sample_rate`. Under
    several processes each rank trains on its share of the same sample."""

    def __init__(
        self,
        units: list[list[int]],
        expected_batch: int,
        micro_size: int,
        seed: int,
        world_size: int = 1,
        rank: int = 0,
        lengths: list[int] | None = None,
    ):
        self.units = units  # unit -> its train row indices ([[0], [1], ...] for sample-level privacy)
        self.n_units = len(units)
        if expected_batch > self.n_units:  # rows were checked before loading; users can be fewer
            raise UserError(
                f"A DP-SGD step of {expected_batch:,} expected units is larger than the {self.n_units} "
                "privacy units (users)",
                hint="Set privacy.expected_batch_size below the number of users.",
            )
        self.sample_rate = min(1.0, expected_batch / self.n_units)
        self.seed = seed
        self.rows_per_step = expected_batch  # the expected logical batch: used in messages only
        self.steps_per_epoch = max(1, math.ceil(1 / self.sample_rate))
        self.micro_size = micro_size
        self.world_size, self.rank = world_size, rank
        self.lengths = lengths  # tokens per train row: a step's micro-batches group rows of similar length

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def step_rows(self, step: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + SALT + step)
        chosen = (torch.rand(self.n_units, generator=g) < self.sample_rate).nonzero().flatten().tolist()
        picks = torch.rand(len(chosen), generator=g).tolist()  # which row of each sampled user
        return [self.units[u][int(r * len(self.units[u]))] for u, r in zip(chosen, picks)]

    def micro_batches(self, step: int) -> list[list[int]]:
        """This rank's share of the step's sample (every world-th row): every rank draws the same sample,
        so the launch as a whole takes each sampled row exactly once. With lengths, the sample is sorted
        longest first before it is dealt out: each micro-batch pads to rows of about its own length (random
        micro-batches of short sentences padded to about twice their mean), and a step's clipped sum, so
        its update, does not depend on which micro-batch a row is in."""
        rows = self.step_rows(step)
        if self.lengths is not None:
            rows = sorted(rows, key=lambda i: -self.lengths[i])
        return self.split(rows[self.rank :: self.world_size])

    # Physical micro-batches only bound memory: q, and so epsilon, never depend on them.
    split = ShuffledPlan.split


def units_of(users: list[str] | None, n_rows: int) -> list[list[int]]:
    """Group train row indices by privacy unit: one row each, or all rows of one user together."""
    if users is None:
        return [[i] for i in range(n_rows)]
    groups: dict[str, list[int]] = {}
    for i, u in enumerate(users):
        groups.setdefault(u, []).append(i)
    return list(groups.values())
