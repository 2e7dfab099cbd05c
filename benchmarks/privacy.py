"""Privacy benchmark: Rotten Tomatoes accuracy of the DP example as shipped (epsilon 8) against the
same config without privacy, and canary exposure without and with DP (SmolLM2-135M + LoRA on short CommonGen sentences).

Run:  .venv/bin/python benchmarks/privacy.py [--only rt|canary] [--epsilons 8 3 1]

Every run is the real CLI (`tunesmith train`, `tunesmith audit`) in its own process. Writes
benchmarks/results/privacy.json; privacy.md is written from it by hand.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "benchmarks" / "results" / "runs"
SHARED = ROOT.parent / "shared" / "data"


def tunesmith(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunesmith", *args], cwd=ROOT, capture_output=True, text=True)


DP_EXAMPLE = "examples/sentiment-rotten-tomatoes-dp.yaml"
# Issue 17: the private run at most 3 points below the same config without privacy, and at least 84%.
MAX_GAP, MIN_ACCURACY = 3.0, 84.0


def rotten_tomatoes(epsilons: list[str]) -> dict:
    """The DP example as shipped at each epsilon, and the same config with `privacy=null`: the rows differ
    by the privacy block (and the twin's evaluation cadence) only."""
    rows = []
    for eps in ["inf", *epsilons]:
        name = f"privacy-rt-eps{eps}"
        # Without privacy a step is one micro-batch, so the example's eval.every (counted in DP steps of
        # privacy.expected_batch_size rows) would evaluate far more often. Only the final evaluation is read.
        twin = ["privacy=null", "eval.every=null"]
        privacy = twin if eps == "inf" else [f"privacy.target_epsilon={eps}"]
        start = time.time()
        res = tunesmith("train", DP_EXAMPLE, "--overwrite", f"name={name}", f"output_dir={RUNS}", *privacy)
        row = {"epsilon_target": eps, "exit": res.returncode, "wall_s": round(time.time() - start, 1)}
        if res.returncode == 0:
            report = json.loads((RUNS / name / "eval.json").read_text())
            val = report["finetuned"]["validation"]
            row.update(
                accuracy=val["accuracy"],
                macro_f1=val.get("macro_f1"),
                epsilon=report.get("epsilon"),
                delta=report.get("delta"),
                privacy=report.get("privacy"),
                steps=report["training"]["steps"],
            )
        else:
            row["error"] = res.stderr[-1500:]
        print(json.dumps(row), flush=True)
        rows.append(row)
    plain = rows[0].get("accuracy")
    for row in rows[1:]:
        if plain is not None and row.get("accuracy") is not None:
            row["gap"] = round(plain - row["accuracy"], 2)
            row["met"] = row["gap"] <= MAX_GAP and row["accuracy"] >= MIN_ACCURACY
    return {"config": DP_EXAMPLE, "target": f"gap <= {MAX_GAP} points and accuracy >= {MIN_ACCURACY}", "rows": rows}


def canary(epochs: float, references: int) -> dict:
    """A short-text continued-pretraining run (CommonGen targets as plain text), audited with canaries."""
    data = RUNS / "privacy-canary-data.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    with open(SHARED / "commongen" / "train.jsonl", encoding="utf-8") as f, open(data, "w", encoding="utf-8") as out:
        for i, line in enumerate(f):
            if i >= 600:
                break
            out.write(json.dumps({"text": json.loads(line)["target"]}) + "\n")
    cfg = {
        "name": "privacy-canary",
        "output_dir": str(RUNS),
        "model": {"name": "smollm2-135m-instruct"},
        "peft": {"method": "lora", "r": 16, "dropout": 0.0},
        "data": {"train": str(data), "format": "text", "max_length": 64, "overlength": "drop"},
        "train": {
            "epochs": epochs,
            "lr": 2e-3,
            "batch_size": 16,
            "warmup_ratio": 0.0,
            "schedule": "constant",
            "log_every": 10,
        },
        "eval": {"batch_size": 64, "samples": 0, "before_after": False, "max_rows": 100},
    }
    run = RUNS / "privacy-canary"
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))  # the audit reads the run's config only
    start = time.time()
    res = tunesmith("audit", str(run), "--canaries", "--references", str(references))
    result = {"exit": res.returncode, "wall_s": round(time.time() - start, 1), "config": cfg}
    if res.returncode == 0:
        result["audit"] = json.loads((run / "audit.json").read_text())
    else:
        result["error"] = res.stderr[-2000:]
    print(json.dumps({k: v for k, v in result.items() if k != "config"})[:2000], flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["rt", "canary"])
    ap.add_argument(
        "--epsilons", nargs="*", default=["8"], help="epsilon targets (the example ships 8); no privacy runs first"
    )
    ap.add_argument("--canary-epochs", type=float, default=2)
    ap.add_argument("--references", type=int, default=10_000)
    a = ap.parse_args()
    path = ROOT / "benchmarks" / "results" / "privacy.json"
    fresh = {}
    if a.only in (None, "rt"):
        fresh["rotten_tomatoes"] = rotten_tomatoes(a.epsilons)
    if a.only in (None, "canary"):
        fresh["canary"] = canary(a.canary_epochs, a.references)
    results = json.loads(path.read_text()) if path.exists() else {}  # read late: the parts may run at once
    path.write_text(json.dumps({**results, **fresh}, indent=2) + "\n")


if __name__ == "__main__":
    main()
