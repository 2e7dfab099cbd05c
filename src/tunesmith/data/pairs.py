"""Preference pairs as token rows: one row per pair, the prompt once and both answers after it.

A pair's row is prompt + chosen + rejected. Its 4-D boolean mask lets each answer attend to the prompt and
to itself (causally) but the rejected answer not to the chosen one, and its position ids restart the
rejected answer where the prompt ends: each answer is scored exactly as in its own sequence, the prompt is
computed once instead of twice, and no row is padded to its partner's length. (sdpa reads the boolean
mask; eager would misread it, pack.py says why.)

An answer's first token is predicted from the prompt's last position, the others from the answer's own
previous position: `source` holds, for every answer token, the position whose output predicts it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tunesmith.config import DataConfig
from tunesmith.data.formats import Example
from tunesmith.data.tokenize import TokenizedSplit, length_policy, prompt_and_completion_text


@dataclass
class PairRow:
    id: str
    where: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    reference: tuple[float, float] | None = None  # the reference model's log-probs of chosen and rejected

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.chosen_ids + self.rejected_ids


def tokenize_pairs(examples: list[Example], tokenizer, cfg: DataConfig) -> TokenizedSplit:
    """Each pair's prompt (chat template, generation prompt) and its two answers (with the template's end of
    turn). data.max_length bounds prompt + each answer, as either would be fed alone (TRL's max_length);
    `truncate` cuts the answers' ends, and a pair whose prompt leaves no room is dropped and counted."""
    out = TokenizedSplit()
    if not examples:
        return out
    texts = [
        prompt_and_completion_text(tokenizer, Example(ex.where, ex.id, ex.prompt, ex.completion)) for ex in examples
    ]
    rejected = [
        prompt_and_completion_text(tokenizer, Example(ex.where, ex.id, ex.prompt, ex.rejected))[1] for ex in examples
    ]
    prompts = tokenizer([p for p, _ in texts], add_special_tokens=False)["input_ids"]
    chosen = tokenizer([c for _, c in texts], add_special_tokens=False)["input_ids"]
    worse = tokenizer(rejected, add_special_tokens=False)["input_ids"]
    for ex, p, c, r in zip(examples, prompts, chosen, worse):
        keep = length_policy(out, ex.where, len(p) + max(len(c), len(r)), cfg)
        room = keep - len(p)
        if keep == 0:
            continue
        if room < 1:
            out.counts["dropped_no_trainable"] += 1
            continue
        out.rows.append(PairRow(ex.id, ex.where, list(p), list(c)[:room], list(r)[:room]))
    return out


def collate_pairs(rows: list[PairRow], pad_id: int) -> dict[str, torch.Tensor]:
    """A batch of pair rows: ids, the 4-D mask, position ids, and for every answer token its target id,
    the flat position (row * width + position) that predicts it, its pair and its answer (0 chosen, 1
    rejected). With the reference log-probs when the rows carry them."""
    width = max(len(r.input_ids) for r in rows)
    n = len(rows)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long)
    part = torch.full((n, width), -1, dtype=torch.long)  # 0 prompt, 1 chosen, 2 rejected, -1 padding
    source, target, pair, answer = [], [], [], []
    for b, r in enumerate(rows):
        p, c, k = len(r.prompt_ids), len(r.chosen_ids), len(r.rejected_ids)
        ids[b, : p + c + k] = torch.tensor(r.input_ids)
        positions[b, : p + c] = torch.arange(p + c)
        positions[b, p + c : p + c + k] = torch.arange(p, p + k)
        part[b, :p], part[b, p : p + c], part[b, p + c : p + c + k] = 0, 1, 2
        for which, start, tokens in ((0, p, r.chosen_ids), (1, p + c, r.rejected_ids)):
            source += [b * width + p - 1] + [b * width + start + j for j in range(len(tokens) - 1)]
            target += tokens
            pair += [b] * len(tokens)
            answer += [which] * len(tokens)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    real = part >= 0
    mask = causal & real[:, :, None] & real[:, None, :]
    mask &= ~((part[:, :, None] == 2) & (part[:, None, :] == 1))  # the rejected answer never sees the chosen one
    mask |= torch.eye(width, dtype=torch.bool) & ~real[:, :, None]  # padding attends to itself (no NaN rows)
    batch = {
        "input_ids": ids,
        "attention_mask": mask[:, None],
        "position_ids": positions,
        "source": torch.tensor(source),
        "target": torch.tensor(target),
        "pair": torch.tensor(pair),
        "answer": torch.tensor(answer),
        "n_tokens": real.sum(),
        "n_pairs": torch.tensor(n),
    }
    if all(r.reference is not None for r in rows):
        batch["reference"] = torch.tensor([r.reference for r in rows], dtype=torch.float64)
    return batch
