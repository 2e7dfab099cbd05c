"""Console output a person reads: the derived numbers at start, the before/after verdict at the end."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from tunesmith.console import console
from tunesmith.models import count_parameters
from tunesmith.report.numbers import change, fmt, headline, stage_rows, verdict_rows


def print_setup(s) -> None:
    cfg, rep = s.cfg, s.data.examples.report
    trainable, total = count_parameters(s.accelerator.unwrap_model(s.model))
    t = cfg.train
    eff = t.batch_size * t.grad_accum * s.accelerator.num_processes
    lines = [
        f"task       {cfg.task_name}; model {cfg.model.name} on {s.accelerator.device}, {cfg.peft.method}",
        f"params     {trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%)",
        "data       "
        + ", ".join(f"{k} {v}" for k, v in rep["rows"].items())
        + f"; fingerprint {rep['fingerprint'][:12]}",
        f"batch      {t.batch_size} x {t.grad_accum} accum x {s.accelerator.num_processes} proc = {eff} rows/step",
        f"steps      {s.optim.plan.steps_per_epoch}/epoch, {s.optim.total_steps} total, lr {t.lr:g} {t.schedule}"
        + (f", head {t.head_lr:g}" if t.head_lr else "")
        + (f", layer decay {t.layer_decay:g}" if t.layer_decay else ""),
    ]
    if s.optim.dp is not None:
        lines[3], *more = privacy_lines(s)
        lines += more
    for name, info in rep.get("tokens", {}).items():
        cut = {k: v for k, v in info.items() if k not in ("rows", "token_lengths", "length_histogram") and v}
        lens = info["token_lengths"]
        lines.append(
            f"tokens     {name}: p50 {lens.get('p50')} p95 {lens.get('p95')} max {lens.get('max')}"
            + (f"; {cut}" if cut else "")
        )
    removed = {
        k: v
        for k, v in rep.items()
        if ("duplicates" in k or "overlap" in k) and v and any((v.values() if isinstance(v, dict) else [v]))
    }
    if removed or rep.get("bad_rows"):
        lines.append(f"removed    {removed} bad rows {rep.get('bad_rows') or {}}")
    console.print("\n".join(lines), soft_wrap=True)


def privacy_lines(s) -> list[str]:
    """The DP-SGD batch line (Poisson sampling), then clipping and noise, and which values came from the DP
    recipe (privacy: defaults) rather than from the config."""
    d, p = s.optim.dp, s.cfg.privacy
    budget = f"target epsilon {p.target_epsilon:g}" if p.target_epsilon is not None else "no epsilon target"
    lines = [
        f"batch      Poisson: {s.optim.plan.rows_per_step:,} {p.unit}s per step expected, in micro-batches of "
        f"{s.optim.plan.micro_size} rows ({p.grad_sample_mode} per-example norms)",
        f"privacy    DP-SGD, {p.unit}-level: Poisson rate q={d.sample_rate:.4g} of {d.n_units} units, "
        f"clip C={p.max_grad_norm:g}, noise multiplier {d.sigma:.3f}, delta {d.delta:.3g}, {budget} "
        f"({p.accountant})",
    ]
    if p.applied:
        lines.append(
            "DP recipe  "
            + ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in p.applied.items())
            + " (Li et al. 2021, Yu et al. 2021: privacy defaults for keys the config leaves unset)"
        )
    return lines


def before_after_table(report: dict) -> Table:
    table = Table(title=f"Before / after fine-tuning ({report.get('task', '')}, held-out data)")
    for col in ("split", "metric", "base", "fine-tuned", "change"):
        table.add_column(col, justify="left" if col in ("split", "metric") else "right")
    for split, metric, b, f, higher in verdict_rows(report):
        table.add_row(split, metric, fmt(b), fmt(f), change(b, f, higher))
    if "note" in report.get("base", {}):
        table.caption = f"base: {report['base']['note']}"
    return table


def print_before_after(report: dict) -> None:
    console.print(before_after_table(report))
    for sample in report.get("samples", []):
        console.print(f"[bold]prompt[/]     {escape(str(sample.get('prompt'))[:300])}")
        for key in ("base", "finetuned", "reference"):
            console.print(f"[bold]{key:10}[/] {escape(str(sample.get(key))[:300])}")
        console.print()


def print_stages(rows: list[dict]) -> None:
    header, body = stage_rows(rows)
    table = Table(title="Stages: the final task's validation metrics after each stage")
    for col in header:
        table.add_column(col, justify="left" if col in ("stage", "task") else "right")
    for stage, task, *numbers in body:
        table.add_row(stage, task, *map(fmt, numbers))
    console.print(table)


def runs_table(folder) -> Table:
    """One row per run directory under `folder` (those with a config.yaml)."""
    import json
    from pathlib import Path

    from tunesmith.rundir import RunDir

    table = Table(title=f"Runs in {folder}")
    for col in ("run", "task", "model", "metric", "base", "fine-tuned", "seconds", "status"):
        table.add_column(col, justify="right" if col in ("base", "fine-tuned", "seconds") else "left")
    for path in sorted(p for p in Path(folder).iterdir() if (p / "config.yaml").is_file()):
        info = json.loads((path / "run.json").read_text()) if (path / "run.json").exists() else {}
        report = json.loads((path / "eval.json").read_text()) if (path / "eval.json").exists() else {}
        model = next(
            (
                line.split(":", 1)[1].strip()
                for line in (path / "config.yaml").read_text().splitlines()
                if line.startswith("  name:")
            ),
            "-",
        )
        metric, base_value, ft_value = headline(report)
        took = info["finished"] - info["started"] if info.get("finished") and info.get("started") else None
        table.add_row(
            path.name,
            str(info.get("task", "-")),
            model[-40:],
            metric,
            fmt(base_value),
            fmt(ft_value),
            f"{took:.0f}" if took else "-",
            RunDir(path).status(),
        )
    return table
