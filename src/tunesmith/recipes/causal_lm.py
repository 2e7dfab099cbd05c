"""Fine-tune a causal language model: instruction, summarization, constrained generation, language modeling.

Run:  tunesmith train examples/alpaca-smollm2.yaml [key=value ...] [--resume]

setup()    data is read and validated before any weights load, then tokenizer, model, PEFT
fit()      recipes/fitting.py: the optimizer step on one screen, shared with every recipe
evaluate() loss/perplexity, the task's generation metrics and retention perplexity, on held-out rows
save()     the adapter (or full model) in a format plain transformers/peft load
"""

from __future__ import annotations

from accelerate.utils import set_seed

from tunesmith import models
from tunesmith.config import Config, DataConfig
from tunesmith.data.checks import step_fits
from tunesmith.data.collate import collate, count_targets
from tunesmith.data.formats import parse_rows
from tunesmith.data.pack import collate_packed, pack
from tunesmith.data.prepare import apply_error_policy, load_examples, tokenize_splits
from tunesmith.data.sources import read_source
from tunesmith.data.tokenize import tokenize_examples
from tunesmith.evaluation import decoding
from tunesmith.evaluation.forgetting import forgetting, worst_ratio
from tunesmith.evaluation.generate import generate, generate_sharded
from tunesmith.evaluation.lm import evaluate_loss
from tunesmith.evaluation.tasks import TASKS, generation_rows
from tunesmith.recipes import building
from tunesmith.recipes.recipe import Steps, Which
from tunesmith.recipes.state import save_weights
from tunesmith.rundir import RunDir
from tunesmith.training.loss import causal_lm_loss_sum, choose_loss, per_example_loss_sum, per_example_losses


def general_text(cfg: Config, source: str, column: str, max_rows: int | None, tokenizer) -> tuple[list, int, dict]:
    """General text (retention sets, replay) tokenized like training text, loss on every token. Its bad
    rows follow data.on_error like the training data's; its cuts are counted."""
    dcfg = DataConfig(
        train=source,
        format="text",
        columns={"text": column},
        max_length=cfg.data.max_length,
        overlength="truncate",
        on_error=cfg.data.on_error,
        max_bad_fraction=cfg.data.max_bad_fraction,
    )
    raw = read_source(source)
    examples, problems = parse_rows(raw, dcfg)
    bad = apply_error_policy(cfg.data, problems, raw.total)
    tokenized = tokenize_examples(examples[:max_rows], tokenizer, dcfg)
    return tokenized.rows, bad, tokenized.counts


def retention_rows(cfg: Config, tokenizer, report: dict) -> dict[str, list]:
    """The sets whose perplexity should not rise (the forgetting check)."""
    out = {}
    for r in cfg.retention.sets:
        rows, bad, counts = general_text(cfg, r.data, r.column, r.max_rows, tokenizer)
        out[f"retention:{r.name}"] = rows
        report.setdefault("retention", {})[r.name] = {"rows": len(rows), "bad_rows": bad, **counts}
    return out


def replay_rows(cfg: Config, tokenizer, report: dict) -> list:
    """General text mixed into every training step (the replay mitigation)."""
    r = cfg.retention.replay
    rows, bad, counts = general_text(cfg, r.data, r.column, r.max_rows, tokenizer)
    report["replay"] = {"rows": len(rows), "bad_rows": bad, "fraction": r.fraction, **counts}
    return rows


def setup(cfg: Config, run: RunDir) -> building.Setup:
    examples = load_examples(cfg)  # bad rows stop the run here, before any weights load
    step_fits(cfg, len(examples.splits["train"]))  # a step larger than the data, before weights too
    model_path = models.resolve(cfg.model)
    tokenizer = models.load_tokenizer(model_path, cfg.model)
    data = {name: split.rows for name, split in tokenize_splits(cfg, examples, tokenizer).items()}
    data.update(retention_rows(cfg, tokenizer, examples.report))
    if cfg.retention.replay:
        data["replay"] = replay_rows(cfg, tokenizer, examples.report)
    run.write_json("data_report.json", examples.report)
    set_seed(cfg.seed)  # before the model: LoRA's A matrices are initialised from it
    model = models.apply_peft(models.load_causal_lm(model_path, cfg.model, cfg.peft), cfg.peft)
    pad = tokenizer.pad_token_id
    loss_fn = choose_loss(model, collate(data["train"][:2], pad), cfg.train.chunked_loss)
    count = count_targets
    if cfg.privacy is not None:  # DP clips each example's gradient: each example's own loss, counted in rows
        loss_fn, count = per_example_losses if cfg.privacy.grad_sample_mode == "ghost" else per_example_loss_sum, len
    batch_fn = collate
    if cfg.data.packing:  # training rows only: evaluation and generation see rows one by one
        n_rows = len(data["train"])
        data["train"], batch_fn = pack(data["train"], cfg.data.max_length), collate_packed
        examples.report["packing"] = {
            "rows": n_rows,
            "packs": len(data["train"]),
            "fill": round(sum(len(p.input_ids) for p in data["train"]) / (len(data["train"]) * cfg.data.max_length), 4),
        }
        run.write_json("data_report.json", examples.report)
    s = building.build(
        cfg,
        run,
        examples,
        data,
        tokenizer,
        model,
        model_path,
        collate=lambda rows: batch_fn(rows, pad),
        loss_sum=loss_fn,
        count=count,
        quick_eval=train_eval,
    )
    # The base model's retention perplexity, before any update (also after a resume: the checkpoint is
    # restored later), so every evaluation can say how much was forgotten.
    # Kept whole: the base model's evaluation reuses it instead of measuring the same rows again.
    at_start = s.evaluation.retention_at_start = retention_eval(s)
    s.evaluation.retention_base = {k: v["perplexity"] for k, v in at_start.items()}
    return s


