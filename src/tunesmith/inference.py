"""Load a finished run's model (base + adapter, or full weights) for generation and export."""

from __future__ import annotations

from tunesmith import models
from tunesmith.errors import UserError
from tunesmith.rundir import RunDir


def _only_safetensors(folder) -> None:
    unsafe = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"))
    if unsafe:
        raise UserError(f"{folder}: refusing pickle-format weight files (tunesmith writes only safetensors)", unsafe)


def load_finetuned(run: RunDir):
    cfg = run.config()
    for name in ("adapter", "model"):
        if (run / name).is_dir():
            _only_safetensors(run / name)
    if (run / "adapter").is_dir():
        from peft import PeftModel

        base_path = models.resolve(cfg.model)
        tokenizer = models.load_tokenizer(str(run / "adapter"), cfg.model)
        model = PeftModel.from_pretrained(models.load_causal_lm(base_path, cfg.model), str(run / "adapter"))
    elif (run / "model").is_dir():
        mcfg = cfg.model.model_copy(update={"name": str(run / "model"), "revision": None})
        tokenizer = models.load_tokenizer(str(run / "model"), mcfg)
        model = models.load_causal_lm(str(run / "model"), mcfg)
    else:
        raise UserError(f"{run.path}: no adapter/ or model/ (did the run finish?)")
    model.eval()
    return model, tokenizer, cfg


def export_merged(run: RunDir, out: str) -> None:
    model, tokenizer, _ = load_finetuned(run)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()  # LoRA folded into the weights: a plain HF model directory
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
