"""Console output a person reads: the derived numbers at start, the before/after verdict at the end."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from tunesmith.models import count_parameters
from tunesmith.training.progress import console

# Metrics shown in the before/after table, in this order, with whether higher is better.
SHOWN = {"loss": False, "perplexity": False, "accuracy": True, "macro_f1": True, "rouge1": True, "rouge2": True,
         "rougeL": True, "bleu4": True, "coverage": True, "all_concepts": True, "mean_output_words": None,
         "stopped_on_own": True}


def print_setup(s) -> None:
    cfg, rep = s.cfg, s.examples.report
    trainable, total = count_parameters(s.accelerator.unwrap_model(s.model))
    t = cfg.train
    eff = t.batch_size * t.grad_accum * s.accelerator.num_processes
    lines = [
        f"task       {cfg.task_name}; model {cfg.model.name} on {s.accelerator.device}, {cfg.peft.method}",
        f"params     {trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%)",
        "data       " + ", ".join(f"{k} {v}" for k, v in rep["rows"].items()) + f"; fingerprint {rep['fingerprint'][:12]}",
        f"batch      {t.batch_size} x {t.grad_accum} accum x {s.accelerator.num_processes} proc = {eff} rows/step",
        f"steps      {s.plan.steps_per_epoch}/epoch, {s.total_steps} total, lr {t.lr:g} {t.schedule}",
    ]
    if s.dp is not None:
        lines[3], *more = privacy_lines(s)
        lines += more
    for name, info in rep.get("tokens", {}).items():
        cut = {k: v for k, v in info.items() if k not in ("rows", "token_lengths") and v}
        lens = info["token_lengths"]
        lines.append(f"tokens     {name}: p50 {lens.get('p50')} p95 {lens.get('p95')} max {lens.get('max')}"
                     + (f"; {cut}" if cut else ""))
    removed = {k: v for k, v in rep.items() if ("duplicates" in k or "overlap" in k) and v and any(
        (v.values() if isinstance(v, dict) else [v]))}
    if removed or rep.get("bad_rows"):
        lines.append(f"removed    {removed} bad rows {rep.get('bad_rows') or {}}")
    console.print("\n".join(lines), soft_wrap=True)


def privacy_lines(s) -> list[str]:
    """The DP-SGD batch line (Poisson sampling), then clipping and noise, and which values came from the DP
    recipe (privacy: defaults) rather than from the config."""
    d, p = s.dp, s.cfg.privacy
    budget = f"target epsilon {p.target_epsilon:g}" if p.target_epsilon is not None else "no epsilon target"
    lines = [f"batch      Poisson: {s.plan.rows_per_step:,} {p.unit}s per step expected, in micro-batches of "
             f"{s.plan.micro_size} rows ({p.grad_sample_mode} per-example norms)",
             f"privacy    DP-SGD, {p.unit}-level: Poisson rate q={d.sample_rate:.4g} of {d.n_units} units, "
             f"clip C={p.max_grad_norm:g}, noise multiplier {d.sigma:.3f}, delta {d.delta:.3g}, {budget} "
             f"({p.accountant})"]
    if p.applied:
        lines.append("DP recipe  " + ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in p.applied.items())
                     + " (Li et al. 2021, Yu et al. 2021: privacy defaults for keys the config leaves unset)")
    return lines


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) and abs(v) < 10 else f"{v:.2f}" if isinstance(v, float) else str(v)


def _change(b, f, higher_better) -> str:
    if not isinstance(b, (int, float)) or not isinstance(f, (int, float)):
        return "-"
    delta = f - b
    mark = "" if higher_better is None or delta == 0 else (" ✓" if (delta > 0) == higher_better else " ✗")
    return f"{delta:+.4g}{mark}"


def verdict_rows(report: dict) -> list[tuple[str, str, object, object, bool | None]]:
    """(split, metric, base, fine-tuned, higher is better) for every number the verdict shows: the task's
    metrics, the prompting baselines against the fine-tuned model, and retention perplexity."""
    base, ft = report.get("base", {}), report.get("finetuned", {})
    rows = []
    for split in [k for k in ft if isinstance(ft[k], dict) and k not in ("samples", "retention", "forgetting")]:
        for metric, higher in SHOWN.items():
            if metric in ft[split]:
                rows.append((split, metric, base.get(split, {}).get(metric), ft[split][metric], higher))
    for name, per_split in base.get("baselines", {}).items():  # prompting baselines against the fine-tuned model
        for split, metrics in per_split.items():
            for metric, higher in SHOWN.items():
                if metric in metrics and metric not in ("loss", "perplexity", "mean_output_words"):
                    rows.append((split, f"{metric} vs {name}", metrics[metric], ft.get(split, {}).get(metric), higher))
    for name, m in ft.get("retention", {}).items():
        b = base.get("retention", {}).get(name, {}).get("perplexity")
        rows.append((f"retention:{name}", "perplexity", b, m["perplexity"], False))
    return rows


def before_after_table(report: dict) -> Table:
    table = Table(title=f"Before / after fine-tuning ({report.get('task', '')}, held-out data)")
    for col in ("split", "metric", "base", "fine-tuned", "change"):
        table.add_column(col, justify="left" if col in ("split", "metric") else "right")
    for split, metric, b, f, higher in verdict_rows(report):
        table.add_row(split, metric, _fmt(b), _fmt(f), _change(b, f, higher))
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


def stage_rows(rows: list[dict]) -> tuple[list[str], list[list]]:
    """Header and rows of the stages table: each stage's own validation loss, then the final task's
    metrics after that stage (up to four, those every stage has)."""
    keys = [k for k in SHOWN if all(isinstance(r["final_task"].get(k), (int, float)) for r in rows)][:4]
    return (["stage", "task", "own loss", *(f"final-task {k}" for k in keys)],
            [[r["stage"], r["task"], r["own"].get("loss"), *(r["final_task"][k] for k in keys)] for r in rows])


def print_stages(rows: list[dict]) -> None:
    header, body = stage_rows(rows)
    table = Table(title="Stages: the final task's validation metrics after each stage")
    for col in header:
        table.add_column(col, justify="left" if col in ("stage", "task") else "right")
    for stage, task, *numbers in body:
        table.add_row(stage, task, *map(_fmt, numbers))
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
        model = next((line.split(":", 1)[1].strip() for line in (path / "config.yaml").read_text().splitlines()
                      if line.startswith("  name:")), "-")
        ft, base = report.get("finetuned", {}).get("validation", {}), report.get("base", {}).get("validation", {})
        metric = next((m for m in SHOWN if m != "loss" and isinstance(ft.get(m), (int, float))), "loss")
        took = info["finished"] - info["started"] if info.get("finished") and info.get("started") else None
        table.add_row(path.name, str(info.get("task", "-")), model[-40:], metric, _fmt(base.get(metric)),
                      _fmt(ft.get(metric)), f"{took:.0f}" if took else "-", RunDir(path).status())
    return table
