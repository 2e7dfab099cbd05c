"""Preference tuning (DPO, IPO, SimPO): the model learns to rank each pair's chosen answer above the rejected.

Run:  tunesmith train examples/preference-alpaca.yaml

setup()    pairs read and checked before any weights load (empty answers, chosen == rejected, duplicates,
           leakage, over-length); one row per pair (data/pairs.py); the model (with LoRA); then the
           reference log-probs of every pair, computed once by the base model: with LoRA the adapter
           disabled, with full fine-tuning the weights before the first update. No second model in memory.
fit()      recipes/fitting.py: the optimizer step on one screen, with the pair losses of
           training/preference_loss.py summed and divided by the pairs of the step
evaluate() on held-out pairs: reward accuracy and margin (the implicit reward), preference accuracy (the
           answer the model finds likelier per token), log-probs of chosen and rejected, the loss; and
           ROUGE-L of generated answers against `chosen` for eval.generate_rows prompts
save()     the adapter (or full model), as every causal-LM run
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate.utils import set_seed

from tunesmith import models
from tunesmith.config import Config
from tunesmith.data.checks import step_fits
from tunesmith.data.pairs import PairRow, collate_pairs
from tunesmith.data.prepare import load_examples, tokenize_splits
from tunesmith.errors import UserError
from tunesmith.evaluation.tasks import TASKS, generation_rows
from tunesmith.recipes import building
from tunesmith.recipes.causal_lm import generation_eval
from tunesmith.recipes.recipe import Steps, Which
from tunesmith.recipes.state import save_weights
from tunesmith.rundir import RunDir
from tunesmith.training.loss import choose_loss, chunked_loss_sum
from tunesmith.training.preference_loss import answer_logps, loss_fns, pair_losses, rewards


def require_causal_lm(model_path: str, cfg: Config) -> None:
    """Preference tuning scores answers token by token: an encoder or a classifier checkpoint cannot."""
    config = Path(model_path) / "config.json"
    if not config.is_file():
        return  # a hub id or GGUF: its architecture is checked when it loads
    archs = json.loads(config.read_text()).get("architectures") or []
    if archs and not any(a.endswith("ForCausalLM") for a in archs):
        raise UserError(
            f"model.name {cfg.model.name}: a {', '.join(archs)} checkpoint; preference tuning needs a causal LM",
            hint="Use a decoder with a language-model head (e.g. smollm2-135m-instruct).",
        )


def setup(cfg: Config, run: RunDir) -> building.Setup:
    examples = load_examples(cfg)  # bad pairs stop the run here, before any weights load
    step_fits(cfg, len(examples.splits["train"]))
    model_path = models.resolve(cfg.model)
    require_causal_lm(model_path, cfg)
    tokenizer = models.load_tokenizer(model_path, cfg.model)
    data = {name: split.rows for name, split in tokenize_splits(cfg, examples, tokenizer).items()}
    run.write_json("data_report.json", examples.report)
    set_seed(cfg.seed)  # before the model: LoRA's A matrices are initialised from it
    model = models.apply_peft(models.load_causal_lm(model_path, cfg.model, cfg.peft), cfg.peft)
    pad = tokenizer.pad_token_id
    # The chunked output layer drops the batch dimension DP-SGD's per-example hooks need.
    chunked = cfg.privacy is None and cfg.train.chunked_loss and fits_chunked(model, data["train"][:2], pad)
    summed, per_pair = loss_fns(cfg.preference, chunked)
    s = building.build(
        cfg,
        run,
        examples,
        data,
        tokenizer,
        model,
        model_path,
        collate=lambda rows: collate_pairs(rows, pad),
        loss_sum=per_pair if cfg.privacy and cfg.privacy.grad_sample_mode == "ghost" else summed,
        count=len,
        quick_eval=quick_eval,
    )
    s.evaluation.chunked = chunked
    if cfg.preference.loss != "simpo":
        add_reference(s)
    return s


def fits_chunked(model, rows: list[PairRow], pad: int) -> bool:
    """Whether the last hidden state times the output layer gives the logits (loss.choose_loss checks)."""
    from tunesmith.data.collate import collate
    from tunesmith.data.tokenize import Tokenized

    plain = [Tokenized(r.id, r.where, r.prompt_ids + r.chosen_ids, r.prompt_ids + r.chosen_ids) for r in rows]
    return choose_loss(model, collate(plain, pad), True) is chunked_loss_sum


def scored(s: building.Setup, rows: list[PairRow]):
    """Each evaluation batch of `rows` with its answers' log-probs (float64) and token counts, the model in
    eval mode and without gradients: (rows, batch, logps, counts)."""
    model = s.accelerator.unwrap_model(s.model)
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(rows), s.cfg.eval.batch_size):
            part = rows[i : i + s.cfg.eval.batch_size]
            batch = {k: v.to(s.accelerator.device) for k, v in collate_pairs(part, s.tokenizer.pad_token_id).items()}
            with torch.no_grad(), s.accelerator.autocast():
                logps, counts = answer_logps(model, batch, s.evaluation.chunked)
            yield part, batch, logps.double(), counts
    finally:
        model.train(was_training)


def add_reference(s: building.Setup) -> None:
    """Every pair's reference log-probs, by the model before any update: LoRA's adapter disabled (the base
    exactly), or the full model's initial weights. Computed at setup, also on a resume, from the same base."""
    model = s.accelerator.unwrap_model(s.model)
    with model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext():
        for rows in s.data.rows.values():
            for part, _, logps, _ in scored(s, rows):
                for row, (c, r) in zip(part, logps.tolist()):
                    row.reference = (c, r)


