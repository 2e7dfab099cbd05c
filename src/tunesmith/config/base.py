"""The base of every config section (unknown keys, bad types and inf/nan are errors, never ignored), and how
pydantic's errors read: one line per problem, with its dotted path."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def format_validation_error(err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        out.append(f"{path}: {msg}")
    return out
