"""Validation loss and perplexity, token-weighted over the whole split."""

from __future__ import annotations

import math

import torch

from tunesmith.data.collate import collate
from tunesmith.data.tokenize import Tokenized
from tunesmith.training.loss import causal_lm_loss_sum
from tunesmith.training.processes import collective_forward


@torch.no_grad()
def evaluate_loss(
    model,
    rows: list[Tokenized],
    batch_size: int,
    pad_id: int,
    device,
    max_rows: int | None = None,
    loss_fn=causal_lm_loss_sum,
    acc=None,
) -> dict:
    """Token-weighted loss over `rows`. With an accelerator of several processes each rank scores every
    world-th row (of the length-sorted list, so shards cost about the same) and the sums are added up."""
    was_training = model.training
    model.eval()
    rows = rows[:max_rows] if max_rows else rows
    # Sorting by length keeps padding (wasted compute) small; the token-weighted mean is order-free.
    rows = sorted(rows, key=lambda r: len(r.input_ids))
    n_rows, every = len(rows), rows
    if acc is not None and acc.num_processes > 1:
        rows = rows[acc.process_index :: acc.num_processes]
    batches = math.ceil(len(rows) / batch_size)
    if acc is not None and collective_forward(acc):
        # Under ZeRO-3/FSDP a forward is a collective: every rank runs as many as the busiest, the extra ones unscored.
        batches = math.ceil(math.ceil(n_rows / acc.num_processes) / batch_size)
    total, tokens = 0.0, 0
    for i in range(0, batches * batch_size, batch_size):
        part = rows[i : i + batch_size]
        batch = {k: v.to(device) for k, v in collate(part or every[:1], pad_id).items()}
        loss_sum, n = loss_fn(model, batch)
        if part:
            total += float(loss_sum)
            tokens += n
    if acc is not None and acc.num_processes > 1:
        summed = acc.reduce(torch.tensor([total, float(tokens)], dtype=torch.float64, device=acc.device), "sum")
        total, tokens = float(summed[0]), int(summed[1])
    model.train(was_training)
    loss = total / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens, "rows": n_rows}
