"""How far a linear probe on frozen SmolLM2-135M features gets on Rotten Tomatoes, without privacy: the
ceiling of a DP-trained head over those features (DP only lowers it). Mean-pooled hidden states of several
layers, then scikit-learn's logistic regression, scored on validation.

Run:  .venv/bin/python benchmarks/dp_probe.py [../shared/data/rotten_tomatoes] [TEMPLATE]
TEMPLATE (e.g. "Review: {text}\nSentiment:", like the DP example's data.prompt) wraps every row first.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from tunesmith import models
from tunesmith.config import ModelConfig


def features(model, tok, texts: list[str]) -> dict[str, np.ndarray]:
    out: dict[str, list] = {"mean, last layer": [], "last token, last layer": [], "mean, middle layer": []}
    order = np.argsort([len(t) for t in texts])
    rows: dict[str, list] = {k: [None] * len(texts) for k in out}
    for i in range(0, len(texts), 64):
        idx = order[i : i + 64]
        batch = tok([texts[j] for j in idx], return_tensors="pt", padding=True)
        with torch.no_grad():
            hidden = model.model(**batch, output_hidden_states=True).hidden_states
        mask = batch["attention_mask"].unsqueeze(-1).float()
        last = batch["attention_mask"].sum(1) - 1
        top, mid = hidden[-1], hidden[(len(hidden) - 1) // 2]
        values = {
            "mean, last layer": (top * mask).sum(1) / mask.sum(1),
            "last token, last layer": top[torch.arange(len(idx)), last],
            "mean, middle layer": (mid * mask).sum(1) / mask.sum(1),
        }
        for k, v in values.items():
            for j, row in zip(idx, v):
                rows[k][j] = row.numpy()
    return {k: np.stack(v) for k, v in rows.items()}


def main(data: str = "../shared/data/rotten_tomatoes", template: str = "{text}") -> None:
    mcfg = ModelConfig(name="smollm2-135m-instruct")
    path = models.resolve(mcfg)
    tok = models.load_tokenizer(path, mcfg)
    tok.padding_side = "right"
    model = models.load_causal_lm(path, mcfg).eval()
    split = {s: [json.loads(x) for x in open(Path(data) / f"{s}.jsonl")] for s in ("train", "validation")}
    start = time.time()
    template = template.replace("\\n", "\n")  # a shell argument keeps a typed \n literal
    feats = {
        s: features(model, tok, [template.replace("{text}", r["text"]) for r in rows]) for s, rows in split.items()
    }
    labels = {s: np.array([r["label"] == "positive" for r in rows]) for s, rows in split.items()}
    print(f"features in {time.time() - start:.0f} s")
    for kind in feats["train"]:
        scale = StandardScaler().fit(feats["train"][kind])
        x, v = scale.transform(feats["train"][kind]), scale.transform(feats["validation"][kind])
        scores = {
            c: 100 * LogisticRegression(C=c, max_iter=2000).fit(x, labels["train"]).score(v, labels["validation"])
            for c in (0.01, 0.1, 1.0)
        }
        print(kind + ": " + ", ".join(f"C={c}: {s:.2f}%" for c, s in scores.items()))


if __name__ == "__main__":
    main(*sys.argv[1:])
