"""How tests run the tunesmith CLI: in this process or in a fresh one, with one result shape.

- `invoke_cli(*args)`: `tunesmith.cli.main()` in this process, its output captured by typer's CliRunner.
  main() and not the typer app alone, because main() is what turns a UserError into `error: ...` and exit 2.
  For tests that monkeypatch tunesmith, or that would pay a fresh process's imports many times.
- `run_cli(*args, ...)`: a fresh `python -m tunesmith` process, for what needs a real one: signals and kills,
  launchers (torchrun, accelerate launch), a program that installs a fault first, its own environment or cwd.
  `cli_argv` is its command line, for tests that start the process themselves (Popen).
Both return `returncode`, `stdout` and `stderr`.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# What follows the interpreter by default; tests swap in `("-c", SCRIPT)` or a launcher that ends with either.
TUNESMITH = ("-m", "tunesmith")


@dataclass(frozen=True)
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def invoke_cli(*args) -> CliResult:
    """`tunesmith <args>` in this process. Exceptions other than SystemExit propagate, as from main()."""
    from typer.testing import CliRunner

    from tunesmith import cli

    runner = CliRunner()
    outer_out, outer_err, old_argv = sys.stdout, sys.stderr, sys.argv
    sys.argv = ["tunesmith", *map(str, args)]
    code, out, err = 0, "", ""
    try:
        with runner.isolation() as (out_bytes, err_bytes, _):
            try:
                cli.main()
            except SystemExit as exc:
                code = int(exc.code or 0)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                out = out_bytes.getvalue().decode(runner.charset, "replace")
                err = err_bytes.getvalue().decode(runner.charset, "replace")
    finally:
        sys.argv = old_argv
        # Echoed, so that a failing test shows what the command printed, as pytest does for any output.
        outer_out.write(out)
        outer_err.write(err)
    return CliResult(code, out, err)


def cli_argv(*args, program: Sequence[str | Path] = TUNESMITH) -> list[str]:
    """The command line of `tunesmith <args>` run by this interpreter through `program`."""
    return [sys.executable, *map(str, program), *map(str, args)]


def run_cli(
    *args,
    program: Sequence[str | Path] = TUNESMITH,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess:
    """`tunesmith <args>` in a fresh process. `env` is its whole environment (None: this process's), as for
    subprocess.run, so that a test can also leave variables out."""
    return subprocess.run(
        cli_argv(*args, program=program), capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout
    )


def main_in_process(*args) -> int:
    """`tunesmith.cli.main()` in this process with nothing captured here, for tests that read the output
    through pytest's capsys: the exit code (0 when it returns)."""
    from tunesmith import cli

    old = sys.argv
    sys.argv = ["tunesmith", *map(str, args)]
    try:
        cli.main()
        return 0
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        sys.argv = old
