"""Tokenize examples through the model's chat template, mask the prompt, apply the length policy.

Nothing is cut silently: every truncated or dropped row is counted, and `overlength: error` (the
default) stops the run listing the rows that do not fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tunesmith.config import DataConfig
from tunesmith.data.formats import Example
from tunesmith.errors import UserError

IGNORE = -100
# Used when a tokenizer has no chat template (base models, tiny test tokenizers).
FALLBACK_TEMPLATE = (
    "{% for m in messages %}{{ '### ' + m['role'] | capitalize + ':\n' + m['content'] + '\n\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)


@dataclass
class Tokenized:
    id: str
    where: str
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken

    @property
    def n_trainable(self) -> int:
        # The first token is never predicted, so its label never counts.
        return sum(1 for x in self.labels[1:] if x != IGNORE)


@dataclass
class LabeledRow:
    id: str
    where: str
    input_ids: list[int]
    label: int  # index into the label list


@dataclass
class TokenizedSplit:
    rows: list[Tokenized] = field(default_factory=list)
    counts: dict[str, int] = field(
        default_factory=lambda: {"truncated": 0, "dropped_overlength": 0, "dropped_no_trainable": 0}
    )
    overlength: list[str] = field(default_factory=list)  # where, for overlength rows
    lengths: list[int] = field(default_factory=list)  # before any cut


def ensure_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = FALLBACK_TEMPLATE
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


def render_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_and_completion_text(tokenizer, ex: Example) -> tuple[str, str]:
    prompt = render_prompt(tokenizer, ex.prompt)
    full = tokenizer.apply_chat_template(ex.prompt + [{"role": "assistant", "content": ex.completion}], tokenize=False)
    if full.startswith(prompt):
        return prompt, full[len(prompt) :]
    # Templates that rewrite earlier turns (some reasoning models) break the prefix property;
    # then the completion is the answer plus the end-of-sequence token.
    return prompt, ex.completion + (tokenizer.eos_token or "")


def _texts(tokenizer, examples: list[Example]) -> tuple[list[str], list[str]]:
    prompts, completions = [], []
    for ex in examples:
        if ex.prompt is not None:
            p, c = prompt_and_completion_text(tokenizer, ex)
        else:
            bos = (tokenizer.bos_token or "") if getattr(tokenizer, "add_bos_token", False) else ""
            p, c = bos, ex.text + (tokenizer.eos_token or "")
        prompts.append(p)
        completions.append(c)
    return prompts, completions


def length_policy(out: TokenizedSplit, where: str, length: int, cfg: DataConfig) -> int:
    """Record the row's length and apply data.overlength; return how many tokens to keep (0: drop).
    With `error` the row is kept whole and listed; tokenize_splits then stops the run."""
    out.lengths.append(length)
    if length <= cfg.max_length:
        return length
    out.overlength.append(where)
    if cfg.overlength == "drop":
        out.counts["dropped_overlength"] += 1
        return 0
    if cfg.overlength == "truncate":
        out.counts["truncated"] += 1
        return cfg.max_length
    return length


def tokenize_examples(examples: list[Example], tokenizer, cfg: DataConfig) -> TokenizedSplit:
    out = TokenizedSplit()
    if not examples:
        return out
    prompts, completions = _texts(tokenizer, examples)
    # One batched call each: the fast tokenizers parallelise a list, not a loop of single calls.
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(completions, add_special_tokens=False)["input_ids"]
    for ex, p, c in zip(examples, p_ids, c_ids):
        ids = list(p) + list(c)
        loss_on_prompt = ex.prompt is None or not cfg.completion_only_loss
        labels = ids.copy() if loss_on_prompt else [IGNORE] * len(p) + list(c)
        keep = length_policy(out, ex.where, len(ids), cfg)
        if keep == 0:
            continue
        ids, labels = ids[:keep], labels[:keep]
        row = Tokenized(ex.id, ex.where, ids, labels)
        if row.n_trainable == 0:
            out.counts["dropped_no_trainable"] += 1
            continue
        out.rows.append(row)
    return out


def _cut_inside_template(tokenizer, template: str, text: str, ids: list[int], keep: int) -> list[int]:
    """Shorten the text, never the template around it (`ids`: the whole row's tokens): a template's tail (e.g.
    "Sentiment:") is where a decoder's last token reads the answer from. Re-tokenizing the cut text can merge
    tokens differently at the seam, so cut again until the row fits."""
    text_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    while len(ids) > keep and text_ids:
        text_ids = text_ids[: max(0, len(text_ids) - (len(ids) - keep))]
        ids = tokenizer(template.replace("{text}", tokenizer.decode(text_ids)), add_special_tokens=True)["input_ids"]
    if len(ids) > keep:
        raise UserError(
            f"data.prompt alone is {len(ids)} tokens, over data.max_length={keep}",
            hint="Raise data.max_length or shorten data.prompt.",
        )
    return list(ids)


def tokenize_classification(examples: list[Example], tokenizer, cfg: DataConfig, labels: list[str]) -> TokenizedSplit:
    """Encoder inputs with the tokenizer's own special tokens ([CLS] ... [SEP]), each text inside data.prompt's
    template when there is one; the label as an index."""
    out = TokenizedSplit()
    index = {lab: i for i, lab in enumerate(labels)}
    texts = [cfg.prompt.replace("{text}", ex.text) if cfg.prompt else ex.text for ex in examples]
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    for ex, row_ids in zip(examples, ids):
        keep = length_policy(out, ex.where, len(row_ids), cfg)
        if keep == 0:
            continue
        if keep < len(row_ids) and cfg.prompt:
            row_ids = _cut_inside_template(tokenizer, cfg.prompt, ex.text, row_ids, keep)
        elif keep < len(row_ids):  # keep the closing special token ([SEP]): encoders expect it
            row_ids = row_ids[: keep - 1] + row_ids[-1:]
        out.rows.append(LabeledRow(ex.id, ex.where, list(row_ids), index[ex.label]))
    return out
