"""Input files of `generate --input` and `predict --input`: read like training data (JSONL, CSV, Parquet),
every bad row listed as file:line: reason (never its text) before any model loads."""

from __future__ import annotations

from pathlib import Path

from tunesmith.config import Config, DataConfig
from tunesmith.config.decoding import Decoding
from tunesmith.data.formats import RowError, checked_messages, checked_string, concept_prompt, parse_rows, string_list
from tunesmith.data.prepare import MAX_LISTED
from tunesmith.data.sources import Problem, RawRows, read_source
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


def _request(row: dict, cfg: Config, decoding: Decoding) -> tuple[list[dict], list[str] | None]:
    """A row's prompt and concepts: a concepts run's rows may give their concepts (the prompt is then built as
    in training), and must when the kept output depends on them."""
    column = cfg.data.columns.get("concepts", "concepts")
    if cfg.data.format == "concepts" and column in row:
        concepts = string_list(row[column], column)
        return [{"role": "user", "content": concept_prompt(cfg.data, concepts)}], concepts
    if decoding.by_concepts:
        raise RowError(
            "missing_concepts",
            f"expected a '{column}' list: this run keeps the candidate that covers "
            "the most concepts (eval.decoding.rerank: coverage)",
        )
    return _prompt(row), None


def read_requests(path: Path, cfg: Config, decoding: Decoding) -> tuple[list[list[dict]], list[list[str] | None]]:
    """Each row's prompt, and its concepts where it gives them (see _request)."""
    check_input(path, cfg)
    raw = read_source(str(path))
    requests, problems = [], list(raw.problems)
    for where, row in raw.rows:
        try:
            requests.append(_request(row, cfg, decoding))
        except RowError as err:
            problems.append(Problem(where, err.code, err.message))
    refuse_bad_rows(path, problems, len(requests))
    return [p for p, _ in requests], [c for _, c in requests]


def read_prompts(path: Path, cfg: Config) -> list[list[dict]]:
    return read_requests(path, cfg, cfg.eval.decoding)[0]


def concept_request(text: str, cfg: Config) -> tuple[list[dict], list[str]]:
    """`generate --concepts a,b,c` on a concepts run: the prompt built as in training, and its concepts."""
    if cfg.data.format != "concepts":
        raise UserError(
            f"--concepts is for constrained-generation runs (data.format: concepts); this run's "
            f"format is {cfg.data.format}",
            hint="Give the whole prompt with --prompt.",
        )
    concepts = [c.strip() for c in text.split(",") if c.strip()]
    if not concepts:
        raise UserError("--concepts is empty", hint="Give the concepts comma-separated: --concepts dog,frisbee,catch")
    return [{"role": "user", "content": concept_prompt(cfg.data, concepts)}], concepts


def generation_requests(
    cfg: Config, decoding: Decoding, prompt: str | None, path: Path | None, concepts: str | None
) -> tuple[list[list[dict]], list[list[str] | None]]:
    """What `tunesmith generate` was asked, from exactly one of --prompt, --input and --concepts: the prompts
    and, where known, each one's concepts."""
    if (prompt, path, concepts).count(None) != 2:
        raise UserError("Give exactly one of --prompt, --input or --concepts")
    if concepts is not None:
        one, known = concept_request(concepts, cfg)
        return [one], [known]
    if path is not None:
        return read_requests(path, cfg, decoding)
    if not prompt.strip():
        raise UserError("--prompt is empty")
    if decoding.by_concepts:
        raise UserError(
            "this run keeps the candidate that covers the most concepts (eval.decoding.rerank: "
            "coverage), so it needs the concepts, not a prompt",
            hint="Use --concepts dog,frisbee,catch (or --num-candidates 1 for one output).",
        )
    return [[{"role": "user", "content": prompt}]], [None]


def one_text(text: str) -> list:
    """`--text`: one row, as read_texts would make it from a file holding only that text."""
    raw = RawRows("--text", rows=[("--text", {"text": text})])
    examples, problems = parse_rows(raw, DataConfig(train="--text", format="text"))
    refuse_bad_rows(Path("--text"), problems, len(examples))
    return examples


def read_texts(path: Path, cfg: Config) -> list:
    """Rows with the text column the run was trained on (its data.columns mapping), as examples."""
    check_input(path, cfg)
    raw = read_source(str(path))
    column = cfg.data.columns.get("text", "text")
    examples, problems = parse_rows(raw, DataConfig(train=str(path), format="text", columns={"text": column}))
    refuse_bad_rows(path, problems, len(examples))
    return examples
