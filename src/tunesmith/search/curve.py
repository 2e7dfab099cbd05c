"""`tunesmith curve CONFIG --sizes 16,64,256,all --seeds 3`: a learning curve.

The same config is trained on k training rows (data.train_limit, stratified by label for classifiers)
for each size and seed; validation is the same for every run. The first run also evaluates the base
model, whose rows (majority class, zero-shot and few-shot prompting, per eval.baselines) are drawn as
horizontal lines: the curve shows from which size fine-tuning beats prompting.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from tunesmith.config import Config, derive
from tunesmith.console import console
from tunesmith.errors import UserError


def parse_sizes(text: str) -> list[int | None]:
    sizes: list[int | None] = []
    for part in text.split(","):
        part = part.strip().lower()
        if part == "all":
            sizes.append(None)
        elif part.isdigit() and int(part) > 0:
            sizes.append(int(part))
        else:
            raise UserError(f"--sizes takes positive integers and 'all', got {part!r}")
    if not sizes:
        raise UserError("--sizes is empty")
    return sizes


def run_config(cfg: Config, folder: Path, size: int | None, seed: int, with_base: bool) -> Config:
    # The seed varies the k-row draw and training only: the split keeps the config's seed, so every
    # point is scored on the same validation rows.
    split_seed = cfg.seed if cfg.data.split_seed is None else cfg.data.split_seed
    return derive(
        cfg,
        {
            "name": f"{cfg.name}-k{size or 'all'}-s{seed}",
            "output_dir": str(folder / "runs"),
            "seed": seed,
            "data.train_limit": size,
            "data.sample_seed": seed,
            "data.split_seed": split_seed,
            "eval.before_after": with_base,
            "eval.samples": 0,
            "train.resume": "never",
        },
        f"curve run k={size or 'all'} seed={seed}",
        drop=("search",),
    )


def curve(cfg: Config, sizes: list[int | None], seeds: list[int], metric: str | None = None) -> dict:
    from tunesmith.recipes import recipe_for

    metric = (metric or cfg.train.early_stopping.metric).removeprefix("eval_")
    folder = Path(cfg.output_dir) / f"{cfg.name}-curve"
    points, baselines = [], {}
    for i, size in enumerate(sizes):
        for j, seed in enumerate(seeds):
            rcfg = run_config(cfg, folder, size, seed, with_base=i == 0 and j == 0)
            console.print(f"[bold]curve[/]: k={size or 'all'} seed={seed}")
            run = recipe_for(rcfg).train(rcfg, overwrite=True)
            report = run.read_json("eval.json")
            value = report["finetuned"]["validation"].get(metric)
            if not isinstance(value, (int, float)):
                raise UserError(
                    f"'{metric}' is not a validation metric of this task",
                    hint=f"Pick one of {sorted(report['finetuned']['validation'])} with --metric.",
                )
            rows = run.read_json("data_report.json")["rows"]["train"]
            points.append({"size": size or "all", "rows": rows, "seed": seed, metric: value})
            if "base" in report:
                base = report["base"]
                baselines[base.get("note", "base")] = base["validation"].get(metric)
                for name, per_split in base.get("baselines", {}).items():
                    baselines[name] = per_split["validation"].get(metric)
    result = {"metric": metric, "points": points, "baselines": baselines, "summary": summarise(points, metric)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "curve.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (folder / "curve.md").write_text(table + "\n")
    plot(result, folder / "curve.png")
    console.print(table)
    console.print(f"Curve: {folder / 'curve.md'}, {folder / 'curve.png'}")
    return result


def summarise(points: list[dict], metric: str) -> list[dict]:
    out = []
    for size in dict.fromkeys(p["size"] for p in points):
        values = [p[metric] for p in points if p["size"] == size]
        rows = next(p["rows"] for p in points if p["size"] == size)
        out.append(
            {
                "size": size,
                "rows": rows,
                "runs": len(values),
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "min": min(values),
                "max": max(values),
            }
        )
    return out


def markdown(result: dict) -> str:
    m = result["metric"]
    lines = [f"| k | train rows | runs | {m} mean | std | min | max |", "|---|---|---|---|---|---|---|"]
    lines += [
        f"| {s['size']} | {s['rows']} | {s['runs']} | {s['mean']:.2f} | {s['std']:.2f} | {s['min']:.2f} | "
        f"{s['max']:.2f} |"
        for s in result["summary"]
    ]
    lines += [
        "",
        *(f"- baseline {name}: {m} {v:.2f}" for name, v in result["baselines"].items() if isinstance(v, (int, float))),
    ]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["summary"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.errorbar(
        [x["rows"] for x in s],
        [x["mean"] for x in s],
        yerr=[x["std"] for x in s],
        marker="o",
        capsize=3,
        label="fine-tuned",
    )
    for (name, value), style in zip(result["baselines"].items(), ("--", ":", "-.", "--")):
        if isinstance(value, (int, float)):
            ax.axhline(value, linestyle=style, color="gray", label=name[:40])
    ax.set_xscale("log")
    ax.set_xlabel("training rows (log scale)")
    ax.set_ylabel(f"validation {result['metric']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
