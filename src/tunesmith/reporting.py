"""Console output a person reads: the derived numbers at start, the before/after verdict at the end."""

from __future__ import annotations

from rich.table import Table

from tunesmith.models import count_parameters
from tunesmith.training.progress import console


def print_setup(s) -> None:
    cfg, rep = s.cfg, s.examples.report
    trainable, total = count_parameters(s.accelerator.unwrap_model(s.model))
    t = cfg.train
    eff = t.batch_size * t.grad_accum * s.accelerator.num_processes
    lines = [
        f"model      {cfg.model.name} ({s.model_path}) on {s.accelerator.device}, {cfg.peft.method}",
        f"params     {trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%)",
        f"data       " + ", ".join(f"{k} {v}" for k, v in rep["rows"].items()) + f"; fingerprint {rep['fingerprint'][:12]}",
        f"batch      {t.batch_size} x {t.grad_accum} accum x {s.accelerator.num_processes} proc = {eff} rows/step",
        f"steps      {s.plan.steps_per_epoch}/epoch, {s.total_steps} total, lr {t.lr:g} {t.schedule}",
    ]
    for name, info in rep.get("tokens", {}).items():
        cut = {k: v for k, v in info.items() if k not in ("rows", "token_lengths") and v}
        lens = info["token_lengths"]
        lines.append(f"tokens     {name}: p50 {lens.get('p50')} p95 {lens.get('p95')} max {lens.get('max')}"
                     + (f"; {cut}" if cut else ""))
    removed = {k: v for k, v in rep.items() if ("duplicates" in k or "overlap" in k) and v}
    if removed or rep.get("bad_rows"):
        lines.append(f"removed    {removed} bad rows {rep.get('bad_rows') or {}}")
    console.print("\n".join(lines))


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def before_after_table(report: dict) -> Table:
    table = Table(title="Before / after fine-tuning (held-out data)")
    for col in ("split", "metric", "base", "fine-tuned", "change"):
        table.add_column(col, justify="left" if col in ("split", "metric") else "right")
    base, ft = report.get("base", {}), report.get("finetuned", {})
    for split in ("validation", "test"):
        if split not in ft:
            continue
        for metric in ("loss", "perplexity"):
            b, f = base.get(split, {}).get(metric), ft[split].get(metric)
            change = f"{100 * (f - b) / b:+.1f}%" if b else "-"
            table.add_row(split, metric, _fmt(b), _fmt(f), change)
    return table


def print_before_after(report: dict) -> None:
    console.print(before_after_table(report))
    for sample in report.get("samples", []):
        console.print(f"[bold]prompt[/]     {str(sample['prompt'])[:300]}")
        for key in ("base", "finetuned", "reference"):
            console.print(f"[bold]{key:10}[/] {str(sample.get(key))[:300]}")
        console.print()
