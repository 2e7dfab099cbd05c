"""Check that a run's adapter gives the same logits under plain peft (separate process) as in tunesmith.

Run: .venv/bin/python benchmarks/check_adapter.py runs/alpaca-smollm2 ["prompt text"]
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from tunesmith import models
from tunesmith.inference import load_finetuned
from tunesmith.rundir import RunDir

PLAIN = """
import json, sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sys.argv[1]), sys.argv[2]).eval()
with torch.no_grad():
    print(json.dumps(m(torch.tensor([json.loads(sys.argv[3])])).logits[0].tolist()))
"""


def main(run_path: str, prompt: str = "Give three tips for staying healthy.") -> None:
    run = RunDir.open(run_path)
    model, tok, cfg = load_finetuned(run)
    ids = tok(prompt)["input_ids"]
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0]
    base = models.resolve(cfg.model)
    out = subprocess.run(
        [sys.executable, "-c", PLAIN, base, str(run / "adapter"), json.dumps(ids)],
        capture_output=True,
        text=True,
        check=True,
    )
    diff = float((torch.tensor(json.loads(out.stdout)) - ours).abs().max())
    verdict = "OK" if diff <= 1e-5 else "DIFFERENT"
    print(f"max |plain peft - tunesmith| = {diff:.3g} over {ours.numel()} logits: {verdict}")
    sys.exit(0 if diff <= 1e-5 else 1)


if __name__ == "__main__":
    main(*sys.argv[1:])
