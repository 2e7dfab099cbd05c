"""Spanish adaptation three ways: LoRA, LoRA + replay of English text, full fine-tuning.
Spanish perplexity gained against English (WikiText-2) perplexity lost.

Run:  .venv/bin/python benchmarks/forgetting.py [--steps 30]

Each variant is `tunesmith train examples/spanish-adaptation.yaml` with overrides, in its own process.
Replay draws from WikiText-2 *test* rows; forgetting is measured on WikiText-2 *validation* rows.
Writes benchmarks/results/forgetting.json; the .md is written from it by hand.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "lora": [],
    "lora+replay": ["retention.replay.data=../shared/data/wikitext2/test.jsonl", "retention.replay.fraction=0.2"],
    "full": ["peft.method=full", "train.lr=5e-5"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--eval-rows", type=int, default=100)
    a = ap.parse_args()
    out, results = ROOT / "benchmarks" / "results", []
    for name, extra in VARIANTS.items():
        overrides = [
            f"train.max_steps={a.steps}",
            f"eval.max_rows={a.eval_rows}",
            "output_dir=benchmarks/results/runs",
            f"name=forgetting-{name.replace('+', '-')}",
            *extra,
        ]
        start = time.time()
        res = subprocess.run(
            [sys.executable, "-m", "tunesmith", "train", "examples/spanish-adaptation.yaml", "--overwrite", *overrides],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        run = ROOT / "benchmarks" / "results" / "runs" / f"forgetting-{name.replace('+', '-')}"
        row = {"variant": name, "overrides": overrides, "exit": res.returncode, "wall_s": round(time.time() - start, 1)}
        if res.returncode == 0:
            report = json.loads((run / "eval.json").read_text())
            es = [report[w]["validation"]["perplexity"] for w in ("base", "finetuned")]
            en = [report[w]["retention"]["wikitext2-en"]["perplexity"] for w in ("base", "finetuned")]
            row.update(
                spanish_ppl=es,
                english_ppl=en,
                spanish_gain=round(1 - es[1] / es[0], 4),
                english_loss=round(en[1] / en[0] - 1, 4),
            )
        else:
            row["error"] = res.stderr[-1500:]
        results.append(row)
        print(json.dumps(row), flush=True)
    (out / "forgetting.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
