"""Opacus #820 (Opacus + PEFT silently corrupting LoRA weights) and ghost clipping: one tunesmith DP-SGD
step on a tiny Llama with LoRA equals the step computed by hand, one example at a time with plain
autograd (each gradient clipped to C, summed, noised, divided by the expected batch, an SGD update),
in both per-example modes; the frozen base stays bit-identical."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from test_privacy import dp_config  # noqa: F401 (the fixture)

from tunesmith import models
from tunesmith.config import config_from_dict
from tunesmith.data.tokenize import IGNORE
from tunesmith.errors import UserError
from tunesmith.recipes import causal_lm, classification, fitting
from tunesmith.rundir import RunDir

LR, C, EXPECTED = 0.1, 2.5, 8  # C lies among the examples' gradient norms: some are clipped, some not


@pytest.fixture
def exact_config(dp_config):
    dp_config["name"] = "exact"
    # SGD and a constant lr (as in dp_config): the update is lr times the privatised gradient, nothing else
    dp_config["train"].update(max_steps=1, lr=LR, batch_size=3)
    dp_config["privacy"] = {"noise_multiplier": 0.0, "max_grad_norm": C, "expected_batch_size": EXPECTED}
    return dp_config


def dp_setup(cfg_dict: dict, mode: str, sigma: float = 0.0):
    cfg_dict = copy.deepcopy(cfg_dict)
    cfg_dict["name"] = f"exact-{mode}-{sigma}"
    cfg_dict["privacy"].update(grad_sample_mode=mode, noise_multiplier=sigma)
    cfg = config_from_dict(cfg_dict)
    s = causal_lm.setup(cfg, RunDir.create(cfg, resume=False, overwrite=True))
    s.model.double()  # float64: the two computations agree far below the 1e-6 the test asks
    torch.manual_seed(1)  # LoRA starts with B = 0, where A's gradient is 0 too: give B values
    with torch.no_grad():
        for n, p in s.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return s


def plain_copy(s) -> torch.nn.Module:
    """The same weights in a model Opacus never touched: no hooks, no grad_sample."""
    model = models.apply_peft(models.load_causal_lm(s.cfg.model.name, s.cfg.model), s.cfg.peft).double()
    model.load_state_dict(s.model.state_dict())
    return model.train()


def by_hand(model, rows, c: float) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Sum over `rows` of each row's gradient (its mean token loss, alone, plain autograd) clipped to c."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    norms = []
    for row in rows:
        logits = model(input_ids=torch.tensor([row.input_ids])).logits[0, :-1]
        targets = torch.tensor(row.labels[1:])
        keep = targets != IGNORE
        loss = F.cross_entropy(logits[keep], targets[keep])
        grads = torch.autograd.grad(loss, list(params.values()))
        norm = math.sqrt(sum(float((g**2).sum()) for g in grads))
        norms.append(norm)
        for n, g in zip(params, grads):
            total[n] += min(1.0, c / norm) * g
    return total, norms


def trainables(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def frozen(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def step_rows(s) -> list:
    return [s.data.rows["train"][i] for m in s.optim.plan.micro_batches(0) for i in m]


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_one_dp_lora_step_equals_the_hand_computed_dp_sgd_step(exact_config, mode):
    s = dp_setup(exact_config, mode)
    rows = step_rows(s)
    assert len(rows) != EXPECTED and len(s.optim.plan.micro_batches(0)) > 1  # Poisson: divided by q N, not the draw
    clipped_sum, norms = by_hand(plain_copy(s), rows, C)
    assert min(norms) < C < max(norms)  # clipping acts on some rows and not on others
    before, base = trainables(s.model), frozen(s.model)
    fitting.fit(s)
    after = trainables(s.model)
    assert after.keys() == clipped_sum.keys() and len(after) == 8  # A and B of q and v in 2 layers
    for n in after:
        expected = before[n] - LR * clipped_sum[n] / EXPECTED
        torch.testing.assert_close(after[n], expected, rtol=0, atol=1e-6, msg=n)
        assert (after[n] - before[n]).abs().max() > 1e-3, n  # every matrix moved far more than the tolerance
    for n, p in frozen(s.model).items():
        assert torch.equal(p, base[n]), n  # the base weights are bit-identical
    unclipped, _ = by_hand(plain_copy(s), rows, math.inf)  # control: without clipping the step is elsewhere
    assert any((unclipped[n] - clipped_sum[n]).abs().max() > 1e-3 for n in after)


def test_the_noise_has_std_sigma_c_over_the_expected_batch_and_is_the_same_in_both_modes(exact_config):
    sigma, moved = 2.0, {}
    for mode in ("hooks", "ghost"):  # the same seed: the same rows and the same noise
        s = dp_setup(exact_config, mode, sigma)
        before, (clipped_sum, _) = trainables(s.model), by_hand(plain_copy(s), step_rows(s), C)
        fitting.fit(s)
        moved[mode] = trainables(s.model)
    for n in moved["hooks"]:
        torch.testing.assert_close(moved["ghost"][n], moved["hooks"][n], rtol=0, atol=1e-6, msg=n)
    # SGD: after = before - lr * (clipped_sum + noise) / B, so the noise is recovered exactly
    noise = torch.cat([((before[n] - moved["hooks"][n]) / LR - clipped_sum[n] / EXPECTED).flatten() for n in before])
    d, std = noise.numel(), sigma * C / EXPECTED
    assert d > 800  # LoRA A and B of q and v: enough coordinates to measure a std
    assert noise.std().item() == pytest.approx(std, rel=6 / math.sqrt(2 * d))  # six standard errors
    assert abs(noise.mean().item()) < 6 * std / math.sqrt(d)


def test_ghost_and_hooks_give_the_same_update_on_a_classifier_with_its_head(tmp_path):
    """LoRA on a BERT encoder plus the PEFT classifier head (a modules_to_save copy), with noise."""
    from test_recipe_tasks import build_tiny_bert, classification_config

    tree = classification_config(tmp_path, build_tiny_bert(tmp_path / "tiny-bert"))
    tree["train"].update(max_steps=2, batch_size=4)
    tree["eval"]["before_after"] = False
    tree["privacy"] = {"noise_multiplier": 1.0, "max_grad_norm": 0.5, "expected_batch_size": 16}
    weights = {}
    for mode in ("hooks", "ghost"):
        tree["name"], tree["privacy"]["grad_sample_mode"] = mode, mode
        cfg = config_from_dict(tree)
        s = classification.setup(cfg, RunDir.create(cfg, resume=False, overwrite=True))
        before = trainables(s.model)
        fitting.fit(s)
        weights[mode] = trainables(s.model)
    assert any("classifier" in n for n in weights["hooks"])
    for n in weights["hooks"]:
        torch.testing.assert_close(weights["ghost"][n], weights["hooks"][n], rtol=1e-5, atol=1e-6, msg=n)
        assert not torch.equal(weights["hooks"][n], before[n]), n


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_an_out_of_memory_after_the_forward_leaves_no_hook_state_behind(exact_config, mode):
    """A real out-of-memory comes in the forward or backward, after the hooks captured activations: the
    retried step must not take them for its own (nor, under ghost, count a tied weight)."""
    clean = dp_setup(exact_config, mode)
    fitting.fit(clean)
    s = dp_setup(exact_config, mode)
    real, calls = s.optim.loss_sum, {"n": 0}

    def oom_after_the_second_forward(model, batch):
        calls["n"] += 1
        out = real(model, batch)
        if calls["n"] == 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return out

    s.optim.loss_sum = oom_after_the_second_forward
    fitting.fit(s)
    assert s.optim.plan.micro_size == 1 and calls["n"] > 2
    a, b = trainables(clean.model), trainables(s.model)
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=0, atol=1e-9, msg=n)


def test_ghost_clipping_refuses_a_trainable_weight_that_two_layers_share(exact_config):
    """The tiny Llama ties its input and output embeddings: under full fine-tuning both layers train the
    same weight, and ghost clipping's per-layer norms would not be that weight's gradient norm."""
    exact_config["peft"] = {"method": "full"}
    with pytest.raises(UserError) as err:
        dp_setup(exact_config, "ghost")
    assert "share a trainable weight" in " ".join(err.value.problems)
    dp_setup(exact_config, "hooks")  # control: per-example gradients add up over both uses
