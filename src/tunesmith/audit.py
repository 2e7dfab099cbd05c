"""`tunesmith audit RUN --canaries`: how much a fine-tune memorises, without and with DP.

The run's own config is trained three times on a copy of its training data with canaries inserted:
without privacy; with the run's privacy block (or target_epsilon 8 when the run had none); and with the
same budget at user level, where all copies of one secret belong to one user. Sample-level DP bounds
what one *row* can reveal: a secret written 16 times is 16 rows, covered only by group privacy (16 x
epsilon), which is why the user-level variant is there. Each model's exposure per repetition count goes to
RUN/audit.json and to the `audit` key of RUN/eval.json.
The run's own weights are not touched; the two audit runs live under RUN/audit/.
"""

from __future__ import annotations

import json
import random

import numpy as np

from tunesmith.config import Config, derive
from tunesmith.console import console
from tunesmith.data.sources import read_source
from tunesmith.errors import UserError
from tunesmith.privacy import canaries as cn
from tunesmith.rundir import RunDir

USER = "audit_user"  # the column the user-level variant groups by


def _write_jsonl(path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return str(path)


def audit_data(run: RunDir, cfg, inserted: dict[int, list[str]], seed: int) -> tuple[str, str]:
    """The run's training rows plus the canaries, and a validation file that holds no canary."""
    train = [row for _, row in read_source(cfg.data.train, cfg.data.hub_split_of("train")).rows]
    if cfg.data.validation:
        validation = [row for _, row in read_source(cfg.data.validation, cfg.data.hub_split_of("validation")).rows]
    else:  # split here, so the run's own split cannot carry canaries into validation
        random.Random(seed).shuffle(train)
        k = min(200, max(1, int(len(train) * cfg.data.validation_fraction)))
        validation, train = train[:k], train[k:]
    rows = [
        {**cn.canary_row(cfg.data, cn.secret_text(s), i * 1000 + j), USER: f"secret-{s}"}
        for i, (r, secrets) in enumerate(inserted.items())
        for s in secrets
        for j in range(r)
    ]
    train = [{**row, USER: f"row-{k}"} for k, row in enumerate(train)]  # every other row is its own user
    mixed = train + rows
    random.Random(seed + 1).shuffle(mixed)
    folder = run / "audit" / "data"
    return _write_jsonl(folder / "train.jsonl", mixed), _write_jsonl(folder / "validation.jsonl", validation)


def variant_config(cfg, out: str, name: str, train: str, validation: str, privacy: dict | None):
    return derive(
        cfg,
        {
            "name": name,
            "output_dir": out,
            "retention": {},
            "privacy": privacy,
            "data.train": train,
            "data.validation": validation,
            "data.test": None,
            "data.dedup": False,  # repeated secrets are the point
            "eval.before_after": False,
            "eval.samples": 0,
            "eval.every": None,
            "train.save_every": None,
            "train.resume": "never",
            "train.early_stopping.patience": None,
        },
        f"audit variant {name}",
    )


def audit(
    run_path: str,
    repetitions: list[int],
    per_repetition: int = 10,
    n_references: int = 10_000,
    epsilon: float = 8.0,
    seed: int = 0,
) -> dict:
    run = RunDir.open(run_path)
    cfg = run.config()
    if cfg.data.format == "classification":
        raise UserError("The canary audit needs a generative task: a classifier does not emit secrets")
    inserted, references = cn.draw(repetitions, per_repetition, n_references, seed)
    train, validation = audit_data(run, cfg, inserted, seed)
    private = cfg.privacy.model_dump(mode="json") if cfg.privacy else {"target_epsilon": epsilon}
    result: dict = {
        "repetitions": repetitions,
        "secrets_per_repetition": per_repetition,
        "references": n_references,
        "max_exposure": round(float(np.log2(n_references)), 3),
        "variants": {},
    }
    user_level = {**private, "unit": "user", "user_column": USER}
    for name, privacy in (("no_dp", None), ("dp", private), ("dp_user", user_level)):
        console.print(f"[bold]audit[/]: training '{name}' with {sum(repetitions) * per_repetition} canary rows")
        vcfg = variant_config(cfg, str(run.path / "audit"), name, train, validation, privacy)
        result["variants"][name] = audit_variant(vcfg, inserted, references)
    run.write_json("audit.json", result)
    record_in_eval(run, result)
    print_audit(result)
    return result


def audit_variant(vcfg: Config, inserted: dict, references: list) -> dict:
    """Train one variant on the data with canaries, then measure each inserted secret's exposure."""
    from tunesmith.inference import load_finetuned
    from tunesmith.recipes import recipe_for

    trained = recipe_for(vcfg).train(vcfg, overwrite=True)
    model, tokenizer, _ = load_finetuned(trained)
    ref = cn.log_perplexities(model, tokenizer, vcfg.data, references)
    scores = {r: cn.log_perplexities(model, tokenizer, vcfg.data, s) for r, s in inserted.items()}
    exp = cn.exposures(scores, ref)
    report = trained.read_json("eval.json", {})
    return {
        "epsilon": report.get("epsilon"),
        "delta": report.get("delta"),
        "unit": (report.get("privacy") or {}).get("unit"),
        "exposure": {
            str(r): {
                "mean": round(float(e.mean()), 3),
                "max": round(float(e.max()), 3),
                "values": [round(float(x), 3) for x in e],
            }
            for r, e in exp.items()
        },
    }


def record_in_eval(run: RunDir, result: dict) -> None:
    """Each variant's epsilon and mean exposure into the run's eval.json, where its report reads them."""
    report = run.read_json("eval.json", {})
    report["audit"] = {
        k: {"epsilon": v["epsilon"], "mean_exposure": {r: x["mean"] for r, x in v["exposure"].items()}}
        for k, v in result["variants"].items()
    }
    run.write_json("eval.json", report)


def print_audit(result: dict) -> None:
    from rich.table import Table

    table = Table(title=f"Canary exposure (bits; max {result['max_exposure']}, {result['references']} references)")
    table.add_column("variant")
    table.add_column("epsilon", justify="right")
    table.add_column("unit")
    for r in result["repetitions"]:
        table.add_column(f"r={r} mean", justify="right")
    for name, v in result["variants"].items():
        eps = "inf" if v["epsilon"] is None else f"{v['epsilon']:.2f}"
        table.add_row(
            name, eps, v.get("unit") or "-", *(f"{v['exposure'][str(r)]['mean']:.2f}" for r in result["repetitions"])
        )
    console.print(table)
