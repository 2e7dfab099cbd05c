"""Preference-tuning throughput and memory: tunesmith's DPO against TRL's DPOTrainer, side by side.

Run:  make preference-data bench
      .venv/bin/python benchmarks/preference.py [--pairs 128] [--steps 8] [--batch-size 8] [--rounds 2]

Both train the same model (the cached SmolLM2-135M-Instruct safetensors) on the same pairs (the first
--pairs of examples/data/preference-alpaca/train.jsonl, the prompt as a chat turn), with the same LoRA shape
(r=16, alpha 32, all linear layers, no dropout), batch, beta 0.1, lr and bf16 autocast, no gradient
checkpointing (TRL's default turns it on: off is its faster mode), each run in its own process, tunesmith and
TRL alternating over --rounds. Pairs/s counts steps 2..N (the first is warm-up); peak RSS is the child's
maximum resident set (wait4). The last line is the ratio of medians. TRL computes the reference log-probs
with the adapter disabled at every step (its default); tunesmith computes them once at setup, counted in its
wall time (printed) but not in its steps' pairs/s: the same work is reported as `setup_s`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "preference-alpaca" / "train.jsonl"
MODEL = Path.home() / ".cache" / "tunesmith" / "models" / "smollm2-135m-instruct"
LR = 5e-5


def run_child(cmd: list[str], log: Path) -> tuple[int, float, float]:
    with open(log, "w") as f:
        start = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), time.time() - start, usage.ru_maxrss / 1024**2


def tunesmith_run(a, data: Path, out: Path, k: int) -> dict:
    cfg = {
        "name": f"tunesmith-{k}",
        "output_dir": str(out / "runs"),
        "model": {"name": str(a.model)},
        "peft": {"method": "lora", "r": 16, "alpha": 32, "dropout": 0.0},
        "data": {"train": str(data), "format": "preference", "max_length": a.max_length, "overlength": "truncate"},
        "preference": {"loss": "dpo", "beta": 0.1},
        "train": {"max_steps": a.steps, "batch_size": a.batch_size, "lr": LR, "precision": "bf16", "warmup_steps": 0},
        "eval": {"before_after": False, "samples": 0, "max_rows": 8, "generate_rows": 1, "max_new_tokens": 1},
    }
    path = out / f"tunesmith-{k}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = out / f"tunesmith-{k}.log"
    code, wall, rss = run_child([sys.executable, "-m", "tunesmith", "train", str(path), "--overwrite"], log)
    steps = []
    if code == 0:
        records = (out / "runs" / f"tunesmith-{k}" / "metrics.jsonl").read_text().splitlines()
        steps = [r for r in map(json.loads, records) if "loss" in r]
    pps = a.batch_size * (len(steps) - 1) / (steps[-1]["time"] - steps[0]["time"]) if len(steps) > 1 else None
    return {"tool": "tunesmith", "exit": code, "pairs_per_s": pps, "peak_rss_gb": rss, "wall_s": wall, "log": str(log)}


PEER = """
import json, sys, time
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer

model_dir, data, out, steps, batch, max_length, lr = sys.argv[1:8]
rows = [json.loads(x) for x in open(data)]
def turn(role, text):
    return [{"role": role, "content": text}]

pairs = [{"prompt": turn("user", r["prompt"]), "chosen": turn("assistant", r["chosen"]),
          "rejected": turn("assistant", r["rejected"])} for r in rows]
times = []

class Clock(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        times.append(time.time())

args = DPOConfig(output_dir=out, per_device_train_batch_size=int(batch), max_steps=int(steps), learning_rate=float(lr),
                 beta=0.1, bf16=True, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1000,
                 gradient_checkpointing=False, max_length=int(max_length), warmup_steps=0, seed=0)
lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args,
                     train_dataset=Dataset.from_list(pairs), processing_class=AutoTokenizer.from_pretrained(model_dir),
                     callbacks=[Clock()], peft_config=lora)
trainer.train()
print(json.dumps({"pairs_per_s": int(batch) * (len(times) - 1) / (times[-1] - times[0])}))
"""


def peer_run(a, data: Path, out: Path, k: int) -> dict:
    log = out / f"peer-{k}.log"
    cmd = [sys.executable, "-c", PEER, str(a.model), str(data), str(out / f"peer-{k}")]
    code, wall, rss = run_child([*cmd, str(a.steps), str(a.batch_size), str(a.max_length), str(LR)], log)
    pps = None
    for line in log.read_text().splitlines():
        if line.startswith('{"pairs_per_s"'):
            pps = json.loads(line)["pairs_per_s"]
    return {"tool": "trl", "exit": code, "pairs_per_s": pps, "peak_rss_gb": rss, "wall_s": wall, "log": str(log)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--data", type=Path, default=DATA)
    a = ap.parse_args()
    if not a.data.is_file():
        sys.exit(f"{a.data}: missing; `make preference-data` writes it")
    out = Path(tempfile.mkdtemp(prefix="pref-bench-"))
    data = out / "pairs.jsonl"
    data.write_text("".join(a.data.read_text().splitlines(keepends=True)[: a.pairs]))
    results = []
    for k in range(a.rounds):
        for run in (tunesmith_run, peer_run) if k % 2 == 0 else (peer_run, tunesmith_run):
            r = run(a, data, out, k)
            results.append(r)
            print(json.dumps({key: round(v, 3) if isinstance(v, float) else v for key, v in r.items()}), flush=True)
    bad = [r["log"] for r in results if r["exit"] != 0 or r["pairs_per_s"] is None]
    if bad:
        sys.exit(f"runs failed: {bad}")
    med = {
        t: {m: statistics.median(r[m] for r in results if r["tool"] == t) for m in ("pairs_per_s", "peak_rss_gb")}
        for t in ("tunesmith", "trl")
    }
    for t, m in med.items():
        print(f"{t}: {m['pairs_per_s']:.2f} pairs/s, peak RSS {m['peak_rss_gb']:.2f} GB (medians)")
    ratio = med["tunesmith"]["pairs_per_s"] / med["trl"]["pairs_per_s"]
    rss = med["tunesmith"]["peak_rss_gb"] / med["trl"]["peak_rss_gb"]
    print(f"ratio tunesmith/trl pairs/s: {ratio:.2f} (peak RSS ratio: {rss:.2f})")


if __name__ == "__main__":
    main()
