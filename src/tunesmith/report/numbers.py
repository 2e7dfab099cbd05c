"""The numbers every view of a run shows (console, HTML page, comparison), and how they are written."""

from __future__ import annotations

# Metrics shown in the before/after table, in this order, with whether higher is better.
SHOWN = {
    "loss": False,
    "perplexity": False,
    "accuracy": True,
    "macro_f1": True,
    "preference_accuracy": True,  # preference pairs: the answer the model finds likelier per token is chosen
    "reward_accuracy": True,  # the implicit reward prefers chosen (0 for the base: it is the reference)
    "reward_margin": True,
    "logp_chosen": True,
    "logp_rejected": False,
    "rouge1": True,
    "rouge2": True,
    "rougeL": True,
    "bleu4": True,
    "coverage": True,
    "all_concepts": True,
    "mean_output_words": None,
    "stopped_on_own": True,
}


def fmt(v) -> str:
    """A number as the tables show it: 4 decimals under 10, 2 above, "-" for none."""
    return (
        "-"
        if v is None
        else f"{v:.4f}"
        if isinstance(v, float) and abs(v) < 10
        else f"{v:.2f}"
        if isinstance(v, float)
        else str(v)
    )


# A run's one number, by task: a classifier's accuracy, constrained generation's concept coverage, the
# generation tasks' ROUGE-L, language modelling's perplexity (the first of these a run has); preference
# tuning's preference accuracy.
HEADLINE = ("accuracy", "preference_accuracy", "coverage", "rougeL", "perplexity")


def headline(report: dict) -> tuple[str, object, object]:
    """A run's task metric on validation, the first of HEADLINE it has, else loss: (name, base, fine-tuned)."""
    base = report.get("base", {}).get("validation", {})
    ft = report.get("finetuned", {}).get("validation", {})
    metric = next((m for m in HEADLINE if isinstance(ft.get(m), (int, float))), "loss")
    return metric, base.get(metric), ft.get(metric)


def change(b, f, higher_better) -> str:
    """Fine-tuned minus base, marked ✓ when it moved the good way and ✗ when the bad way."""
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
    not_splits = ("samples", "retention", "forgetting", "decoding")
    for split in [k for k in ft if isinstance(ft[k], dict) and k not in not_splits]:
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


def stage_rows(rows: list[dict]) -> tuple[list[str], list[list]]:
    """Header and rows of the stages table: each stage's own validation loss, then the final task's
    metrics after that stage (up to four, those every stage has)."""
    keys = [k for k in SHOWN if all(isinstance(r["final_task"].get(k), (int, float)) for r in rows)][:4]
    return (
        ["stage", "task", "own loss", *(f"final-task {k}" for k in keys)],
        [[r["stage"], r["task"], r["own"].get("loss"), *(r["final_task"][k] for k in keys)] for r in rows],
    )
