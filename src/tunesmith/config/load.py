"""A config from YAML plus dotted ``key=value`` overrides, from a dict, or derived from another config.

Every problem is reported at once with its dotted path, before any model or data is loaded.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from tunesmith.config.base import format_validation_error
from tunesmith.config.schema import Config
from tunesmith.config.yaml_loader import YAML_ERRORS, DuplicateKey, load_yaml
from tunesmith.errors import ConfigError


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError("Bad override", [f"{dotted}: '{k}' is a value, not a section"])
        node = nxt
    node[keys[-1]] = value


def flatten(tree: dict, prefix: str = "") -> dict:
    """A nested config tree as {dotted.key: leaf value} (the inverse of setting dotted keys)."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    parsed, problems = [], []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
            problems.append(f"'{item}': expected dotted.key=value")
            continue
        try:
            value = load_yaml(raw) if raw != "" else ""
        except DuplicateKey as err:
            problems.append(f"'{key}': {err.problem}")
            continue
        except YAML_ERRORS:
            value = raw  # a plain string the YAML parser dislikes (e.g. "a: b") is still a string
        if isinstance(value, str):
            try:
                value = float(value) if re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value) else value
            except ValueError:
                pass  # YAML 1.1 reads 1e-4 as a string; users mean the number
        parsed.append((key, value))
    if problems:
        raise ConfigError("Bad command-line overrides", problems)
    return parsed


def config_from_dict(tree: dict, source: str = "config") -> Config:
    from tunesmith.security import config_path_problems

    try:
        cfg = Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(f"Invalid configuration ({source}):", format_validation_error(err)) from None
    problems = config_path_problems(cfg)
    if problems:
        raise ConfigError(f"Refused paths ({source}):", problems)
    return cfg


def derive(cfg: Config, changes: dict[str, Any], source: str, drop: tuple[str, ...] = ()) -> Config:
    """A config made from another (a search trial, a curve point, an audit variant): top-level sections
    dropped, dotted keys set, and the result validated like a file."""
    tree = cfg.model_dump(mode="json", exclude=set(drop))
    for key, value in changes.items():
        _set_dotted(tree, key, value)
    return config_from_dict(tree, source)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    tree: dict = {}
    source = "overrides"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"Config file not found: {p}")
        try:
            tree = load_yaml(p.read_text(encoding="utf-8")) or {}
        except (*YAML_ERRORS, UnicodeDecodeError) as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{p}:{mark.line + 1}" if mark else str(p)
            raise ConfigError("Config is not valid YAML", [f"{where}: {getattr(err, 'problem', err)}"]) from None
        if not isinstance(tree, dict):
            raise ConfigError("Config must be a YAML mapping", [f"{p}: top level is {type(tree).__name__}"])
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    return config_from_dict(tree, source)


def dump_config(cfg: Config) -> str:
    from tunesmith.security import redact_obj

    return yaml.safe_dump(redact_obj(cfg.model_dump(mode="json")), sort_keys=False, allow_unicode=True)
