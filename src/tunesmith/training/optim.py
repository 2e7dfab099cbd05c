"""AdamW (or SGD) with decay only on matrices, per-parameter learning rates (a classifier's head, layer-wise
decay), and warmup + decay schedules."""

from __future__ import annotations

import math
import re

import torch

from tunesmith.config import TrainConfig
from tunesmith.heads import HEAD_NAMES

LAYER = re.compile(r"\.(?:layer|layers|h|blocks?)\.(\d+)\.")  # BERT, Llama/Qwen, GPT-2, T5 block names
EMBEDDING = re.compile(r"embed|\.wte\.|\.wpe\.")


def build_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    named = list(model.named_parameters())
    depth = 1 + max((int(m.group(1)) for n, _ in named if (m := LAYER.search(n))), default=-1)
    groups: dict[tuple[float, bool], list] = {}
    for name, p in named:
        if p.requires_grad:
            # Biases and norm gains are vectors; decaying them toward 0 only hurts.
            groups.setdefault((lr_of(name, cfg, depth), p.ndim >= 2), []).append(p)
    # highest rate first, matrices before vectors: with one rate, the two groups in the order they always had
    params = [
        {"params": groups[key], "lr": key[0], "weight_decay": cfg.weight_decay if key[1] else 0.0}
        for key in sorted(groups, key=lambda k: (-k[0], not k[1]))
    ]
    return torch.optim.SGD(params, lr=cfg.lr) if cfg.optimizer == "sgd" else torch.optim.AdamW(params, lr=cfg.lr)


def lr_of(name: str, cfg: TrainConfig, depth: int) -> float:
    """The peak rate of parameter `name` in a model of `depth` numbered layers."""
    if cfg.head_lr is not None and HEAD_NAMES & set(name.split(".")):
        return cfg.head_lr
    if cfg.layer_decay is None:
        return cfg.lr
    # embeddings sit below layer 0; the head, final norm and pooler above the last layer train at lr
    below = depth + 1 if EMBEDDING.search(name) else depth - int(m.group(1)) if (m := LAYER.search(name)) else 0
    return cfg.lr * cfg.layer_decay**below


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    return cfg.warmup_steps if cfg.warmup_steps is not None else int(round(cfg.warmup_ratio * total_steps))


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the peak lr for the update at 0-based `step`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer, cfg: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warm = warmup_steps(cfg, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warm, total_steps, cfg.schedule))
