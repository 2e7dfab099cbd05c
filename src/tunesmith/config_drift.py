"""Refuse to resume a run whose configuration changed: a silent mix of two runs helps no one."""

from __future__ import annotations

import hashlib

from tunesmith.config import Config, flatten
from tunesmith.errors import UserError
from tunesmith.rundir import RunDir
from tunesmith.security import redact_obj

# Changing these does not change what the finished steps computed.
HARMLESS = {
    "train.resume",
    "train.max_steps",
    "train.epochs",
    "train.save_every",
    "train.save_total_limit",
    "train.log_every",
    "eval.every",
    "eval.samples",
    "eval.max_new_tokens",
    "eval.batch_size",
}


def secret_hashes(cfg: Config) -> dict[str, str]:
    """sha256 of each value that redaction hides, so a changed secret still counts as drift."""
    raw, shown = flatten(cfg.model_dump(mode="json")), flatten(redact_obj(cfg.model_dump(mode="json")))
    return {k: hashlib.sha256(str(raw[k]).encode()).hexdigest() for k in raw if raw[k] != shown.get(k)}


def config_drift(old: Config, new: Config, old_hashes: dict[str, str] | None = None) -> list[str]:
    # The stored snapshot has its secrets redacted; compare the live config in the same form.
    a, b = flatten(redact_obj(old.model_dump(mode="json"))), flatten(redact_obj(new.model_dump(mode="json")))
    drift = [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k) and k not in HARMLESS
    ]
    new_hashes = secret_hashes(new)
    for k, digest in (old_hashes or {}).items():
        if new_hashes.get(k) != digest and k not in HARMLESS and not any(d.startswith(f"{k}:") for d in drift):
            drift.append(f"{k}: {a.get(k)!r} -> {b.get(k)!r} (a redacted secret changed)")
    return drift


def check_drift(run: RunDir, cfg: Config, allow: bool = False) -> None:
    if not (run / "config.yaml").exists():
        return
    drift = config_drift(run.config(), cfg, run.read_json("run.json", {}).get("secret_hashes"))
    if drift and not allow:
        raise UserError(
            f"Refusing to resume {run.path}: the configuration changed",
            drift,
            hint="Resume with the original settings, start a new run (name=...), or pass "
            "--allow-drift (recorded in run.json).",
        )
    if drift:
        run.update_run(drift=run.read_json("run.json", {}).get("drift", []) + drift)
