"""Load a finished run's model (base + adapter, or full weights) for eval, generation, export and prediction.

Every command that reads a finished run goes through here: its config.yaml is read like a config file
(a damaged one is a ConfigError), the task is checked against what the command does, the weight files
are verified before any model loads, and saved weights that do not fit the model the config builds are
refused (never scored or served as "fine-tuned").
"""

from __future__ import annotations

import json
from pathlib import Path

from tunesmith import models
from tunesmith.config import Config
from tunesmith.errors import UserError
from tunesmith.rundir import RunDir

SHOWN_KEYS = 3  # key names listed per kind of mismatch


def run_config(run: RunDir) -> Config:
    from tunesmith.config import load_config

    return load_config(run / "config.yaml")


def open_run(path) -> tuple[RunDir, Config]:
    run = RunDir.open(path)
    return run, run_config(run)


def require_task(run: RunDir, cfg: Config, classification: bool) -> None:
    if classification and cfg.task_name != "classification":
        raise UserError(
            f"{run.path} is a {cfg.task_name} run: `tunesmith predict` is for classification runs",
            hint="Generate text with: tunesmith generate RUN --prompt TEXT (or --input FILE)",
        )
    if not classification and cfg.task_name == "classification":
        raise UserError(
            f"{run.path} is a classification run: generate and export need a generative (causal LM) run",
            hint="Predict labels with: tunesmith predict RUN --input FILE",
        )


def _only_safetensors(folder) -> None:
    unsafe = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"))
    if unsafe:
        raise UserError(f"{folder}: refusing pickle-format weight files (tunesmith writes only safetensors)", unsafe)


def _readable(path: Path) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt"):  # parses the header and checks the file covers every tensor
            pass
    except (SafetensorError, OSError) as err:
        raise UserError(
            f"{path}: not a readable safetensors file ({err})",
            hint="The file is damaged or incomplete (an interrupted copy?): restore it or retrain.",
        ) from None


def weights_dir(run: RunDir) -> Path:
    """The run's adapter/ or model/ directory, its files checked before any model loads."""
    for name in ("adapter", "model"):
        if (run / name).is_dir():
            _only_safetensors(run / name)
    if (run / "adapter").is_dir():
        folder, config, files = run / "adapter", "adapter_config.json", [run / "adapter" / "adapter_model.safetensors"]
    elif (run / "model").is_dir():
        folder, config = run / "model", "config.json"
        files = sorted(folder.glob("*.safetensors")) or [folder / "model.safetensors"]
    else:
        raise UserError(f"{run.path}: no adapter/ or model/ (did the run finish?)")
    try:
        json.loads((folder / config).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(
            f"{folder}: {config} is missing", hint="The run's weights are incomplete: restore them or retrain."
        ) from None
    except (ValueError, OSError) as err:
        raise UserError(f"{folder / config}: not valid JSON ({type(err).__name__})") from None
    for f in files:
        if not f.is_file():
            raise UserError(
                f"{folder}: {f.name} is missing", hint="The run's weights are incomplete: restore them or retrain."
            )
        _readable(f)
    return folder


def check_fit(expected: dict, saved: dict, source, excused: set | frozenset = frozenset()) -> None:
    """Saved tensors must be exactly the model's: same names, same shapes (both given as name -> shape).
    `excused`: names the file may lack (tied weights are saved once)."""
    missing = sorted(set(expected) - set(saved) - set(excused))
    unexpected = sorted(set(saved) - set(expected))
    shapes = sorted(k for k in set(expected) & set(saved) if expected[k] != saved[k])
    if not (missing or unexpected or shapes):
        return
    counts = [
        f"{n} {what}"
        for n, what in ((len(missing), "missing"), (len(unexpected), "unexpected"), (len(shapes), "of another shape"))
        if n
    ]
    problems = (
        [f"missing: {k}" for k in missing[:SHOWN_KEYS]]
        + [f"unexpected: {k}" for k in unexpected[:SHOWN_KEYS]]
        + [f"shape: {k} is {saved[k]} saved, {expected[k]} in the model" for k in shapes[:SHOWN_KEYS]]
    )
    raise UserError(
        f"{source}: the saved weights do not match the model the run's config.yaml builds "
        f"({', '.join(counts)} of {len(expected)} tensors)",
        problems,
        hint="Were the weights replaced, or config.yaml edited (peft.r, peft.target_modules, model.name) "
        "after training?",
    )


def _shapes(files: list[Path]) -> dict[str, tuple]:
    from safetensors import safe_open

    out = {}
    for f in files:
        with safe_open(str(f), "pt") as handle:  # the header only: no tensor is read
            out.update({k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()})
    return out


def _files(folder: Path) -> list[Path]:
    return [folder / "adapter_model.safetensors"] if folder.name == "adapter" else sorted(folder.glob("*.safetensors"))


def check_saved_weights(model, run: RunDir) -> Path:
    """The run's saved weights must fit `model`, built from the run's config (checked from the file headers)."""
    folder = weights_dir(run)
    if folder.name == "adapter":
        from peft import PeftModel, get_peft_model_state_dict

        if not isinstance(model, PeftModel):
            raise UserError(
                f"{folder}: a LoRA adapter, but the run's config.yaml has peft.method {run_config(run).peft.method!r}"
            )
        expected = {k: tuple(t.shape) for k, t in get_peft_model_state_dict(model).items()}
        check_fit(expected, _shapes(_files(folder)), folder / "adapter_model.safetensors")
        return folder
    state, saved = model.state_dict(), _shapes(_files(folder))
    by_storage: dict = {}
    for name, t in state.items():
        by_storage.setdefault(t.data_ptr(), []).append(name)
    excused = {n for names in by_storage.values() if any(x in saved for x in names) for n in names}
    check_fit({k: tuple(t.shape) for k, t in state.items()}, saved, folder, excused)
    return folder


def load_saved_weights(model, run: RunDir) -> None:
    """The run's saved weights into `model`, built from the run's config: every tensor must fit."""
    import torch
    from safetensors.torch import load_file

    folder = check_saved_weights(model, run)
    saved = {}
    for f in _files(folder):
        saved.update(load_file(str(f)))
    if folder.name == "adapter":
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, saved)
        return
    with torch.no_grad():
        model.load_state_dict(saved, strict=False)


