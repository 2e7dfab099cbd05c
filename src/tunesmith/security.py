"""Path checks and secret redaction: what a config may read or write, and what never reaches disk.

Paths are resolved (symlinks followed) before they are checked, so `../../etc/passwd` or a link that
escapes an allowed root is caught before anything is read. Secrets are recognised by shape (hub
tokens, API keys, passwords in URLs), not by field name: a token pasted into an innocuous field is
redacted all the same.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

SYSTEM_DIRS = ("/proc", "/sys", "/dev", "/etc", "/boot", "/run", "/var/run")
CREDENTIAL_PARTS = {
    ".ssh",
    ".aws",
    ".gnupg",
    ".docker",
    ".kube",
    ".netrc",
    ".git-credentials",
    ".env",
    ".pypirc",
    "id_rsa",
    "id_ed25519",
    "credentials",
}
SECRET_PATTERNS = [
    re.compile(r"hf_[A-Za-z0-9]{8,}"),  # Hugging Face tokens
    re.compile(r"\b(?:sk|pk|rk)-[A-Za-z0-9_-]{16,}"),  # OpenAI-style keys
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{16,}"),  # GitHub tokens
    re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),  # Slack tokens
    re.compile(r"(?<=://)[^/\s:@]+:[^/\s@]+(?=@)"),  # user:password@ in URLs
    re.compile(r"(?i)([?&](?:token|key|api_key|apikey|secret|password|access_token)=)[^&\s\"']+"),
]
REDACTED = "<redacted>"


def redact(text: str) -> str:
    for pattern in SECRET_PATTERNS:
        # a pattern with a group keeps the group (the `?token=` part) and replaces what follows it
        text = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + REDACTED, text)
    return text


def redact_obj(obj):
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_obj(v) for v in obj]
    return obj


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def path_problem(raw: str, field: str, allowed_roots: list[str], must_exist: bool = False) -> str | None:
    """Why `raw` may not be read (or written), or None. Non-paths (hub ids) are left to their loaders."""
    try:
        p = Path(raw).expanduser()
        exists = p.exists()
        real = os.path.realpath(p)
    except (ValueError, RuntimeError, OSError) as err:  # NUL bytes, ~unknownuser, over-long names
        return f"{field}: not a usable path ({type(err).__name__})"
    if not exists and not raw.startswith((".", "/", "~")) and not must_exist:
        return None  # a hub id such as org/name
    if any(_inside(real, d) for d in SYSTEM_DIRS):
        return f"{field}: {raw} resolves into a system directory ({real})"
    parts = set(Path(real).parts)
    if parts & CREDENTIAL_PARTS:
        return f"{field}: {raw} points at a credentials location ({real})"
    if allowed_roots:
        try:
            roots = [os.path.realpath(Path(r).expanduser()) for r in allowed_roots]
        except (ValueError, RuntimeError, OSError) as err:
            return f"allowed_roots: not a usable path ({type(err).__name__})"
        if not any(_inside(real, r) for r in roots):
            return f"{field}: {raw} resolves to {real}, outside allowed_roots {roots}"
    return None


def output_problem(raw: str, allowed_roots: list[str]) -> str | None:
    try:
        real = os.path.realpath(Path(raw).expanduser())
    except (ValueError, RuntimeError, OSError) as err:
        return f"output_dir: not a usable path ({type(err).__name__})"
    if real in ("/", os.path.realpath(Path.home())):
        return f"output_dir: {raw} is {real}; use a dedicated directory (runs are written and replaced there)"
    return path_problem(raw, "output_dir", allowed_roots)


def config_paths(cfg):
    """(field, path) for every file or directory a config names for reading. One list, so a new field
    cannot slip past the check: stages and `model.adapters` read data and weights like `data.*` does."""
    datas = [("data", cfg.data)] + [(f"stages.{i}.data", st.data) for i, st in enumerate(cfg.stages)]
    for prefix, data in datas:
        for field in ("train", "validation", "test"):
            if getattr(data, field) is not None:
                yield f"{prefix}.{field}", getattr(data, field)
    for i, r in enumerate(cfg.retention.sets):
        yield f"retention.sets.{i}.data", r.data
    if cfg.retention.replay is not None:
        yield "retention.replay.data", cfg.retention.replay.data
    yield "model.name", cfg.model.name
    if cfg.model.gguf_file is not None:
        yield "model.gguf_file", os.path.join(cfg.model.name, cfg.model.gguf_file)
    for i, folder in enumerate(cfg.model.adapters):
        yield f"model.adapters.{i}", folder
    if cfg.eval.baseline_model is not None:
        yield "eval.baseline_model", cfg.eval.baseline_model


def config_path_problems(cfg) -> list[str]:
    roots = cfg.allowed_roots
    problems = [output_problem(cfg.output_dir, roots)]
    problems += [path_problem(value, field, roots) for field, value in config_paths(cfg)]
    return [p for p in problems if p]


def check_path(raw: str, field: str, allowed_roots: list[str]) -> None:
    """The same check for a path named on the command line (e.g. `eval --data`): refuse with exit 2."""
    from tunesmith.errors import UserError

    problem = path_problem(raw, field, allowed_roots)
    if problem:
        raise UserError("Refused path", [problem])


def model_dir_problems(model_dir: str) -> list[str]:
    """A tokenizer config naming a file outside its own directory (`vocab_file: ../../.env`) would make
    the loader read, and save_pretrained copy, that file (transformers#46279)."""
    root = os.path.realpath(model_dir)
    cfg_path = Path(root) / "tokenizer_config.json"
    if not cfg_path.is_file():
        return []
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return [f"{cfg_path}: not valid JSON"]
    problems = []
    for key, value in config.items() if isinstance(config, dict) else []:
        if key.endswith("_file") and isinstance(value, str):
            target = os.path.realpath(Path(root) / value)
            if not _inside(target, root) or Path(target).name in CREDENTIAL_PARTS:
                problems.append(f"{cfg_path}: {key} points outside the model directory ({value})")
    return problems


LOOPBACK = {"127.0.0.1", "localhost", "::1"}  # where a server may listen without a key or token


def claim_port(host: str, port: int) -> str:
    """Refuse (UserError) a port this process cannot listen on, before a model or app is loaded; the host as
    a URL shows it (IPv6 in brackets)."""
    import socket

    from tunesmith.errors import UserError

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as err:
            raise UserError(f"cannot listen on {host}:{port}: {err.strerror}", hint="Pick another --port.") from None
    return f"[{host}]" if ":" in host else host
