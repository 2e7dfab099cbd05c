"""Experiment trackers (TensorBoard, MLflow, W&B) through accelerate's tracker integration.

None is required: the run directory is always written, and trackers get the same numbers. They live
under <run>/trackers/ (TensorBoard event files; an MLflow SQLite store) unless log.mlflow_uri names
another tracking server.
"""

from __future__ import annotations

import math

from tunesmith.config import Config, flatten


def accelerator_kwargs(cfg: Config, run_path) -> dict:
    if not cfg.log.trackers:
        return {}
    return {"log_with": list(cfg.log.trackers), "project_dir": str(run_path / "trackers")}


def start(accelerator, cfg: Config, run_path) -> None:
    if not cfg.log.trackers:
        return
    if "mlflow" in cfg.log.trackers:
        import mlflow

        folder = run_path / "trackers"
        folder.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(cfg.log.mlflow_uri or f"sqlite:///{(folder / 'mlflow.db').resolve()}")
    flat = {k: v for k, v in flatten(cfg.model_dump(mode="json")).items() if isinstance(v, (int, float, str, bool))}
    init = {"mlflow": {"run_name": cfg.name}, "tensorboard": {}, "wandb": {"name": cfg.name}}
    accelerator.init_trackers(
        cfg.log.project or cfg.name, config=flat, init_kwargs={k: v for k, v in init.items() if k in cfg.log.trackers}
    )


def log(accelerator, cfg: Config, record: dict, step: int) -> None:
    """The numeric values of a metrics record (evaluations under eval/)."""
    if not cfg.log.trackers:
        return
    values = {k: v for k, v in record.items() if k not in ("step", "time") and _number(v)}
    values.update({f"eval/{k}": v for k, v in (record.get("eval") or {}).items() if _number(v)})
    if values:
        accelerator.log(values, step=step)


def finish(accelerator, cfg: Config) -> None:
    if cfg.log.trackers:
        accelerator.end_training()


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
