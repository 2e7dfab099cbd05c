"""`tunesmith config keys`: every config key with its dotted path, type, default and description.

Walked from the pydantic schema itself, so the list cannot drift from what `load_config` accepts.
"""

from __future__ import annotations

import json
import textwrap
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))


@dataclass(frozen=True)
class Key:
    path: str
    kind: str  # the type, with its bounds; or what sort of section
    default: str | None  # None: a section (its keys carry the defaults)
    description: str
    required: bool = False


def keys(model: type[BaseModel], prefix: str = "", seen: dict | None = None) -> Iterator[Key]:
    """Depth-first, in schema order. A section class met a second time (stages[].data) is named, not repeated."""
    seen = {} if seen is None else seen
    seen.setdefault(model, prefix.rstrip("."))
    for name, field in model.model_fields.items():
        path = prefix + (field.alias or name)  # the YAML spelling (search's `int:` is the field `integer`)
        inner, suffix, kind = _section(field.annotation)
        if inner is None:
            yield Key(
                path,
                _type(field.annotation) + _bounds(field),
                _default(field),
                field.description or "",
                field.is_required(),
            )
            continue
        text = field.description or (inner.__doc__ or "").strip()
        if inner in seen:
            yield Key(path + suffix, kind, None, f"{text} (same keys as {seen[inner] or 'the top level'})".strip())
            continue
        yield Key(path + suffix, kind, None, text)
        yield from keys(inner, f"{path}{suffix}.", seen)


def render(entries: typing.Iterable[Key]) -> str:
    out = []
    for k in entries:
        default = "; required" if k.required else f"; default {k.default}" if k.default is not None else ""
        out.append(f"{k.path}  ({k.kind}{default})")
        if k.description:
            out.extend(
                textwrap.wrap(" ".join(k.description.split()), 100, initial_indent="    ", subsequent_indent="    ")
            )
    return "\n".join(out) + "\n"


def _section(ann) -> tuple[type[BaseModel] | None, str, str]:
    """The section class inside an annotation, the path suffix its keys sit under, and a word for it."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann, "", "section"
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is list and args:
        inner, _, _ = _section(args[0])
        return inner, "[]", "list of sections"
    if origin is dict and len(args) == 2:
        inner, _, _ = _section(args[1])
        return inner, ".<key>", "mapping of sections"
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            inner, suffix, kind = _section(arg)
            if inner is not None:
                return inner, suffix, kind + (", optional (absent: off)" if type(None) in args else "")
    return None, "", ""


def _type(ann) -> str:
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if ann is type(None):
        return "null"
    if ann is typing.Any:
        return "any"
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type(a) for a in args)}]"
    return getattr(ann, "__name__", str(ann))


def _bounds(field: FieldInfo) -> str:
    parts = []
    for meta in field.metadata:
        parts += [f"{sign} {getattr(meta, attr)}" for attr, sign in BOUNDS if getattr(meta, attr, None) is not None]
        if getattr(meta, "pattern", None):
            parts.append(f"matching {meta.pattern}")
    return "".join(f", {p}" for p in parts)


def _default(field: FieldInfo) -> str | None:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return None
    else:
        value = field.default
    return value if isinstance(value, str) else json.dumps(value)
