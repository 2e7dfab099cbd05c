"""Padding-free sequence packing: several tokenized rows share one sequence of up to max_length.

Each row keeps its own position ids (0, 1, ...) and attends only to itself: the batch carries a
4-D boolean block-diagonal causal mask (True = may attend). Reset position ids alone are not enough:
under sdpa and eager on CPU the rows then still attend across their boundaries. Under sdpa the
4-D boolean mask isolates them; eager misreads boolean masks, so packing needs sdpa.

The loss of a packed batch equals the loss of the same rows unpacked: a row's first token is never
a target (nothing before it in the row predicts it), so its label is set to IGNORE in the pack and
the last token of the previous row predicts nothing across the boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tunesmith.data.tokenize import IGNORE, Tokenized


@dataclass
class Packed:
    id: str  # member ids joined with '+': the ids logged for skipped or spiking steps
    where: str
    input_ids: list[int]
    labels: list[int]
    lengths: list[int]  # each member's length, in order

    @property
    def n_trainable(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def pack(rows: list[Tokenized], max_length: int) -> list[Packed]:
    """First-fit decreasing: the longest rows first, each into the first pack with room. Deterministic
    (ties keep input order), so a resumed run rebuilds the same packs."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].input_ids))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(rows[i].input_ids)
        # Packs are few relative to rows (each holds several), so a linear scan is cheap enough.
        slot = next((b for b, free in enumerate(room) if free >= n), None)
        if slot is None:
            bins.append([i])
            room.append(max_length - n)
        else:
            bins[slot].append(i)
            room[slot] -= n
    packs = []
    for members in bins:
        members.sort()  # input order inside a pack: stable and easy to read in logs
        ids, labels, lengths = [], [], []
        for i in members:
            r = rows[i]
            ids += r.input_ids
            labels += [IGNORE] + r.labels[1:]
            lengths.append(len(r.input_ids))
        packs.append(Packed("+".join(rows[i].id for i in members), rows[members[0]].where, ids, labels, lengths))
    return packs


def collate_packed(packs: list[Packed], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(p.input_ids) for p in packs)
    n = len(packs)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long)
    segment = torch.full((n, width), -1, dtype=torch.long)  # which member each position belongs to
    for b, p in enumerate(packs):
        ids[b, : len(p.input_ids)] = torch.tensor(p.input_ids)
        labels[b, : len(p.labels)] = torch.tensor(p.labels)
        start = 0
        for k, length in enumerate(p.lengths):
            positions[b, start : start + length] = torch.arange(length)
            segment[b, start : start + length] = k
            start += length
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = segment[:, :, None] == segment[:, None, :]
    real = segment >= 0
    mask = same & causal & real[:, :, None]
    # Padding positions attend to themselves only: a query row with nothing to attend to would give
    # NaN under sdpa, and NaN values poison real queries through the masked-out products.
    mask |= torch.eye(width, dtype=torch.bool) & ~real[:, :, None]
    return {
        "input_ids": ids,
        "attention_mask": mask[:, None],
        "position_ids": positions,
        "labels": labels,
        "n_tokens": real.sum(),
    }
