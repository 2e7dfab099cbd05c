"""Token-level causal LM loss.

The loss is returned as a *sum* with its token count, never as a mean: the caller divides by the
number of target tokens in the whole optimizer step (all micro-batches, all ranks). Averaging each
micro-batch and then averaging the averages (the 2024 gradient-accumulation bug) weights short
micro-batches too heavily.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunesmith.data.tokenize import IGNORE


def causal_lm_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    logits = out.logits[:, :-1, :].float()
    targets = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return loss, int((targets != IGNORE).sum())
