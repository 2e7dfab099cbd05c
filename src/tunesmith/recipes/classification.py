"""Fine-tune a classifier (e.g. sentiment): an encoder or decoder with a classification head.

Run:  tunesmith train examples/sentiment-rotten-tomatoes.yaml

setup()    validated rows -> token ids + label indices; model with a fresh head sized to the labels
fit()      recipes/fitting.py, with a summed cross-entropy normalised by the rows of the whole step
evaluate() accuracy, macro-F1, per-class precision/recall, confusion matrix on held-out rows.
           The "before" row is an instruction model prompted zero-shot (eval.baseline_model) or,
           without one, the majority-class baseline, stated as such.
save()     the adapter (classifier head included) plus labels.json
"""

from __future__ import annotations

import json
from collections import Counter

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed

from tunesmith import models
from tunesmith.config import Config
from tunesmith.data.checks import step_fits
from tunesmith.data.prepare import load_examples, tokenize_splits
from tunesmith.data.tokenize import LabeledRow
from tunesmith.evaluation.metrics import classification_metrics
from tunesmith.heads import label_word_ids
from tunesmith.recipes import building
from tunesmith.recipes.recipe import Steps, Which
from tunesmith.recipes.state import save_weights
from tunesmith.rundir import RunDir


def collate_labeled(rows: list[LabeledRow], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r.input_ids)] = torch.tensor(r.input_ids)
        mask[i, : len(r.input_ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([r.label for r in rows])}


def loss_sum(model, batch: dict[str, torch.Tensor], reduction: str = "sum") -> tuple[torch.Tensor, int]:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits.float(), batch["labels"], reduction=reduction), len(batch["labels"])


def per_example_losses(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """DP-SGD with ghost clipping weights each row's loss in its second backward."""
    return loss_sum(model, batch, reduction="none")


def setup(cfg: Config, run: RunDir) -> building.Setup:
    examples = load_examples(cfg)  # bad rows and unknown labels stop the run before any weights load
    step_fits(cfg, len(examples.splits["train"]))  # a step larger than the data, before weights too
    model_path = models.resolve(cfg.model)
    tokenizer = models.load_tokenizer(model_path, cfg.model)
    data = {name: split.rows for name, split in tokenize_splits(cfg, examples, tokenizer).items()}
    run.write_json("data_report.json", examples.report)
    set_seed(cfg.seed)
    words = label_word_ids(tokenizer, examples.labels) if cfg.model.head_init == "label_words" else None
    model = models.load_classifier(model_path, cfg.model, examples.labels, tokenizer.pad_token_id, cfg.peft, words)
    model = models.apply_peft(model, cfg.peft, task_type="SEQ_CLS")
    pad = tokenizer.pad_token_id
    return building.build(
        cfg,
        run,
        examples,
        data,
        tokenizer,
        model,
        model_path,
        collate=lambda rows: collate_labeled(rows, pad),
        loss_sum=per_example_losses if cfg.privacy and cfg.privacy.grad_sample_mode == "ghost" else loss_sum,
        count=len,
        quick_eval=quick_eval,
    )


@torch.no_grad()
def batch_logits(model, rows: list[LabeledRow], pad: int, batch_size: int, device):
    """(batch, logits) per batch of rows, in order: evaluation and `tunesmith predict` share it."""
    for i in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate_labeled(rows[i : i + batch_size], pad).items()}
        yield batch, model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


@torch.no_grad()
def predict(s: building.Setup, rows: list[LabeledRow]) -> tuple[list[int], float]:
    model, pad = s.accelerator.unwrap_model(s.model), s.tokenizer.pad_token_id
    model.eval()
    preds, total = [], 0.0
    for batch, logits in batch_logits(model, rows, pad, s.cfg.eval.batch_size, s.accelerator.device):
        total += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
        preds += logits.argmax(-1).tolist()
    model.train()
    return preds, total / max(len(rows), 1)


