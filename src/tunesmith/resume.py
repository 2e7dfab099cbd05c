"""Refuse to resume a run whose configuration changed: a silent mix of two runs helps no one."""

from __future__ import annotations

from tunesmith.config import Config
from tunesmith.errors import UserError
from tunesmith.rundir import RunDir

# Changing these does not change what the finished steps computed.
HARMLESS = {"train.resume", "train.max_steps", "train.epochs", "train.save_every", "train.save_total_limit", "train.log_every",
            "eval.every", "eval.samples", "eval.max_new_tokens", "eval.batch_size"}


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def config_drift(old: Config, new: Config) -> list[str]:
    a, b = _flat(old.model_dump(mode="json")), _flat(new.model_dump(mode="json"))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k not in HARMLESS]


def check_drift(run: RunDir, cfg: Config, allow: bool = False) -> None:
    if not (run / "config.yaml").exists():
        return
    drift = config_drift(run.config(), cfg)
    if drift and not allow:
        raise UserError(f"Refusing to resume {run.path}: the configuration changed", drift,
                        hint="Resume with the original settings, start a new run (name=...), or pass "
                        "--allow-drift (recorded in run.json).")
    if drift:
        run.update_run(drift=run.read_json("run.json", {}).get("drift", []) + drift)
