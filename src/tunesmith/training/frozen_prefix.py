"""`train.cache_frozen_layers`: compute the frozen bottom layers once per row, not once per epoch.

With LoRA on the top layers only (say `target_modules: 'model\\.layers\\.(1[5-9]|2\\d)\\..*_proj'`), the
layers below the first trained one never change and hold no dropout, so they give a row the same hidden
states in every epoch. The backward already stops at the first trained layer; this cache takes their
forward away too after a row's first pass, which in later epochs leaves the trained layers' forward and
backward. Everything a DP step computes stays the same (the clipped per-example gradients live in the
trained layers), so the privacy accounting is untouched.

The cached forward is the model's own: the backbone runs with its layer list cut to the bottom (no final
norm) to fill the cache, and cut to the top with the cached states as `inputs_embeds` to use it. That holds
for decoders whose forward takes `inputs_embeds` as the first layer's input unchanged (the Llama family);
others are refused. Rows are keyed by their token ids (and the autocast dtype), so any batch order works.
Right padding and a causal mask keep a row's states independent of the batch it sits in; a batch that is
not like that (packed rows, explicit positions, left padding) runs the plain forward.
"""

from __future__ import annotations

import os
import types

import torch
from torch import nn

from tunesmith.console import console
from tunesmith.errors import UserError

# Decoders whose first layer takes `inputs_embeds` as given (Gemma, for one, scales it inside its forward).
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


def backbone_of(model: nn.Module) -> nn.Module:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.base_model  # the transformers backbone (LlamaModel) under a task head


def first_trained_layer(backbone: nn.Module) -> int:
    """The index of the lowest layer holding a trainable weight (len(layers) when none does)."""
    for i, layer in enumerate(backbone.layers):
        if any(p.requires_grad for p in layer.parameters()):
            return i
    return len(backbone.layers)


def check(backbone: nn.Module) -> int:
    """The number of frozen bottom layers to cache, or a UserError saying why there is nothing to cache."""
    kind = getattr(backbone.config, "model_type", type(backbone).__name__)
    if kind not in SUPPORTED or not isinstance(getattr(backbone, "layers", None), nn.ModuleList):
        raise UserError(
            f"train.cache_frozen_layers works with {', '.join(SUPPORTED)} decoders; this model is {kind}",
            hint="Set train.cache_frozen_layers: false.",
        )
    k = first_trained_layer(backbone)
    if k == 0 or any(p.requires_grad for p in backbone.embed_tokens.parameters()):
        raise UserError(
            "train.cache_frozen_layers: the bottom layer trains, so no layer's output stays the same",
            hint="Put LoRA on the top layers only, e.g. "
            "peft.target_modules: 'model\\.layers\\.(1[5-9]|2\\d)\\..*_proj'.",
        )
    if float(getattr(backbone.config, "attention_dropout", 0.0) or 0.0) > 0:
        raise UserError(
            "train.cache_frozen_layers needs the frozen layers to be deterministic; attention_dropout is "
            f"{backbone.config.attention_dropout}",
            hint="Set train.cache_frozen_layers: false.",
        )
    return k


