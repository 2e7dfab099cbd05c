"""Turn raw rows into examples of one format, validating each row.

Formats (``data.format``):
- instruction: instruction, input (optional), output -> a chat prompt and a completion
- chat: messages [{role, content}, ...] ending with an assistant turn
- prompt_completion: prompt, completion
- summarization: document, summary -> data.prompt + document as the prompt, summary as the completion
- concepts: concepts (list), target, references (optional list) -> constrained generation (CommonGen)
- text: text (continued pre-training; loss on every token)
- classification: text, label
- preference: prompt (text, or chat messages ending with a user turn), chosen, rejected -> a pair of answers
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunesmith.config import CANONICAL_COLUMNS, DEFAULT_PROMPTS, DataConfig
from tunesmith.data.sources import Problem, RawRows

REQUIRED = {
    "instruction": ("instruction", "output"),
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "summarization": ("document", "summary"),
    "concepts": ("concepts", "target"),
    "text": ("text",),
    "classification": ("text", "label"),
    "preference": ("prompt", "chosen", "rejected"),
}
ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    where: str
    id: str
    prompt: list[dict[str, str]] | None = None  # chat messages before the completion
    completion: str | None = None
    text: str | None = None
    label: str | None = None
    references: list[str] | None = None  # all acceptable answers, when the data has several
    concepts: list[str] | None = None
    user: str | None = None  # the privacy unit, with privacy.unit: user
    rejected: str | None = None  # a preference pair's worse answer (`completion` holds the chosen one)

    def key_fields(self) -> tuple:
        """What makes two examples the same, for deduplication and leakage checks."""
        prompt = tuple((m["role"], m["content"]) for m in self.prompt or [])
        answer = self.completion if self.rejected is None else f"{self.completion}\n\x00{self.rejected}"
        return (prompt, answer, self.text, self.label)


class RowError(Exception):
    def __init__(self, code: str, message: str):
        self.code, self.message = code, message


def _encodable(value: str, name: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RowError("invalid_unicode", f"column '{name}' has a lone surrogate") from None
    return value


def checked_string(row: dict, col: str, name: str, allow_empty: bool = False) -> str:
    """row[col] if it is a non-empty string that encodes as UTF-8; otherwise a RowError naming column `name`."""
    value = row[col]
    if not isinstance(value, str):
        raise RowError("wrong_type", f"column '{name}' must be a string, got {type(value).__name__}")
    _encodable(value, name)
    if not allow_empty and not value.strip():
        raise RowError("empty_field", f"column '{name}' is empty")
    return value


def checked_messages(value: Any) -> list[dict[str, str]]:
    """A chat as role/content dicts, ending with a non-empty assistant turn; otherwise a RowError."""
    if not isinstance(value, list) or not value:
        raise RowError("bad_messages", "column 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise RowError("bad_messages", f"message {i} needs a role in {ROLES} and string content")
        out.append({"role": m["role"], "content": _encodable(m["content"], "messages")})
    if out[-1]["role"] != "assistant":
        raise RowError("bad_messages", "the last message must be the assistant's (it is what is learned)")
    if not out[-1]["content"].strip():
        raise RowError("empty_field", "the last assistant message is empty")
    return out


def string_list(value: Any, name: str, allow_empty: bool = False) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise RowError("wrong_type", f"column '{name}' must be a list of non-empty strings")
    if not value and not allow_empty:
        raise RowError("empty_field", f"column '{name}' is an empty list")
    return [_encodable(v, name) for v in value]


def concept_prompt(cfg: DataConfig, concepts: list[str]) -> str:
    """A concepts row's request: the run's instruction, then the concepts (in training and `generate` alike)."""
    return f"{cfg.prompt or DEFAULT_PROMPTS['concepts']} {', '.join(concepts)}."


def _label(value: Any, labels: list[str] | None) -> str:
    if value is None or isinstance(value, (dict, list, float)):
        raise RowError("bad_label", f"label must be a string or integer, got {type(value).__name__}")
    label = _encodable(str(value), "label")
    if not label.strip():
        raise RowError("bad_label", "label is empty")
    if labels is not None and label not in labels:
        # The row's value is not quoted: problems reach stderr and logs, which never carry row text.
        raise RowError("unknown_label", f"label is not one of labels {labels}")
    return label


def to_example(where: str, row: dict, cfg: DataConfig, system: str | None, user_column: str | None = None) -> Example:
    ex = _to_example(where, row, cfg, system)
    if user_column is not None:
        if (
            row.get(user_column) is None
            or isinstance(row[user_column], (dict, list))
            or not str(row[user_column]).strip()
        ):
            raise RowError("missing_user", f"no user id in column '{user_column}' (privacy.unit: user)")
        ex.user = str(row[user_column])
    return ex


def _to_example(where: str, row: dict, cfg: DataConfig, system: str | None) -> Example:
    fmt = cfg.format
    cols = {c: cfg.columns.get(c, c) for c in CANONICAL_COLUMNS[fmt]}
    missing = [f"'{cols[c]}'" for c in REQUIRED[fmt] if cols[c] not in row]
    if missing:
        raise RowError("missing_column", f"missing column {', '.join(missing)}")
    ex_id = str(row.get(cfg.columns.get("id", "id"), where))
    if not ex_id.isprintable() or len(ex_id) > 200:
        ex_id = where  # ids go into logs: keep them short and printable
    head = [{"role": "system", "content": system}] if system else []
    if fmt == "instruction":
        instr = checked_string(row, cols["instruction"], "instruction")
        extra = checked_string(row, cols["input"], "input", allow_empty=True) if cols["input"] in row else ""
        user = f"{instr}\n\n{extra}" if extra.strip() else instr
        return Example(
            where, ex_id, head + [{"role": "user", "content": user}], checked_string(row, cols["output"], "output")
        )
    if fmt == "prompt_completion":
        prompt = checked_string(row, cols["prompt"], "prompt")
        return Example(
            where,
            ex_id,
            head + [{"role": "user", "content": prompt}],
            checked_string(row, cols["completion"], "completion"),
        )
    if fmt == "summarization":
        doc = checked_string(row, cols["document"], "document")
        prompt = f"{cfg.prompt or DEFAULT_PROMPTS['summarization']}\n\n{doc}"
        summary = checked_string(row, cols["summary"], "summary")
        return Example(where, ex_id, head + [{"role": "user", "content": prompt}], summary, references=[summary])
    if fmt == "concepts":
        concepts = string_list(row[cols["concepts"]], "concepts")
        target = checked_string(row, cols["target"], "target")
        refs = string_list(row[cols["references"]], "references") if cols["references"] in row else [target]
        prompt = concept_prompt(cfg, concepts)
        return Example(
            where, ex_id, head + [{"role": "user", "content": prompt}], target, references=refs, concepts=concepts
        )
    if fmt == "chat":
        msgs = checked_messages(row[cols["messages"]])
        if system and msgs[0]["role"] != "system":
            msgs = head + msgs
        return Example(where, ex_id, msgs[:-1], msgs[-1]["content"])
    if fmt == "text":
        return Example(where, ex_id, text=checked_string(row, cols["text"], "text"))
    if fmt == "preference":
        return preference_pair(where, ex_id, row, cols, head)
    return Example(
        where, ex_id, text=checked_string(row, cols["text"], "text"), label=_label(row[cols["label"]], cfg.labels)
    )


def preference_pair(where: str, ex_id: str, row: dict, cols: dict, head: list[dict]) -> Example:
    """A prompt (text, or chat messages ending with the user's turn) and two different answers to it."""
    prompt = row[cols["prompt"]]
    if isinstance(prompt, list):
        messages = checked_messages(prompt + [{"role": "assistant", "content": "-"}])[:-1]
        if messages[-1]["role"] != "user":
            raise RowError("bad_messages", "a chat prompt must end with the user's turn (the answers follow it)")
    else:
        messages = [{"role": "user", "content": checked_string(row, cols["prompt"], "prompt")}]
    if head and messages[0]["role"] != "system":
        messages = head + messages
    chosen = checked_string(row, cols["chosen"], "chosen")
    rejected = checked_string(row, cols["rejected"], "rejected")
    if chosen.strip() == rejected.strip():
        raise RowError("same_answers", "chosen and rejected are the same answer: the pair prefers nothing")
    return Example(where, ex_id, messages, chosen, references=[chosen], rejected=rejected)


def parse_rows(raw: RawRows, cfg: DataConfig, user_column: str | None = None) -> tuple[list[Example], list[Problem]]:
    problems = list(raw.problems)
    if raw.header is not None:
        cols = {c: cfg.columns.get(c, c) for c in CANONICAL_COLUMNS[cfg.format]}
        missing = [cols[c] for c in REQUIRED[cfg.format] if cols[c] not in raw.header]
        if missing:
            from tunesmith.errors import DataError

            hint = None
            if len(raw.header) == 1 and any(d in raw.header[0] for d in ";\t|"):
                hint = "The header is one field holding ';', tab or '|': is the delimiter not a comma?"
            raise DataError(f"{raw.source}:1: missing column(s) {missing}; found {raw.header}", hint=hint)
        if user_column is not None and user_column not in raw.header:
            from tunesmith.errors import DataError

            raise DataError(
                f"{raw.source}:1: no user id column '{user_column}' (privacy.unit: user); found {raw.header}"
            )
    examples = []
    for where, row in raw.rows:
        try:
            examples.append(to_example(where, row, cfg, cfg.system_prompt, user_column))
        except RowError as err:
            problems.append(Problem(where, err.code, err.message))
    return examples, problems
