"""Write the preference example's pairs: Alpaca instructions, `chosen` = the reference answer, `rejected` = the
base model's own greedy answer (a "self-play" pair: the fine-tune learns to prefer the reference over what it
already says). Written once; a second run finds the files and stops.

Run:  make preference-data   (or: python examples/make_preference_data.py examples/data/preference-alpaca)

Source: ../shared/data/alpaca_instructions (CC BY-NC 4.0: research use). The first TRAIN train rows and the
first VALIDATION validation rows whose answer has at most MAX_WORDS words (short pairs keep the CPU run short);
the base model (embedded SmolLM2-135M-Instruct, bf16) answers each prompt with at most NEW_TOKENS tokens, so a
long answer of its own is cut there (the reference answers are whole).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_instructions"
TRAIN, VALIDATION, MAX_WORDS, NEW_TOKENS, BATCH = 1200, 200, 80, 96, 16


def prompts(split: str, n: int) -> list[dict]:
    rows = []
    with open(SOURCE / f"{split}.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if len(r["output"].split()) > MAX_WORDS:
                continue
            text = f"{r['instruction']}\n\n{r['input']}" if r["input"].strip() else r["instruction"]
            rows.append({"id": r["id"], "prompt": text, "chosen": r["output"]})
            if len(rows) == n:
                break
    return rows


def main(out_dir: str) -> None:
    from tunesmith import models
    from tunesmith.config import ModelConfig
    from tunesmith.evaluation.generate import generate

    out = Path(out_dir)
    targets = {"train": out / "train.jsonl", "validation": out / "validation.jsonl"}
    if all(p.is_file() for p in targets.values()):
        print(f"{out}: already written (delete it to write the pairs again)")
        return
    out.mkdir(parents=True, exist_ok=True)
    mcfg = ModelConfig(name="smollm2-135m-instruct", dtype="bfloat16")
    path = models.resolve(mcfg)
    tokenizer, model = models.load_tokenizer(path, mcfg), models.load_causal_lm(path, mcfg)
    for split, n in (("train", TRAIN), ("validation", VALIDATION)):
        rows, start = prompts(split, n), time.time()
        answers, _ = generate(
            model, tokenizer, [[{"role": "user", "content": r["prompt"]}] for r in rows], NEW_TOKENS, BATCH
        )
        kept = [{**r, "rejected": a} for r, a in zip(rows, answers) if a.strip() and a.strip() != r["chosen"].strip()]
        tmp = targets[split].with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
        tmp.replace(targets[split])  # whole files only: an interrupted run writes nothing half
        print(f"{targets[split]}: {len(kept)} pairs of {len(rows)} prompts in {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "examples/data/preference-alpaca")