def retention_eval(s: building.Setup) -> dict[str, dict]:
    return {name.split(":", 1)[1]: loss_eval(s, name) for name in s.data.rows if name.startswith("retention:")}


def train_eval(s: building.Setup, split: str) -> dict:
    """Validation loss, plus forgetting when retention sets are configured."""
    metrics = loss_eval(s, split)
    if s.evaluation.retention_base:
        report = forgetting(s.evaluation.retention_base, {k: v["perplexity"] for k, v in retention_eval(s).items()})
        metrics["forgetting"] = report
        metrics["forgetting_ratio"] = worst_ratio(report)
    return metrics


def loss_eval(s: building.Setup, split: str) -> dict:
    return evaluate_loss(
        s.accelerator.unwrap_model(s.model),
        s.data.rows[split],
        s.cfg.eval.batch_size,
        s.tokenizer.pad_token_id,
        s.accelerator.device,
        s.cfg.eval.max_rows,
        # DP trains on per-example means; evaluation stays token-weighted, as without DP
        s.optim.loss_sum if s.optim.dp is None else causal_lm_loss_sum,
        acc=s.accelerator,
    )


def evaluate(s: building.Setup, which: Which) -> dict:
    """Every held-out split: loss and perplexity, then the task's generation metrics."""
    task, cfg = TASKS[s.cfg.task_name], s.cfg.eval
    results: dict = {}
    for split in ("validation", "test"):
        if split not in s.data.rows:
            continue
        results[split] = loss_eval(s, split)
        rows = generation_rows(task, s.data.examples.splits[split], cfg.generate_rows) if task.generate else []
        if split == "validation" and not rows and cfg.samples:
            rows = [ex for ex in s.data.examples.splits[split] if ex.prompt is not None][: cfg.samples]
        if rows:
            generation_eval(s, which, split, rows, results)
    add_retention(s, which, results)
    s.model.train()
    return results


def generation_eval(s: building.Setup, which: Which, split: str, rows: list, results: dict) -> None:
    """Generate for `rows` as eval.decoding says; the task's scores, a base model's few-shot baseline and the
    validation samples go into `results`."""
    task, cfg = TASKS[s.cfg.task_name], s.cfg.eval
    outputs, stopped = generate_sharded(
        s.accelerator,
        s.accelerator.unwrap_model(s.model),
        s.tokenizer,
        [ex.prompt for ex in rows],
        cfg.max_new_tokens,
        cfg.batch_size,
        s.accelerator.device,
        label=f"{which} {split}",
        fn=generate,
        **decoding.options(s.cfg, rows),
    )
    results.setdefault("decoding", {})[split] = decoding.record(s.cfg)
    if task.generate:
        results[split].update(task.score(outputs, stopped, rows))
        if which == "base" and "few_shot" in cfg.baselines:
            k = cfg.few_shot_k
            results.setdefault("baselines", {}).setdefault(f"{k}-shot prompt", {})[split] = few_shot_scores(
                s, task, rows, k
            )
    if split == "validation":
        results["samples"] = [
            {"id": ex.id, "prompt": ex.prompt[-1]["content"], "output": out, "reference": ex.completion}
            for ex, out in zip(rows[: cfg.samples], outputs)
        ]


def add_retention(s: building.Setup, which: Which, results: dict) -> None:
    """Perplexity on the retention sets, and after fine-tuning how much it rose against the base model's."""
    at_start, s.evaluation.retention_at_start = s.evaluation.retention_at_start, None  # measured once, used once
    retention = at_start if which == "base" and at_start is not None else retention_eval(s)
    if retention:
        results["retention"] = retention
        if which != "base" and s.evaluation.retention_base:
            report = forgetting(s.evaluation.retention_base, {k: v["perplexity"] for k, v in retention.items()})
            results["forgetting"] = {
                "sets": report,
                "ratio": worst_ratio(report),
                "max_increase": s.cfg.retention.max_increase,
            }


def few_shot_turns(s: building.Setup, k: int) -> list[dict]:
    """k solved training rows as earlier chat turns (their system message, if any, left to the query)."""
    from tunesmith.data.split import demonstrations

    return demonstrations(
        s.data.examples.splits["train"],
        k,
        s.cfg.seed,
        False,
        lambda ex: [*(m for m in ex.prompt if m["role"] != "system"), {"role": "assistant", "content": ex.completion}],
    )


def few_shot_scores(s: building.Setup, task, rows: list, k: int) -> dict:
    """The base model prompted with k solved training rows, scored like the fine-tuned model."""
    turns = few_shot_turns(s, k)
    prompts = []
    for ex in rows:
        system = [m for m in ex.prompt if m["role"] == "system"]
        prompts.append(system + turns + [m for m in ex.prompt if m["role"] != "system"])
    outputs, stopped = generate_sharded(
        s.accelerator,
        s.accelerator.unwrap_model(s.model),
        s.tokenizer,
        prompts,
        s.cfg.eval.max_new_tokens,
        s.cfg.eval.batch_size,
        s.accelerator.device,
        label=f"{k}-shot prompt",
        fn=generate,
        **decoding.options(s.cfg, rows),
    )
    return task.score(outputs, stopped, rows)


def save(s: building.Setup) -> None:
    save_weights(s)


RECIPE = Steps(setup, evaluate, save)
train = RECIPE.train  # causal_lm.train(cfg): this recipe through the run's sequence (loop.py)
