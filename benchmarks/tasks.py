"""Run every task example with its fixed budget; write base vs fine-tuned results.

Run:  .venv/bin/python benchmarks/tasks.py [--only commongen,legal-summarization] [--out benchmarks/results]

Each example trains in its own process (`tunesmith train examples/<name>.yaml`), so wall time and
peak memory (the child's maximum resident set size, from wait4) belong to that run alone. Results go
to benchmarks/results/tasks.json and tasks.md, with each issue target and whether it was met.

Rows accumulate across invocations (`--only` reruns some examples and keeps the others), so each row
records when it ran and the SHA-256 of the settings of the example file it trained (the parsed YAML, so
an edited comment is not a change); tasks.md says for every row whether those settings have changed since,
i.e. whether the row still measures the example as shipped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

# example -> (split, metric, target check on (base, finetuned), target text)
# The targets are issue 17's (the field's references for models of this size).
TARGETS = {
    "sentiment-rotten-tomatoes": ("accuracy", lambda b, f: f >= 87.5, "accuracy >= 87.5%"),
    "commongen": ("coverage", None, "coverage >= 95%, all concepts in >= 85%, BLEU-4 >= 2x base"),
    "legal-summarization": ("rougeL", lambda b, f: f >= b + 10.0, "ROUGE-L >= base + 10 points"),
    "spanish-adaptation": ("perplexity", None, "perplexity >= 60% below base and English <= +5%"),
    "alpaca-smollm2": ("rougeL", lambda b, f: f > b, "ROUGE-L above base"),
}
SHOWN = (
    "loss",
    "perplexity",
    "accuracy",
    "macro_f1",
    "rouge1",
    "rouge2",
    "rougeL",
    "bleu4",
    "coverage",
    "all_concepts",
    "stopped_on_own",
)


def settings_sha(name: str) -> str:
    settings = yaml.safe_load((ROOT / "examples" / f"{name}.yaml").read_text())
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def as_shipped(r: dict) -> str:
    recorded = r.get("settings_sha256")
    if recorded is None:
        return "unknown (not recorded)"
    if r.get("overrides"):
        return f"no (overrides: {' '.join(r['overrides'])})"
    if not (ROOT / "examples" / f"{r['example']}.yaml").exists():
        return "no (file removed)"
    return "yes" if recorded == settings_sha(r["example"]) else "no (settings changed since)"


def commit() -> str | None:
    res = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True)
    return res.stdout.strip() or None


def run_one(name: str, out_dir: Path, extra: list[str]) -> dict:
    sha, measured, rev = settings_sha(name), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), commit()
    cmd = [
        sys.executable,
        "-m",
        "tunesmith",
        "train",
        str(ROOT / "examples" / f"{name}.yaml"),
        "--overwrite",
        f"output_dir={out_dir / 'runs'}",
        *extra,
    ]
    log = open(out_dir / f"{name}.log", "w")
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - start
    result = {
        "example": name,
        "command": " ".join(["tunesmith", "train", f"examples/{name}.yaml", *extra]),
        "exit": os.waitstatus_to_exitcode(status),
        "wall_s": round(wall, 1),
        "peak_rss_gb": round(usage.ru_maxrss / 1024**2, 2),
        "measured": measured,
        "commit": rev,
        "settings_sha256": sha,
        "overrides": extra,
    }
    report_path = out_dir / "runs" / name / "eval.json"
    if result["exit"] == 0 and report_path.exists():
        report = json.loads(report_path.read_text())
        run = json.loads((out_dir / "runs" / name / "run.json").read_text())
        result["train_s"] = round(run.get("finished", 0) - run.get("started", 0), 1)
        for which in ("base", "finetuned"):
            val = report.get(which, {}).get("validation", {})
            result[which] = {k: val[k] for k in SHOWN if isinstance(val.get(k), (int, float))}
            if "retention" in report.get(which, {}):
                result[which]["retention_ppl"] = {k: v["perplexity"] for k, v in report[which]["retention"].items()}
        result["base_note"] = report.get("base", {}).get("note")
        result["steps"] = report.get("training", {}).get("steps")
        result["target"], result["met"] = judge(name, result)
    return result


def judge(name: str, r: dict) -> tuple[str, bool | None]:
    metric, check, text = TARGETS[name]
    b, f = r["base"].get(metric), r["finetuned"].get(metric)
    if name == "commongen":
        bb, fb = r["base"].get("bleu4", 0.0), r["finetuned"].get("bleu4", 0.0)
        every = r["finetuned"].get("all_concepts", 0.0)
        return text, bool(f is not None and f >= 95.0 and every >= 85.0 and fb >= 2 * bb)
    if name == "spanish-adaptation":
        before, after = r["base"].get("retention_ppl") or {}, r["finetuned"].get("retention_ppl") or {}
        kept = bool(before) and all(after.get(k, float("inf")) <= 1.05 * v for k, v in before.items())
        return text, bool(b is not None and f is not None and f <= 0.4 * b and kept)
    if f is None or (b is None and name != "sentiment-rotten-tomatoes"):
        return text, None
    return text, bool(check(b if b is not None else 0.0, f))


def markdown(results: list[dict]) -> str:
    lines = [
        "# Task benchmarks",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}. Command: `.venv/bin/python benchmarks/tasks.py`.",
        "",
        "Each row is the latest run of that example; *as shipped* compares the settings of the file it trained",
        "(its parsed YAML: comments aside) with examples/ now; a row run with overrides is not the example as",
        "shipped either.",
        "",
        "| example | metric | base | fine-tuned | target | met | steps | wall (s) | peak RSS (GB) | measured "
        "| as shipped |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        when = f"{r.get('measured', 'not recorded')} | {as_shipped(r)}"
        if "base" not in r:
            lines.append(
                f"| {r['example']} | failed (exit {r['exit']}) | | | | | | {r['wall_s']} | {r['peak_rss_gb']} "
                f"| {when} |"
            )
            continue
        # Judged again against today's targets: a row kept from an older run was judged against its day's.
        target, met = judge(r["example"], r)
        metric = TARGETS[r["example"]][0]
        cells = [f"{r['base'].get(metric, float('nan')):.2f}", f"{r['finetuned'].get(metric, float('nan')):.2f}"]
        lines.append(
            f"| {r['example']} | {metric} | {cells[0]} | {cells[1]} | {target} | "
            f"{'yes' if met else 'no' if met is False else '?'} | {r['steps']} | {r['wall_s']} | "
            f"{r['peak_rss_gb']} | {when} |"
        )
    lines += ["", "All validation metrics (base -> fine-tuned):", ""]
    for r in results:
        if "base" in r:
            pairs = ", ".join(
                f"{k} {r['base'].get(k, float('nan')):.2f} -> {v:.2f}"
                for k, v in r["finetuned"].items()
                if isinstance(v, float)
            )
            lines.append(f"- **{r['example']}**: {pairs}")
            before = r["base"].get("retention_ppl") or {}
            for k, v in (r["finetuned"].get("retention_ppl") or {}).items():
                change = f" ({100 * (v / before[k] - 1):+.1f}%)" if before.get(k) else ""
                lines.append(f"  - retention perplexity {k}: {before.get(k, float('nan')):.2f} -> {v:.2f}{change}")
            if r.get("base_note"):
                lines.append(f"  - base: {r['base_note']}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(TARGETS), help="comma-separated example names")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("overrides", nargs="*", help="dotted overrides applied to every example")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "tasks.json"
    results = {r["example"]: r for r in json.loads(json_path.read_text())} if json_path.exists() else {}
    for name in args.only.split(","):
        print(f"== {name}", flush=True)
        results[name] = run_one(name, out, args.overrides)
        print(json.dumps(results[name]), flush=True)
        ordered = [results[n] for n in TARGETS if n in results]
        json_path.write_text(json.dumps(ordered, indent=2) + "\n")
        md_path = out / "tasks.md"
        # The generated part has no second-level heading, so every hand-written section after it survives.
        notes = md_path.read_text().partition("\n## ")[2] if md_path.exists() else ""
        md_path.write_text(markdown(ordered) + (f"\n## {notes}" if notes else ""))


if __name__ == "__main__":
    main()
