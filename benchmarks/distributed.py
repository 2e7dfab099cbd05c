"""One process against two (torchrun DDP; DeepSpeed ZeRO-2, ZeRO-3 and FSDP2 through accelerate launch;
gloo on CPU) on the embedded SmolLM2 and Alpaca: tokens/s and loss.

Run:  .venv/bin/python benchmarks/distributed.py [--steps 6]

Same global batch (1 x 8 rows against 2 x 4), same rows per step, fp32. Tokens/s counts every rank's
real tokens over steps 2..N (the first is warm-up). On this 2-core machine expect little speed-up:
the point is that the runs agree. Writes benchmarks/results/distributed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "alpaca_instructions" / "train.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tunesmith-ddp-"))
    results = []
    for name, procs, launch in (
        ("1 process", 1, None),
        ("2 processes, DDP (torchrun)", 2, None),
        ("2 processes, DeepSpeed ZeRO-2", 2, "zero2.yaml"),
        ("2 processes, DeepSpeed ZeRO-3", 2, "zero3.yaml"),
        ("2 processes, FSDP2", 2, "fsdp.yaml"),
    ):
        key = f"v{len(results)}"
        cfg = {
            "name": key,
            "output_dir": str(work / "runs"),
            "model": {"name": "smollm2-135m-instruct"},
            "peft": {"method": "lora", "r": 16, "dropout": 0.0},
            "data": {
                "train": str(DATA),
                "format": "instruction",
                "max_length": 512,
                "overlength": "truncate",
                "validation_fraction": 0.05,
            },
            "train": {"max_steps": a.steps, "batch_size": 8 // procs, "lr": 2e-4, "warmup_steps": 0},
            "eval": {"before_after": False, "samples": 0, "max_rows": 32, "generate_rows": 1, "max_new_tokens": 1},
        }
        path = work / f"{key}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = str(sock.getsockname()[1])
        if procs == 1:
            cmd = [sys.executable, "-m", "tunesmith", "train", str(path)]
        elif launch is None:
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                "2",
                "--master_port",
                port,
                "-m",
                "tunesmith",
                "train",
                str(path),
            ]
        else:
            cmd = [
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                "--config_file",
                str(ROOT / "configs" / "accelerate" / launch),
                "--main_process_port",
                port,
                "-m",
                "tunesmith",
                "train",
                str(path),
            ]
        start = time.time()
        res = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(2 // procs)}
        )
        run = work / "runs" / key
        if res.returncode != 0:
            raise SystemExit(f"{name} failed:\n{res.stderr[-3000:]}")
        steps = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
        tps = (steps[-1]["tokens"] - steps[0]["tokens"]) / (steps[-1]["time"] - steps[0]["time"])
        val = json.loads((run / "eval.json").read_text())["finetuned"]["validation"]["loss"]
        results.append(
            {
                "variant": name,
                "processes": procs,
                "engine": json.loads((run / "run.json").read_text()).get("distributed"),
                "wall_s": round(time.time() - start, 1),
                "tokens_per_s": round(tps, 1),
                "train_loss": [round(s["loss"], 6) for s in steps],
                "val_loss": val,
            }
        )
        print(json.dumps(results[-1]), flush=True)
    (ROOT / "benchmarks" / "results" / "distributed.json").write_text(json.dumps(results, indent=2) + "\n")
    for r in results[1:]:
        diff = max(abs(x - y) for x, y in zip(results[0]["train_loss"], r["train_loss"]))
        print(
            f"{r['variant']} / 1 process tokens/s: {r['tokens_per_s'] / results[0]['tokens_per_s']:.2f}; "
            f"largest train-loss difference {diff:.2e}"
        )


if __name__ == "__main__":
    main()