def pair_metrics(s: building.Setup, rows: list[PairRow]) -> dict:
    """The held-out pairs' loss and preference metrics under the current model."""
    pcfg, losses, chosen, rejected, margins, likelier = s.cfg.preference, [], [], [], [], []
    for _, batch, logps, counts in scored(s, rows):
        reference = batch.get("reference")
        losses += pair_losses(logps, counts, reference, pcfg).tolist()
        r = rewards(logps, counts, reference, pcfg)
        margins += (r[:, 0] - r[:, 1]).tolist()
        chosen += logps[:, 0].tolist()
        rejected += logps[:, 1].tolist()
        mean = logps / counts.clamp(min=1)
        likelier += (mean[:, 0] > mean[:, 1]).tolist()
    n = max(len(rows), 1)
    return {
        "loss": sum(losses) / n,
        "reward_accuracy": 100 * sum(m > 0 for m in margins) / n,
        "reward_margin": sum(margins) / n,
        "preference_accuracy": 100 * sum(likelier) / n,
        "logp_chosen": sum(chosen) / n,
        "logp_rejected": sum(rejected) / n,
        "pairs": len(rows),
    }


def quick_eval(s: building.Setup, split: str) -> dict:
    rows = s.data.rows[split]
    return pair_metrics(s, rows[: s.cfg.eval.max_rows] if s.cfg.eval.max_rows else rows)


def evaluate(s: building.Setup, which: Which) -> dict:
    """Every held-out split's pair metrics, then generations for eval.generate_rows prompts against chosen."""
    results: dict = {}
    if which == "base" and s.cfg.preference.loss != "simpo":
        results["note"] = "the base model is the reference: its implicit rewards are 0, its reward accuracy 0"
    for split in ("validation", "test"):
        if split not in s.data.rows:
            continue
        results[split] = quick_eval(s, split)
        rows = generation_rows(TASKS["preference"], s.data.examples.splits[split], s.cfg.eval.generate_rows)
        generation_eval(s, which, split, rows, results)
    s.model.train()
    return results


def save(s: building.Setup) -> None:
    save_weights(s)


RECIPE = Steps(setup, evaluate, save)
train = RECIPE.train  # preference.train(cfg): this recipe through the run's sequence (loop.py)