class FrozenPrefix:
    """The backbone's forward with the bottom `k` layers' outputs cached per row, up to `budget` bytes."""

    def __init__(self, backbone: nn.Module, k: int, budget: int):
        self.backbone, self.k, self.budget = backbone, k, budget
        self.plain = backbone.forward
        self.states: dict[tuple, torch.Tensor] = {}
        self.bytes, self.full_warned = 0, False
        self.hits = self.misses = 0

    def attach(self) -> FrozenPrefix:
        self.backbone.forward = types.MethodType(lambda _, *a, **kw: self.forward(*a, **kw), self.backbone)
        self.backbone.frozen_prefix = self  # for the training summary (summary_of)
        return self

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        if not self.cacheable(input_ids, attention_mask, kwargs):
            return self.plain(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        rows = self.states_of(input_ids, attention_mask)
        # Padding positions stay zero: under right padding and a causal mask no real token reads them.
        hidden = rows[0].new_zeros(len(rows), input_ids.shape[1], rows[0].shape[-1])
        for i, state in enumerate(rows):
            hidden[i, : len(state)] = state
        for name in ("inputs_embeds", "use_cache"):
            kwargs.pop(name, None)
        with self.layers(self.backbone.layers[self.k :]):
            return self.plain(inputs_embeds=hidden, attention_mask=attention_mask, use_cache=False, **kwargs)

    def states_of(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """Each row's bottom-layer output over its real tokens: from the cache, or computed (and kept while
        the budget allows)."""
        where = input_ids.device.type
        dtype = torch.get_autocast_dtype(where) if torch.is_autocast_enabled(where) else None  # bf16 states differ
        keys = [(dtype, input_ids[i, :n].cpu().numpy().tobytes()) for i, n in enumerate(attention_mask.sum(1).tolist())]
        missing = [i for i, key in enumerate(keys) if key not in self.states]
        fresh = dict(zip(missing, self.bottom(input_ids[missing], attention_mask[missing]))) if missing else {}
        self.hits, self.misses = self.hits + len(keys) - len(missing), self.misses + len(missing)
        for i, state in fresh.items():
            size = state.numel() * state.element_size()
            if self.bytes + size > self.budget:
                self.warn_full()
                continue
            self.states[keys[i]], self.bytes = state, self.bytes + size
        return [fresh[i] if i in fresh else self.states[key] for i, key in enumerate(keys)]

    def summary(self) -> dict:
        return {
            "layers": self.k,
            "rows": len(self.states),
            "hits": self.hits,
            "misses": self.misses,
            "gib": round(self.bytes / 2**30, 3),
        }

    @torch.no_grad()
    def bottom(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """The bottom layers' output for these rows, each cut to its real tokens (no final norm)."""
        width = int(attention_mask.sum(1).max())
        ids, mask = input_ids[:, :width], attention_mask[:, :width]
        norm = self.backbone.norm
        with self.layers(self.backbone.layers[: self.k]):
            self.backbone.norm = nn.Identity()
            try:
                out = self.plain(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            finally:
                self.backbone.norm = norm
        return [out[row, :n].clone() for row, n in enumerate(mask.sum(1).tolist())]

    def layers(self, subset):
        return _Swapped(self.backbone, nn.ModuleList(subset))

    @staticmethod
    def cacheable(input_ids, attention_mask, kwargs: dict) -> bool:
        given = [kwargs.get(k) for k in ("inputs_embeds", "position_ids", "cache", "past_key_values")]
        if input_ids is None or any(v is not None for v in given):
            return False
        if attention_mask is None:
            return True
        if attention_mask.dim() != 2:
            return False  # a packed batch's block mask: its rows share a sequence
        # Right padding only: a row's real tokens first, so its positions do not depend on the batch width.
        return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())

    def warn_full(self) -> None:
        if not self.full_warned:
            self.full_warned = True
            console.print(
                f"[yellow]train.cache_frozen_layers: the cache is full ({self.bytes / 2**30:.1f} GiB); "
                "further rows run through every layer[/]"
            )


class _Swapped:
    """The backbone's layer list replaced for one forward, restored whatever happens."""

    def __init__(self, backbone: nn.Module, layers: nn.ModuleList):
        self.backbone, self.new = backbone, layers

    def __enter__(self):
        self.old = self.backbone.layers
        self.backbone.layers = self.new

    def __exit__(self, *exc):
        self.backbone.layers = self.old


def summary_of(model: nn.Module) -> dict | None:
    """What the cache did in this run (eval.json's training summary), or None without one."""
    cache = getattr(backbone_of(model), "frozen_prefix", None)
    return cache.summary() if cache is not None else None


def memory_budget(device: torch.device) -> int:
    """A quarter of the memory the cache lives in: the accelerator's, or the machine's RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 4
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


def cache_frozen_layers(model: nn.Module, device: torch.device) -> FrozenPrefix:
    """Attach the cache to `model`'s backbone (refused, before training, where it cannot work)."""
    backbone = backbone_of(model)
    k = check(backbone)
    console.print(f"Caching the outputs of the {k} frozen bottom layers (train.cache_frozen_layers)")
    return FrozenPrefix(backbone, k, memory_budget(device)).attach()