def _saved_copy(cfg: Config, folder: Path):
    # model/ holds the whole model, model.adapters already folded in: they must not be folded twice
    return cfg.model.model_copy(update={"name": str(folder), "revision": None, "adapters": []})


def load_finetuned(run: RunDir, quantized: bool = True):
    """A generative run's model and tokenizer, ready for generate() or export. A qlora run's base loads in
    4 bits as trained, or (quantized=False, for export) unquantized in model.dtype, as peers merge it."""
    cfg = run_config(run)
    require_task(run, cfg, classification=False)
    folder = weights_dir(run)
    tokenizer = models.load_tokenizer(str(folder), cfg.model)
    if folder.name == "adapter":
        base = models.load_causal_lm(models.resolve(cfg.model), cfg.model, cfg.peft if quantized else None)
        model = models.apply_peft(base, cfg.peft)
        load_saved_weights(model, run)
    else:
        model = models.load_causal_lm(str(folder), _saved_copy(cfg, folder))
    model.eval()
    return model, tokenizer, cfg


def load_base(run: RunDir):
    """A generative run's base model (its pretrained weights, before the fine-tune) with the run's own
    tokenizer, so the chat template and special tokens are the ones the fine-tuned model answers with."""
    cfg = run_config(run)
    require_task(run, cfg, classification=False)
    tokenizer = models.load_tokenizer(str(weights_dir(run)), cfg.model)
    model = models.load_causal_lm(models.resolve(cfg.model), cfg.model, cfg.peft)
    model.eval()
    return model, tokenizer, cfg


def load_classifier_run(run: RunDir):
    """A classification run's model, tokenizer and label list, built as the recipe builds it."""
    cfg = run_config(run)
    require_task(run, cfg, classification=True)
    folder = weights_dir(run)
    try:
        labels = json.loads((folder / "labels.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        labels = None
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise UserError(f"{folder}: labels.json is missing or not a list of labels")
    tokenizer = models.load_tokenizer(str(folder), cfg.model)
    if folder.name == "adapter":
        model = models.load_classifier(models.resolve(cfg.model), cfg.model, labels, pcfg=cfg.peft)
        model = models.apply_peft(model, cfg.peft, task_type="SEQ_CLS")
        load_saved_weights(model, run)
    else:
        model = models.load_classifier(str(folder), _saved_copy(cfg, folder), labels)
    model.eval()
    return model, tokenizer, cfg, labels


def export_merged(run: RunDir, out: str) -> None:
    model, tokenizer, _ = load_finetuned(run, quantized=False)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()  # LoRA folded into the weights: a plain HF model directory
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