def quick_eval(s: building.Setup, split: str) -> dict:
    rows = s.data.rows[split][: s.cfg.eval.max_rows] if s.cfg.eval.max_rows else s.data.rows[split]
    preds, loss = predict(s, rows)
    return {"loss": loss, "accuracy": 100 * sum(p == r.label for p, r in zip(preds, rows)) / max(len(rows), 1)}


def evaluate(s: building.Setup, which: Which) -> dict:
    labels = s.data.examples.labels
    results: dict = {}
    prompter = Prompter(s) if which == "base" and s.cfg.eval.baseline_model else None
    if which == "base":
        results["note"] = (
            f"zero-shot prompting of {s.cfg.eval.baseline_model}"
            if prompter
            else "majority-class baseline (always the most frequent training label), not a model"
        )
    for split in ("validation", "test"):
        if split not in s.data.rows:
            continue
        rows = s.data.rows[split][: s.cfg.eval.max_rows] if s.cfg.eval.max_rows else s.data.rows[split]
        truth = [labels[r.label] for r in rows]
        if which == "base":
            pred = prompter.predict(split, rows) if prompter else [majority(s)] * len(rows)
            results[split] = classification_metrics(truth, pred, labels)
            if prompter and "few_shot" in s.cfg.eval.baselines:
                k = s.cfg.eval.few_shot_k
                few = classification_metrics(truth, prompter.predict(split, rows, k), labels)
                results.setdefault("baselines", {}).setdefault(f"{k}-shot prompt", {})[split] = few
        else:
            idx, loss = predict(s, rows)
            pred = [labels[i] for i in idx]
            results[split] = {"loss": loss, **classification_metrics(truth, pred, labels)}
        if split == "validation":
            texts = {ex.where: ex.text for ex in s.data.examples.splits[split]}
            results["samples"] = [
                {"id": r.id, "prompt": texts.get(r.where), "output": p, "reference": t}
                for r, p, t in list(zip(rows, pred, truth))[: s.cfg.eval.samples]
            ]
    return results


def majority(s: building.Setup) -> str:
    return Counter(ex.label for ex in s.data.examples.splits["train"]).most_common(1)[0][0]


class Prompter:
    """An instruction model asked for the label, with k solved training examples as earlier chat turns
    (k = 0: zero-shot). An answer naming no label, or several, counts as wrong."""

    def __init__(self, s: building.Setup):
        from tunesmith.config import ModelConfig

        self.s, self.labels = s, s.data.examples.labels
        mcfg = ModelConfig(name=s.cfg.eval.baseline_model)
        path = models.resolve(mcfg)
        self.tok, self.lm = models.load_tokenizer(path, mcfg), models.load_causal_lm(path, mcfg)

    def ask(self, text: str) -> str:
        return f"Classify the text as one of: {', '.join(self.labels)}. Answer with the label only.\n\nText: {text}"

    def predict(self, split: str, rows: list[LabeledRow], k: int = 0) -> list[str]:
        from tunesmith.data.split import demonstrations
        from tunesmith.evaluation.generate import generate

        s = self.s
        turns = demonstrations(
            s.data.examples.splits["train"],
            k,
            s.cfg.seed,
            True,
            lambda ex: [{"role": "user", "content": self.ask(ex.text)}, {"role": "assistant", "content": ex.label}],
        )
        # Rows may have been dropped: align by origin.
        texts = {ex.where: ex.text for ex in s.data.examples.splits[split]}
        prompts = [turns + [{"role": "user", "content": self.ask(texts[r.where])}] for r in rows]
        outputs, _ = generate(
            self.lm, self.tok, prompts, max_new_tokens=8, batch_size=s.cfg.eval.batch_size, label=f"{k}-shot prompt"
        )
        found = []
        for out in outputs:
            hits = [lab for lab in self.labels if lab.lower() in out.lower()]
            found.append(hits[0] if len(hits) == 1 else "(no label)")
        return found


def save(s: building.Setup) -> None:
    target = save_weights(s)
    if target is not None:
        (target / "labels.json").write_text(json.dumps(s.data.examples.labels))


RECIPE = Steps(setup, evaluate, save)
train = RECIPE.train  # classification.train(cfg): this recipe through the run's sequence (loop.py)
