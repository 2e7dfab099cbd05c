"""Try it: a finished run answers what the user types, next to its base model.

The model runs in a `tunesmith generate RUN --stream [--base]` (or `tunesmith predict RUN --text`) process,
as on the command line, so the server never loads a model and the answer is the one the CLI gives: the
run's chat template and its eval.decoding. The process's stdout is passed to the browser as it comes.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
from collections.abc import AsyncIterator

from tunesmith.rundir import RunDir
from tunesmith.ui.launch import error_of, tunesmith_argv
from tunesmith.ui.runs import config_tree

MAX_CHARS = 4000  # a prompt is a box's worth of text, not a file
MAX_NEW_TOKENS = 128
ERROR_MARK = "\n\u241e"  # what precedes the command's error message at the end of a failed stream
WHICH = ("base", "finetuned")


def mode(run: RunDir) -> str | None:
    """How a run is tried: 'label' (a classifier), 'concepts' (constrained generation: the words to use),
    'prompt'; None while it has no weights to answer with."""
    if not ((run / "adapter").is_dir() or (run / "model").is_dir()):
        return None
    tree = config_tree(run)
    fmt = (tree.get("data") or {}).get("format")
    if tree.get("task") == "classification" or fmt == "classification":
        return "label"
    return "concepts" if fmt == "concepts" else "prompt"


def problem(run: RunDir, text: str, which: str) -> str | None:
    """Why this request cannot be answered, or None."""
    how = mode(run)
    if how is None:
        return "this run has no fine-tuned weights yet (has it finished?)"
    if which not in WHICH:
        return f"model: one of {', '.join(WHICH)}"
    if how == "label" and which == "base":
        return "a classifier's base has no trained head to label with: only the fine-tuned model answers"
    if not text.strip():
        return "type something first"
    if len(text) > MAX_CHARS:
        return f"at most {MAX_CHARS} characters"
    return None


def command(run: RunDir, text: str, which: str) -> list[str]:
    how = mode(run)
    # `--option=TEXT`, one argument: a text that starts with "-" stays the option's value
    if how == "label":
        return tunesmith_argv("predict", str(run.path), f"--text={text}")
    ask = [f"--concepts={text}"] if how == "concepts" else [f"--prompt={text}"]
    extra = ["--base"] if which == "base" else []
    return tunesmith_argv("generate", str(run.path), *ask, "--stream", "--max-new-tokens", str(MAX_NEW_TOKENS), *extra)


async def answer(run: RunDir, text: str, which: str) -> AsyncIterator[str]:
    """The command's stdout as it is printed; on failure, ERROR_MARK and its error message. The process is
    killed if the browser goes away first."""
    proc = await asyncio.create_subprocess_exec(
        *command(run, text, which),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    errors = asyncio.ensure_future(proc.stderr.read())
    utf8 = codecs.getincrementaldecoder("utf-8")("replace")  # a character may straddle two reads
    try:
        while chunk := await proc.stdout.read(256):
            yield utf8.decode(chunk)
        if await proc.wait() != 0:
            said = error_of((await errors).decode("utf-8", "replace"))
            yield f"{ERROR_MARK}{said} (exit {proc.returncode})"
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        errors.cancel()
