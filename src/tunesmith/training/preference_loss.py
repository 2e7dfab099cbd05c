"""Preference losses on pair rows (data/pairs.py): each answer's log-probability, then DPO, IPO or SimPO.

Losses are per pair and summed, with the pair count: the fitting loop divides by the pairs of the whole
step, so micro-batching does not change the update (as TRL's mean over a batch, for one batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tunesmith.config import PreferenceConfig
from tunesmith.training.loss import CHUNK


def _token_logps(head, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    logits = head(hidden.to(head.weight.dtype)).float()
    return logits.log_softmax(-1).gather(-1, target[:, None])[:, 0]


def answer_logps(model, batch: dict, chunked: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair, the summed log-probabilities of (chosen, rejected), shape [pairs, 2], and their token counts.
    chunked: the output layer only at the answer tokens' positions, a chunk at a time, recomputed in the
    backward (recipes check once that the last hidden state times it gives the logits); otherwise the
    model's logits, whose output layer keeps the batch dimension (DP-SGD's per-example hooks need it)."""
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        use_cache=False,
        **({"output_hidden_states": True, "logits_to_keep": 1} if chunked else {}),
    )
    source, target = batch["source"], batch["target"]
    if chunked:
        hidden = out.hidden_states[-1].reshape(-1, out.hidden_states[-1].size(-1))[source]
        head = getattr(model, "module", model).get_output_embeddings()
        parts = [
            checkpoint(_token_logps, head, hidden[i : i + CHUNK], target[i : i + CHUNK], use_reentrant=False)
            for i in range(0, len(target), CHUNK)
        ]
        token_logps = torch.cat(parts)
    else:
        logits = out.logits.reshape(-1, out.logits.size(-1))[source]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        token_logps = logits.log_softmax(-1).gather(-1, target[:, None])[:, 0]
    slot = batch["pair"] * 2 + batch["answer"]
    pairs = int(batch["n_pairs"])
    sums = token_logps.new_zeros(2 * pairs).index_add(0, slot, token_logps).view(pairs, 2)
    counts = torch.bincount(slot, minlength=2 * pairs).view(pairs, 2).to(sums.dtype)
    return sums, counts


def pair_losses(logps: torch.Tensor, counts: torch.Tensor, reference: torch.Tensor | None, cfg: PreferenceConfig):
    """Each pair's loss (a vector), plus sft_weight times the chosen answer's mean token NLL."""
    losses = preference_losses(logps, counts, reference, cfg)
    if cfg.sft_weight:
        losses = losses + cfg.sft_weight * -logps[:, 0] / counts[:, 0].clamp(min=1)
    return losses


def preference_losses(logps: torch.Tensor, counts: torch.Tensor, reference: torch.Tensor | None, cfg):
    """dpo and ipo need the reference log-probs; simpo is reference-free."""
    beta = cfg.beta
    if cfg.loss == "simpo":
        mean = logps / counts.clamp(min=1)
        return -F.logsigmoid(beta * (mean[:, 0] - mean[:, 1]) - cfg.gamma)
    ratio = logps - reference.to(logps.dtype)
    if cfg.loss == "ipo":  # length-normalised, as TRL and IPO's authors do
        per_token = ratio / counts.clamp(min=1)
        return (per_token[:, 0] - per_token[:, 1] - 1 / (2 * beta)) ** 2
    return -F.logsigmoid(beta * (ratio[:, 0] - ratio[:, 1]))


def rewards(logps: torch.Tensor, counts: torch.Tensor, reference: torch.Tensor | None, cfg: PreferenceConfig):
    """The implicit rewards of (chosen, rejected): beta times the log-ratio to the reference (DPO, IPO), or
    beta times the mean token log-prob (SimPO, which has no reference)."""
    if cfg.loss == "simpo":
        return cfg.beta * logps / counts.clamp(min=1)
    return cfg.beta * (logps - reference.to(logps.dtype))


def loss_fns(cfg: PreferenceConfig, chunked: bool):
    """(summed loss, pairs) for the fitting loop, and (per-pair losses, pairs) for DP-SGD's ghost clipping."""

    def per_pair(model, batch: dict) -> tuple[torch.Tensor, int]:
        logps, counts = answer_logps(model, batch, chunked)
        return pair_losses(logps, counts, batch.get("reference"), cfg), int(batch["n_pairs"])

    def summed(model, batch: dict) -> tuple[torch.Tensor, int]:
        losses, pairs = per_pair(model, batch)
        return losses.sum(), pairs

    return summed, per_pair
