"""User errors: anything the user can fix (config, data, paths) exits with code 2 and no traceback."""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix. The CLI prints ``problems`` (one per line) and exits 2."""

    exit_code = 2

    def __init__(self, title: str, problems: list[str] | None = None, hint: str | None = None):
        self.title = title
        self.problems = list(problems or [])
        self.hint = hint
        super().__init__(self.render())

    def render(self) -> str:
        lines = [self.title]
        lines += [f"  - {p}" for p in self.problems]
        if self.hint:
            lines.append(self.hint)
        from tunesmith.security import redact

        return redact("\n".join(lines))


class ConfigError(UserError):
    pass


class DataError(UserError):
    pass


class TrainingHalted(Exception):
    """Training cannot go on (e.g. only non-finite steps); the last committed checkpoint is intact."""

    exit_code = 3
