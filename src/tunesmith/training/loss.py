"""Token-level causal LM loss.

The loss is returned as a *sum* with its token count, never as a mean: the caller divides by the
number of target tokens in the whole optimizer step (all micro-batches, all ranks). Averaging each
micro-batch and then averaging the averages (the 2024 gradient-accumulation bug) weights short
micro-batches too heavily.

The chunked version never builds the full [batch, length, vocabulary] logits: it projects only the
positions that have a target (completion tokens), a chunk at a time, and recomputes each chunk's
logits in the backward pass instead of keeping them. With SmolLM2's 49,152-token vocabulary the full
logits of one 8x512 batch are 800 MB in fp32, plus as much again for the backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tunesmith.data.tokenize import IGNORE

CHUNK = 256  # target positions per lm_head chunk: ~50 MB of fp32 logits at a 49k vocabulary


def causal_lm_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch.get("position_ids"),
        use_cache=False,
    )
    logits = out.logits[:, :-1, :].float()
    targets = batch["labels"][:, 1:]
    loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return loss, int((targets != IGNORE).sum())


def _chunk_loss(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # fp32 LoRA outputs promote the hidden stream to fp32 when the frozen weights are bf16.
    return F.cross_entropy(head(hidden.to(head.weight.dtype)).float(), targets, reduction="sum")


def chunked_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    # logits_to_keep=1: the model computes one position's logits, not all of them.
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        use_cache=False,
        position_ids=batch.get("position_ids"),
        output_hidden_states=True,
        logits_to_keep=1,
    )
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    hidden = out.hidden_states[-1][:, :-1][keep]
    targets = targets[keep]
    # Under DDP the forward above goes through the wrapper (gradient sync); the head is the inner one.
    head = getattr(model, "module", model).get_output_embeddings()
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, len(targets), CHUNK):
        total = total + checkpoint(
            _chunk_loss, head, hidden[i : i + CHUNK], targets[i : i + CHUNK], use_reentrant=False
        )
    return total, int(len(targets))


@torch.no_grad()
def choose_loss(model, batch: dict[str, torch.Tensor], chunked: bool):
    """The chunked loss assumes the last hidden state times the output embedding gives the logits.
    True for Llama-style models; checked here once on a real batch, else the plain loss is used."""
    if not chunked:
        return causal_lm_loss_sum
    try:
        head = model.get_output_embeddings()
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            use_cache=False,
            output_hidden_states=True,
        )
        same = head is not None and torch.allclose(
            head(out.hidden_states[-1]).float(), out.logits.float(), atol=1e-4, rtol=1e-4
        )
    except (TypeError, AttributeError, ValueError):
        same = False
    return chunked_loss_sum if same else causal_lm_loss_sum


def per_example_losses(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """For DP-SGD: each row's *own* mean token loss (a vector), with the row count. Each example's
    gradient then depends on that example alone (no step-wide token count before clipping,
    RELIABILITY.md S10c), and the plain lm_head keeps the batch dimension Opacus's hooks need. Ghost
    clipping weights these losses in its second backward."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    logits, targets = out.logits[:, :-1, :], batch["labels"][:, 1:]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 up to fp32; fp64 stays
    tokens = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
    counts = (targets != IGNORE).sum(1).clamp(min=1)
    return tokens.sum(1) / counts, len(targets)


def per_example_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """For DP-SGD with per-example gradients (hooks): the sum of per_example_losses."""
    losses, rows = per_example_losses(model, batch)
    return losses.sum(), rows
