"""Intermediate-task fine-tuning against direct fine-tuning on legal summarization.

Run:  .venv/bin/python benchmarks/stages.py

`tunesmith train examples/staged-legal.yaml` (Alpaca stage, merged, then legal summarization) and
`tunesmith train examples/legal-summarization.yaml` (legal summarization from the plain base), one
after the other. Writes benchmarks/results/stages.json; stages.md is written from it by hand.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "benchmarks" / "results" / "runs"


def main() -> None:
    results = {}
    for name, config in (("staged", "examples/staged-legal.yaml"), ("direct", "examples/legal-summarization.yaml")):
        run_name = "staged-legal" if name == "staged" else "direct-legal"
        start = time.time()
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "tunesmith",
                "train",
                config,
                "--overwrite",
                f"name={run_name}",
                f"output_dir={RUNS}",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        row = {"config": config, "exit": res.returncode, "wall_s": round(time.time() - start, 1)}
        if res.returncode == 0:
            report = json.loads((RUNS / run_name / "eval.json").read_text())
            row.update(
                base=report["base"]["validation"],
                finetuned=report["finetuned"]["validation"],
                stages=report.get("stages"),
            )
        else:
            row["error"] = res.stderr[-2000:]
        results[name] = row
        print(json.dumps({k: v for k, v in row.items() if k != "stages"})[:1500], flush=True)
    (ROOT / "benchmarks" / "results" / "stages.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
