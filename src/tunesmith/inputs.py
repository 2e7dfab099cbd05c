"""Input files of `generate --input` and `predict --input`: read like training data (JSONL, CSV, Parquet),
every bad row listed as file:line: reason (never its text) before any model loads."""

from __future__ import annotations

from pathlib import Path

from tunesmith.config import Config, DataConfig
from tunesmith.data.formats import RowError, checked_messages, checked_string, parse_rows
from tunesmith.data.prepare import MAX_LISTED
from tunesmith.data.sources import Problem, read_source
from tunesmith.errors import DataError, UserError


def check_input(path: Path, cfg: Config) -> None:
    from tunesmith.security import path_problem

    problem = path_problem(str(path), "--input", cfg.allowed_roots, must_exist=True)
    if problem:
        raise UserError(f"Refused path: {problem}")
    if not path.is_file():
        raise UserError(f"--input {path}: " + ("a directory, not a file" if path.is_dir() else "file not found"))


def refuse_bad_rows(path: Path, problems: list[Problem], rows: int) -> None:
    if problems:
        shown = problems[:MAX_LISTED]
        more = f" (first {MAX_LISTED} shown)" if len(problems) > len(shown) else ""
        raise DataError(f"{len(problems)} bad line(s) in {path}; nothing was run{more}", [str(p) for p in shown])
    if rows == 0:
        raise DataError(f"{path}: no rows")


def _prompt(row: dict) -> list[dict]:
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise RowError("bad_messages", "column 'messages' must be a non-empty list")
        # the conversation so far: it may end on any role, and the model answers next
        return checked_messages(msgs + [{"role": "assistant", "content": "-"}])[:-1]
    for col in ("prompt", "instruction"):
        if col in row:
            text = checked_string(row, col, col)
            extra = checked_string(row, "input", "input", allow_empty=True) if row.get("input") is not None else ""
            return [{"role": "user", "content": f"{text}\n\n{extra}" if extra.strip() else text}]
    raise RowError("missing_column", "expected a 'prompt', 'instruction' or 'messages' field")


def read_prompts(path: Path, cfg: Config) -> list[list[dict]]:
    check_input(path, cfg)
    raw = read_source(str(path))
    prompts, problems = [], list(raw.problems)
    for where, row in raw.rows:
        try:
            prompts.append(_prompt(row))
        except RowError as err:
            problems.append(Problem(where, err.code, err.message))
    refuse_bad_rows(path, problems, len(prompts))
    return prompts


def read_texts(path: Path, cfg: Config) -> list:
    """Rows with the text column the run was trained on (its data.columns mapping), as examples."""
    check_input(path, cfg)
    raw = read_source(str(path))
    column = cfg.data.columns.get("text", "text")
    examples, problems = parse_rows(raw, DataConfig(train=str(path), format="text", columns={"text": column}))
    refuse_bad_rows(path, problems, len(examples))
    return examples
