"""`tunesmith predict RUN --input FILE`: a classification run's label and class probabilities for every row,
one JSON line per input row, in input order. The model is built as the recipe builds it (base + the run's
adapter, or its saved full model), and rows are tokenized as in training."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tunesmith.inference import load_classifier_run, open_run, require_task, weights_dir
from tunesmith.inputs import one_text, read_texts


def predict(run_path, input_path: Path | None, batch_size: int | None = None, out=None, text: str | None = None) -> int:
    """One JSON line per row of `input_path`, or for the one `text`."""
    import torch

    from tunesmith.data.tokenize import tokenize_classification
    from tunesmith.recipes.classification import batch_logits

    run, cfg = open_run(run_path)
    require_task(run, cfg, classification=True)
    weights_dir(run)
    # every bad row is listed before any model loads
    examples = read_texts(input_path, cfg) if text is None else one_text(text)
    model, tokenizer, cfg, labels = load_classifier_run(run)
    for ex in examples:
        ex.label = labels[0]  # tokenize_classification wants a label; it is not used
    # One output per row: a row over max_length keeps its start (and closing token, or data.prompt's template
    # whole), as training's truncate does.
    split = tokenize_classification(examples, tokenizer, cfg.data.model_copy(update={"overlength": "truncate"}), labels)
    if split.counts["truncated"]:
        from tunesmith.console import console

        console.print(
            f"[yellow]{split.counts['truncated']} row(s) longer than data.max_length={cfg.data.max_length} "
            "tokens: their start was classified[/]"
        )
    device = next(model.parameters()).device
    out = out or sys.stdout
    for _, logits in batch_logits(model, split.rows, tokenizer.pad_token_id, batch_size or cfg.eval.batch_size, device):
        for probs in torch.softmax(logits, -1).tolist():
            best = max(range(len(labels)), key=probs.__getitem__)
            out.write(
                json.dumps({"label": labels[best], "probabilities": dict(zip(labels, probs))}, ensure_ascii=False)
                + "\n"
            )
    return len(split.rows)
