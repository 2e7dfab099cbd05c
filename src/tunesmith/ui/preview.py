"""The new-run form's data preview: `tunesmith data check CONFIG --preview N` in its own process (the
server loads no tokenizer or data code), shown as the data report's tables and each split's first rows."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
from pathlib import Path

import yaml

from tunesmith.ui.launch import error_of, tunesmith_argv
from tunesmith.ui.runs import data_sections

ROWS = 5
TIMEOUT_S = 300.0
SHOWN_ERROR_LINES = 40


async def preview(tree: dict, runs_root: Path) -> dict:
    """{"ok": True, "sections", "warnings", "rows": {split: [row, ...]}} or {"ok": False, "error"}."""
    folder = runs_root / ".ui"  # where Launch writes the config: relative data paths mean the same
    folder.mkdir(exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="preview-", suffix=".yaml", dir=folder)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        yaml.safe_dump(tree, f, sort_keys=False)
    proc = await asyncio.create_subprocess_exec(
        *tunesmith_argv("data", "check", name, "--preview", str(ROWS)),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT_S)
    except asyncio.TimeoutError:
        return {"ok": False, "error": f"the data check took over {TIMEOUT_S:.0f} s"}
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        Path(name).unlink(missing_ok=True)
    if proc.returncode != 0:
        return {"ok": False, "error": error_of(err.decode("utf-8", "replace"), SHOWN_ERROR_LINES)}
    report = json.loads(out)
    rows = report.pop("preview", {})
    return {"ok": True, "sections": data_sections(report), "warnings": report.get("warnings", []), "rows": rows}
