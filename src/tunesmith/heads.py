"""How a classifier turns the backbone's hidden states into one vector per row (`model.pooling`).

`AutoModelForSequenceClassification` pools the way each architecture's authors fine-tuned it: BERT puts a
freshly initialised pooler (dense + tanh) on [CLS], decoders score the last real token. A sentence encoder such
as all-MiniLM-L6-v2 was trained for the masked mean of its token states instead, and a head on [CLS] throws that
training away. `set_pooling` keeps the transformers model (so PEFT, saving and loading work unchanged) and
replaces only the step from hidden states to the head's input.
"""

from __future__ import annotations

import inspect
import types
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from tunesmith.errors import UserError

POOLINGS = ("auto", "mean", "cls", "last")
HEAD_NAMES = {"classifier", "score"}  # what transformers' *ForSequenceClassification call their head


def pool(hidden: torch.Tensor, mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """(batch, length, width) -> (batch, width). `mask` marks real tokens (1) and padding (0), either side."""
    if mask is None:
        mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    if how == "cls":
        first = mask.argmax(-1)  # the first real token: position 0 under right padding
        return hidden[torch.arange(len(hidden), device=hidden.device), first]
    if how == "last":
        # the last real token: the highest position holding a 1, whichever side was padded
        positions = torch.arange(mask.shape[1], device=hidden.device).expand_as(mask)
        last = (positions * mask).argmax(-1)
        return hidden[torch.arange(len(hidden), device=hidden.device), last]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def _head(model) -> tuple[str, nn.Linear]:
    for name in sorted(HEAD_NAMES):
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear):
            return name, head
    found = type(getattr(model, "classifier", getattr(model, "score", None))).__name__
    raise UserError(
        f"model.pooling works with a classifier whose head is one linear layer (BERT-, Llama- and "
        f"Qwen-family models); {type(model).__name__} has a {found} head",
        hint="Leave model.pooling at auto for this model.",
    )


def _pooled_forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
    # PEFT passes every keyword its wrapper knows (inputs_embeds=None, return_dict=None, ...): keep the given ones
    given = {k: v for k, v in kwargs.items() if v is not None}
    hidden = self.base_model(input_ids=input_ids, attention_mask=attention_mask, **given).last_hidden_state
    pooled = pool(hidden, attention_mask, self.config.tunesmith_pooling)
    dropout = getattr(self, "dropout", None)
    if isinstance(dropout, nn.Dropout):
        pooled = dropout(pooled)
    return SequenceClassifierOutput(logits=getattr(self, self.tunesmith_head)(pooled))


def set_pooling(model, how: str):
    """The classifier `model` pooling by `how` (mean / cls / last); `auto` leaves the model as built."""
    if how == "auto":
        return model
    name, _ = _head(model)
    backbone = model.base_model
    if how in ("mean", "last") and "attention_mask" not in inspect.signature(backbone.forward).parameters:
        raise UserError(
            f"model.pooling: {how} needs the padding mask, and {type(backbone).__name__}.forward takes "
            "no attention_mask",
            hint="Use model.pooling: cls, or auto.",
        )
    if getattr(backbone, "pooler", None) is not None:
        backbone.pooler = None  # BERT's [CLS] pooler would sit unused (and untrained) beside the new pooling
    model.config.tunesmith_pooling = how  # saved in config.json, so the model directory says how it pools
    model.tunesmith_head = name
    model.forward = types.MethodType(_pooled_forward, model)
    return model


def label_word_ids(tokenizer, labels: list[str]) -> list[int]:
    """Each label's first token as the word after a prompt (a leading space): the token a language model
    would write to answer with that label."""
    return [tokenizer(" " + label.strip(), add_special_tokens=False)["input_ids"][0] for label in labels]


def check_label_words(config, token_ids: list[int], labels: list[str]) -> None:
    """What model.head_init: label_words needs, read from the model's config before any weights load: a
    decoder language model, and labels that differ in their first token."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES as MASKED

    kind = config.model_type
    if kind not in CAUSAL or kind in MASKED:
        raise UserError(
            f"model.head_init: label_words needs a decoder language model; {kind} is not one",
            hint="Use model.head_init: random for encoders.",
        )
    if len(set(token_ids)) < len(token_ids):
        raise UserError(
            f"model.head_init: label_words needs labels whose first tokens differ; {labels} share one",
            hint="Rename the labels (data.labels) or use model.head_init: random.",
        )


def start_from_label_words(model, path: str, token_ids: list[int]) -> None:
    """The head's rows set to the language-model head's rows of `token_ids`: on the last token, the classifier's
    logits are then the LM's next-token logits of the label words (its zero-shot answer). check_label_words
    has passed on the model's config before it loaded."""
    rows = _lm_head_rows(model, path, token_ids)
    _, head = _head(model)
    with torch.no_grad():
        head.weight.copy_(rows.to(head.weight.dtype))
        if head.bias is not None:
            head.bias.zero_()


def _lm_head_rows(model, path: str, token_ids: list[int]) -> torch.Tensor:
    if getattr(model.config, "tie_word_embeddings", False):  # the LM head is the input embedding matrix
        return model.get_input_embeddings().weight[token_ids].detach().float()
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            if "lm_head.weight" in f.keys():  # noqa: SIM118 (safe_open has keys(), not __contains__)
                return f.get_slice("lm_head.weight")[token_ids].float()
    raise UserError(
        f"model.head_init: label_words found no lm_head.weight in {path}",
        hint="Use model.head_init: random.",
    )
