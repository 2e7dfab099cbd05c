"""The chunked loss gives the plain loss and gradients, and normalisation is per token."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tunesmith.config import PeftConfig
from tunesmith.data.collate import collate
from tunesmith.data.tokenize import IGNORE, Tokenized
from tunesmith.models import apply_peft
from tunesmith.training import loss as loss_mod


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i, n in enumerate((9, 14, 5, 12)):
        ids = torch.randint(3, 300, (n,), generator=g).tolist()
        cut = n // 2  # the first half is "prompt": no loss there
        rows.append(Tokenized(str(i), f"x:{i}", ids, [IGNORE] * cut + ids[cut:]))
    return collate(rows, pad_id=0)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_chunked_loss_matches_plain_loss_and_gradients(tiny_llama, monkeypatch, method):
    monkeypatch.setattr(loss_mod, "CHUNK", 7)  # several chunks, the last one partial
    batch = _batch()
    results = []
    for fn in (loss_mod.causal_lm_loss_sum, loss_mod.chunked_loss_sum):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(tiny_llama)
        model = apply_peft(base, PeftConfig(method=method, r=4, dropout=0.0))
        if method == "lora":  # lora_B starts at zero; give it values so every gradient path is exercised
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    torch.nn.init.normal_(p, std=0.1)
        loss, count = fn(model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), count, grads))
    (plain, n1, g1), (chunked, n2, g2) = results
    assert n1 == n2 == int((batch["labels"][:, 1:] != IGNORE).sum())
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-5, atol=1e-5, msg=name)


def test_choose_loss_falls_back_when_the_head_does_not_give_the_logits(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    batch = _batch()
    assert loss_mod.choose_loss(model, batch, chunked=True) is loss_mod.chunked_loss_sum
    assert loss_mod.choose_loss(model, batch, chunked=False) is loss_mod.causal_lm_loss_sum
    model.config.final_logit_softcapping = None
    original = model.forward

    def scaled(*a, **k):  # a model that post-processes its logits (e.g. a logit scale)
        out = original(*a, **k)
        out.logits = out.logits * 2
        return out

    model.forward = scaled
    assert loss_mod.choose_loss(model, batch, chunked=True) is loss_mod.causal_lm_loss_sum


def test_loss_is_a_token_sum_not_a_mean_of_row_means(tiny_llama):
    """Summing per-token losses over a step is what makes 8x1 and 2x4 equal; a mean of
    micro-batch means would weight the short micro-batch's tokens more (the 2024 bug)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    batch = _batch()
    with torch.no_grad():
        total, n = loss_mod.causal_lm_loss_sum(model, batch)
        halves = [loss_mod.causal_lm_loss_sum(model, {k: v[i : i + 2] for k, v in batch.items()}) for i in (0, 2)]
    assert sum(h[0] for h in halves) == pytest.approx(float(total), rel=1e-5)
    mean_of_means = sum(h[0] / h[1] for h in halves) / 2
    assert float(total) / n != pytest.approx(float(mean_of_means), rel=1e-3)  # the control differs
