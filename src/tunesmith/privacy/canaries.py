"""Memorisation audit: The Secret Sharer's exposure (Carlini et al., USENIX Security 2019).

Random secrets ("my account number is d d d d d d", a space of 10^6) are inserted into a copy of the
training data, `r` times each for several `r`. After training, each canary's log-perplexity is ranked
among reference secrets that were never inserted: exposure = log2 |R| - log2 rank. An unmemorised canary
ranks in the middle (about 1 bit); a memorised one ranks first (log2 |R| bits, 13.3 for 10^4 references).
Exposure is computed by interpolation, as in tensorflow_privacy's secret_sharer/exposures.py.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F

from tunesmith.config import DataConfig
from tunesmith.data.collate import collate
from tunesmith.data.formats import to_example
from tunesmith.data.tokenize import IGNORE, tokenize_examples
from tunesmith.errors import UserError

PREFIX = "my account number is"
DIGITS = 6
PROMPT = "Please note my account details."


def secret_text(secret: str) -> str:
    return f"{PREFIX} {' '.join(secret)}"


def draw(repetitions: list[int], per_repetition: int, n_references: int, seed: int) -> tuple[dict, list[str]]:
    """{r: [secrets inserted r times]} and the reference secrets, all distinct, from one seeded stream."""
    rng = random.Random(seed)
    needed = per_repetition * len(repetitions) + n_references
    if needed > 10**DIGITS // 2:
        raise UserError(f"{needed} secrets requested from a space of {10**DIGITS}: use fewer references")
    pool: list[str] = []
    seen: set[str] = set()
    while len(pool) < needed:
        s = f"{rng.randrange(10**DIGITS):0{DIGITS}d}"
        if s not in seen:
            seen.add(s)
            pool.append(s)
    canaries = {r: pool[i * per_repetition : (i + 1) * per_repetition] for i, r in enumerate(repetitions)}
    return canaries, pool[per_repetition * len(repetitions) :]


def canary_row(dcfg: DataConfig, text: str, index: int) -> dict:
    """A row in the run's own data format whose learned part (completion, or whole text) is the canary."""
    col = {
        c: dcfg.columns.get(c, c)
        for c in (
            "text",
            "instruction",
            "output",
            "prompt",
            "completion",
            "messages",
            "document",
            "summary",
            "concepts",
            "target",
            "id",
        )
    }
    fmt = dcfg.format
    row: dict = {col["id"]: f"canary-{index}"}
    if fmt == "text":
        row[col["text"]] = text
    elif fmt == "instruction":
        row.update({col["instruction"]: PROMPT, col["output"]: text})
    elif fmt == "prompt_completion":
        row.update({col["prompt"]: PROMPT, col["completion"]: text})
    elif fmt == "chat":
        row[col["messages"]] = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": text}]
    elif fmt == "summarization":
        row.update({col["document"]: PROMPT, col["summary"]: text})
    elif fmt == "concepts":
        row.update({col["concepts"]: ["account", "number"], col["target"]: text})
    else:
        raise UserError(f"The canary audit needs a generative task; data.format {fmt} has no text to memorise")
    return row


@torch.no_grad()
def log_perplexities(model, tokenizer, dcfg: DataConfig, secrets: list[str], batch_size: int = 64) -> np.ndarray:
    """Summed negative log-likelihood (nats) of each secret's learned tokens, under the run's template.
    The shared prefix scores the same for every secret, so ranking by the total ranks the secrets."""
    rows = [
        to_example(f"canary:{i}", canary_row(dcfg, secret_text(s), i), dcfg, dcfg.system_prompt)
        for i, s in enumerate(secrets)
    ]
    tokenized = tokenize_examples(rows, tokenizer, dcfg.model_copy(update={"overlength": "truncate"})).rows
    if len(tokenized) != len(secrets):
        raise UserError("Some canaries did not survive tokenization; raise data.max_length")
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(tokenized), batch_size):
        batch = {k: v.to(device) for k, v in collate(tokenized[i : i + batch_size], tokenizer.pad_token_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE, reduction="none")
        out += nll.sum(1).tolist()
    return np.array(out)


def exposures(canaries: dict[int, np.ndarray], references: np.ndarray) -> dict[int, np.ndarray]:
    """Exposure by interpolation: rank = 1 + the references with a lower log-perplexity."""
    ref = np.sort(references)
    return {r: np.log2(len(ref)) - np.log2(1 + np.searchsorted(ref, p, side="left")) for r, p in canaries.items()}
