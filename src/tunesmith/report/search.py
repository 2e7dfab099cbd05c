"""A study's trials as a Markdown table, and its plots (metric by trial, parameter importances)."""

from __future__ import annotations

from pathlib import Path

import optuna


def _cell(v) -> str:  # 4 significant digits: a study table compares many trials side by side
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def trials_table(study: optuna.Study, metric: str) -> str:
    trials = study.get_trials(deepcopy=False)
    keys = sorted({k for t in trials for k in t.params})
    lines = [
        f"| trial | state | {metric} | " + " | ".join(keys) + " | last step | seconds |",
        "|---|---|---|" + "---|" * len(keys) + "---|---|",
    ]
    for t in trials:
        value = (
            t.value
            if t.value is not None
            else (t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None)
        )
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        last = max(t.intermediate_values) if t.intermediate_values else "-"
        state = t.state.name.lower() + (f" ({t.user_attrs['stopped']})" if "stopped" in t.user_attrs else "")
        lines.append(
            f"| {t.number} | {state} | {_cell(value) if value is not None else '-'} | "
            + " | ".join(_cell(t.params.get(k, "-")) for k in keys)
            + f" | {last} | {_cell(round(seconds, 1)) if seconds is not None else '-'} |"
        )
    return "\n".join(lines)


def plots(study: optuna.Study, folder: Path, metric: str) -> list[Path]:
    """history.png (every trial's final or last reported value) and, with two or more complete
    trials, importance.png (fANOVA importances of the searched parameters)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(7, 4))
    colours = {"COMPLETE": "tab:blue", "PRUNED": "tab:orange", "FAIL": "tab:red", "RUNNING": "tab:gray"}
    for t in study.get_trials(deepcopy=False):
        value = (
            t.value
            if t.value is not None
            else (t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None)
        )
        if value is not None:
            ax.scatter(t.number, value, color=colours.get(t.state.name, "black"), label=t.state.name.lower())
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys())
    ax.set_xlabel("trial")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title(f"study {study.study_name}")
    fig.tight_layout()
    fig.savefig(folder / "history.png", dpi=100)
    plt.close(fig)
    written.append(folder / "history.png")
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) >= 2 and any(len({str(t.params.get(k)) for t in complete}) > 1 for k in complete[0].params):
        importance = optuna.importance.get_param_importances(study)
        fig, ax = plt.subplots(figsize=(6, 0.5 + 0.5 * len(importance)))
        ax.barh(list(importance), list(importance.values()))
        ax.set_xlabel(f"importance for {metric}")
        fig.tight_layout()
        fig.savefig(folder / "importance.png", dpi=100)
        plt.close(fig)
        written.append(folder / "importance.png")
    return written
