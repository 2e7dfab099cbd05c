"""DP-SGD on a tiny Llama with LoRA on q/v: RELIABILITY.md S7 (per-example gradients and the DP-LoRA
update), S8 (clipping and noise calibration), S10 (sampling and normalisation), and the config's bad
input. The accountant and resume (S9) are in tests/reliability/test_privacy_resume.py."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import instruction_rows, write_jsonl

from tunesmith.config import config_from_dict
from tunesmith.data.collate import collate
from tunesmith.errors import UserError
from tunesmith.privacy.dp import DPSGD, check_model
from tunesmith.privacy.sampling import PoissonPlan, units_of
from tunesmith.recipes import building, causal_lm, fitting
from tunesmith.rundir import RunDir
from tunesmith.training.loss import per_example_loss_sum


@pytest.fixture
def dp_config(tmp_path, tiny_llama):
    train = write_jsonl(tmp_path / "data" / "train.jsonl", instruction_rows(64))
    val = write_jsonl(tmp_path / "data" / "val.jsonl", instruction_rows(8, seed=1))
    return {
        "name": "dp",
        "output_dir": str(tmp_path / "runs"),
        "seed": 0,
        "model": {"name": str(tiny_llama)},
        "peft": {"method": "lora", "r": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "data": {
            "train": str(train),
            "validation": str(val),
            "format": "instruction",
            "max_length": 128,
            "overlength": "drop",
        },
        "train": {
            "max_steps": 4,
            "lr": 0.1,
            "batch_size": 4,
            "grad_accum": 2,
            "warmup_ratio": 0.0,
            "schedule": "constant",
            "optimizer": "sgd",
            "log_every": 1,
        },
        "eval": {"batch_size": 8, "max_new_tokens": 4, "samples": 0, "before_after": False},
        "privacy": {"noise_multiplier": 1.0, "max_grad_norm": 0.5},
    }


def make_setup(cfg_dict) -> building.Setup:
    cfg = config_from_dict(cfg_dict)
    return causal_lm.setup(cfg, RunDir.create(cfg, resume=False, overwrite=True))


def trainables(s) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in s.model.named_parameters() if p.requires_grad}


def grad_samples(s, rows) -> dict[str, torch.Tensor]:
    """Per-example gradients of `rows` from the training path (hooks + the per-example loss)."""
    s.model.zero_grad(set_to_none=True)
    loss, _ = s.optim.loss_sum(s.model, collate(rows, s.tokenizer.pad_token_id))
    loss.backward()
    out = {n: p.grad_sample.detach().clone() for n, p in s.model.named_parameters() if p.requires_grad}
    s.optim.dp.reset()
    return out


def single_grads(s, row) -> dict[str, torch.Tensor]:
    s.model.zero_grad(set_to_none=True)
    loss, _ = s.optim.loss_sum(s.model, collate([row], s.tokenizer.pad_token_id))
    loss.backward()
    out = {n: p.grad.detach().clone() for n, p in s.model.named_parameters() if p.requires_grad}
    s.optim.dp.reset()
    return out


def nonzero_lora_b(s) -> None:
    # LoRA starts with B = 0, where A's gradient is 0 too: give B values so every matrix is exercised.
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in s.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)


# -- S7: per-example gradients and the DP-LoRA update --------------------------------------------------


def test_per_example_gradients_equal_single_example_gradients(dp_config):
    """S7 and S10c: each row's gradient in a padded batch equals its gradient alone, and does not change
    when another row of the batch gets longer (no step-wide token normalisation before clipping)."""
    s = make_setup(dp_config)
    s.model.double()
    nonzero_lora_b(s)
    rows = sorted(s.data.rows["train"][:4], key=lambda r: len(r.input_ids))  # different lengths: padding
    assert len({len(r.input_ids) for r in rows}) > 1
    batched = grad_samples(s, rows)
    for i, row in enumerate(rows):
        alone = single_grads(s, row)
        for name, g in alone.items():
            torch.testing.assert_close(batched[name][i], g, rtol=1e-7, atol=1e-10)
    longer = copy.copy(rows[0])
    longer.input_ids, longer.labels = rows[0].input_ids + rows[0].input_ids, rows[0].labels + rows[0].labels
    changed = grad_samples(s, [longer, *rows[1:]])
    for name in batched:
        torch.testing.assert_close(changed[name][1:], batched[name][1:], rtol=1e-7, atol=1e-10)
    assert not torch.allclose(changed[next(iter(batched))][0], batched[next(iter(batched))][0])  # control


class _Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).logits


def _frozen_as_buffers(model):
    """Opacus's checker takes every parameter as trainable; frozen base weights become buffers (same
    tensors, same forward) so the check covers exactly the LoRA matrices."""
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if not p.requires_grad:
                delattr(module, name)
                module.register_buffer(name, p.data, persistent=False)
    return model


def test_opacus_checks_pass_on_the_wrapped_model_in_hooks_and_ghost_modes(dp_config):
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.utils.per_sample_gradients_utils import check_per_sample_gradients_are_correct

    from tunesmith import models

    cfg = config_from_dict(dp_config)
    model = models.apply_peft(models.load_causal_lm(cfg.model.name, cfg.model), cfg.peft)
    model = _frozen_as_buffers(model).double().train()
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ids = torch.randint(3, 300, (4, 12))
    assert check_per_sample_gradients_are_correct(ids, _Logits(model), grad_sample_mode="hooks")
    # Ghost clipping never materialises per-example gradients, only their norms: compare those.
    wrapped = _Logits(copy.deepcopy(model))
    expected = []
    for i in range(len(ids)):
        wrapped.zero_grad()
        wrapped(ids[i : i + 1]).sum().backward()
        expected.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in wrapped.parameters()])))
    ghost = GradSampleModuleFastGradientClipping(
        _Logits(copy.deepcopy(model)), max_grad_norm=1.0, use_ghost_clipping=True, loss_reduction="sum"
    )
    ghost(ids).sum(dim=(1, 2)).sum().backward()
    torch.testing.assert_close(ghost.get_norm_sample(), torch.stack(expected), rtol=1e-6, atol=1e-8)


def test_batchnorm_and_half_frozen_layers_are_refused_before_training():
    with pytest.raises(UserError) as err:
        check_model(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)))
    assert "BatchNorm" in " ".join(err.value.problems)
    half = torch.nn.Linear(4, 4)
    half.weight.requires_grad = False
    with pytest.raises(UserError) as err:
        check_model(torch.nn.Sequential(half))
    assert "mixes frozen and trainable" in " ".join(err.value.problems)
    check_model(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)))  # control: accepted


def test_peft_model_loaded_in_eval_mode_still_records_per_example_gradients(dp_config):
    """The Opacus 1.6 trap: a PEFT model is in eval mode after loading; wrapped as is, the hooks see no
    activations. The engine switches it to training mode."""
    s = make_setup(dp_config)
    s.optim.dp.close()
    s.model.eval()
    s.optim.dp = DPSGD(s.model, torch.optim.SGD(s.model.parameters(), lr=0.1), s.cfg.privacy, 64, 0.125, 4, 0)
    assert s.model.training
    assert all(g.shape[0] == 2 for g in grad_samples(s, s.data.rows["train"][:2]).values())


def test_first_dp_step_moves_every_lora_b_leaves_the_base_bit_identical_and_the_adapter_reloads(dp_config, tmp_path):
    """S7 against Opacus #820 / PEFT #793: after one DP step every lora_B is non-zero and finite, frozen
    tensors are untouched, the step is bounded, and the saved adapter reproduces the logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dp_config["train"]["max_steps"] = 1
    s = make_setup(dp_config)
    frozen = {n: p.detach().clone() for n, p in s.model.named_parameters() if not p.requires_grad}
    before = trainables(s)
    fitting.fit(s)
    after = trainables(s)
    lora_b = [n for n in after if "lora_B" in n]
    assert len(lora_b) == 4  # q and v in each of 2 layers
    for n in lora_b:
        assert after[n].abs().sum() > 0 and torch.isfinite(after[n]).all(), n
    for n, p in s.model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n
    # SGD: the step is lr * (clipped sum + noise) / (q N). The clipped sum is at most rows * C, and the
    # noise's norm is about sigma * C * sqrt(d); 4 sigma C sqrt(d) bounds it with overwhelming probability.
    d = sum(t.numel() for t in after.values())
    rows = sum(len(m) for m in s.optim.plan.micro_batches(0))
    c, sigma, lr, expected = 0.5, s.optim.dp.sigma, 0.1, s.optim.plan.sample_rate * s.optim.plan.n_units
    step = torch.linalg.vector_norm(torch.cat([(after[n] - before[n]).flatten() for n in after]))
    assert 0 < step <= lr * (rows * c + 4 * sigma * c * math.sqrt(d)) / expected
    causal_lm.save(s)
    fresh = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(dp_config["model"]["name"]), s.run / "adapter"
    ).eval()
    s.model.eval()
    ids = torch.tensor([s.data.rows["validation"][0].input_ids])
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, s.model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


# -- S8: clipping and noise calibration ---------------------------------------------------------------


def _engine(s, sigma: float, c: float, n_units: int, q: float, seed: int = 0, lr: float = 0.1):
    pcfg = s.cfg.privacy.model_copy(update={"noise_multiplier": sigma, "max_grad_norm": c, "delta": 0.01 / n_units})
    s.optim.dp.close()
    opt = torch.optim.SGD([p for p in s.model.parameters() if p.requires_grad], lr=lr)
    return DPSGD(s.model, opt, pcfg, n_units, q, 10, seed), opt


def test_without_noise_one_example_is_clipped_to_exactly_c(dp_config):
    s = make_setup(dp_config)
    nonzero_lora_b(s)
    dp, _ = _engine(s, sigma=0.0, c=0.01, n_units=1, q=1.0)
    s.optim.dp = dp
    loss, _ = s.optim.loss_sum(s.model, collate(s.data.rows["train"][:1], s.tokenizer.pad_token_id))
    loss.backward()
    raw = torch.linalg.vector_norm(torch.stack([p.grad_sample.norm() for p in dp.optimizer.params]))
    assert raw > 0.01  # the example's own gradient is larger than C, so clipping acts
    dp.accumulate()
    dp.privatize(0)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in dp.optimizer.params]))
    assert norm.item() == pytest.approx(0.01, abs=5e-4)


def test_noise_on_a_zero_gradient_has_the_calibrated_size_and_is_reproducible(dp_config):
    """||delta theta||^2 over `steps` noise-only SGD steps is steps * n * sigma^2 C^2 lr^2 / B^2 within 15%."""
    s = make_setup(dp_config)
    params = [p for p in s.model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    sigma, c, lr, n_units, q, steps = 2.0, 0.5, 0.1, 100, 0.1, 20
    dp, opt = _engine(s, sigma, c, n_units, q, lr=lr)
    noises = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        dp.privatize(step)  # zero gradient: the clipped sum is empty, only noise is added
        noises.append(torch.cat([p.grad.flatten() for p in params]))
        opt.step()
    moved = sum(((p - p0) ** 2).sum() for p, p0 in zip(params, start)).item()
    n, b = sum(p.numel() for p in params), q * n_units
    assert moved == pytest.approx(steps * n * sigma**2 * c**2 * lr**2 / b**2, rel=0.15)
    assert not torch.equal(noises[0], noises[1])  # fresh noise every step
    assert dp.steps_taken == steps  # every noise step is an accountant step
    s2 = make_setup(dp_config)  # same seed, same steps: the same noise
    dp2, opt2 = _engine(s2, sigma, c, n_units, q, lr=lr)
    opt2.zero_grad(set_to_none=True)
    dp2.privatize(0)
    torch.testing.assert_close(torch.cat([p.grad.flatten() for p in dp2.optimizer.params]), noises[0])


def test_secure_mode_is_refused_without_a_csprng_instead_of_downgraded(dp_config):
    pytest.importorskip("opacus")
    try:
        import torchcsprng  # noqa: F401

        pytest.skip("torchcsprng is installed here")
    except ImportError:
        pass
    s = make_setup(dp_config)
    pcfg = s.cfg.privacy.model_copy(update={"secure_mode": True})
    s.optim.dp.close()
    with pytest.raises(UserError, match="secure RNG"):
        DPSGD(s.model, torch.optim.SGD(s.model.parameters(), lr=0.1), pcfg, 64, 0.125, 4, 0)


# -- S10: sampling and normalisation ------------------------------------------------------------------


def test_poisson_batches_average_q_n_and_empty_steps_are_still_taken():
    plan = PoissonPlan(units_of(None, 1000), expected_batch=20, micro_size=8, seed=3)
    sizes = [len(plan.step_rows(k)) for k in range(1000)]
    q, n = plan.sample_rate, 1000
    assert abs(sum(sizes) / 1000 - q * n) < 3 * math.sqrt(q * (1 - q) * n) / math.sqrt(1000)
    assert len(set(sizes)) > 5  # the batch size varies: sampled, not fixed
    assert plan.step_rows(17) == plan.step_rows(17)  # a pure function of the step (exact resume)
    sparse = PoissonPlan(units_of(None, 50), expected_batch=1, micro_size=8, seed=0)
    assert any(not sparse.step_rows(k) for k in range(200))


def test_a_poisson_step_is_dealt_out_longest_first_so_micro_batches_pad_less():
    lengths = [int(x) for x in torch.randint(5, 80, (1000,), generator=torch.Generator().manual_seed(0))]
    plain = PoissonPlan(units_of(None, 1000), expected_batch=64, micro_size=8, seed=3)
    grouped = PoissonPlan(units_of(None, 1000), expected_batch=64, micro_size=8, seed=3, lengths=lengths)

    def padded(micro: list[list[int]]) -> int:
        return sum(len(m) * max(lengths[i] for i in m) for m in micro)

    for k in range(5):
        micro = grouped.micro_batches(k)
        assert sorted(i for m in micro for i in m) == sorted(plain.step_rows(k))  # the same sample
        flat = [lengths[i] for m in micro for i in m]
        assert flat == sorted(flat, reverse=True)
        assert padded(micro) < 0.8 * padded(plain.micro_batches(k))
    ranks = [PoissonPlan(units_of(None, 1000), 64, 8, 3, 2, r, lengths=lengths).micro_batches(0) for r in (0, 1)]
    assert sorted(i for m in ranks[0] + ranks[1] for i in m) == sorted(plain.step_rows(0))  # each row once


def test_an_empty_poisson_step_is_a_noise_step_and_an_accountant_step(dp_config, monkeypatch):
    s = make_setup(dp_config)
    empty = {1}
    real = PoissonPlan.step_rows
    monkeypatch.setattr(PoissonPlan, "step_rows", lambda self, k: [] if k in empty else real(self, k))
    before = trainables(s)
    dp_config["train"]["max_steps"] = 2
    s.optim.total_steps = 2
    summary = fitting.fit(s)
    assert summary["data_steps"] == 2 and s.optim.dp.steps_taken == 2
    moved = trainables(s)
    assert any(not torch.equal(before[n], moved[n]) for n in before)


def test_user_level_sampling_takes_at_most_one_row_per_user():
    users = [f"u{i % 10}" for i in range(100)]  # 10 users, 10 rows each
    plan = PoissonPlan(units_of(users, 100), expected_batch=5, micro_size=4, seed=0)
    assert plan.n_units == 10 and plan.sample_rate == 0.5
    for k in range(50):
        rows = plan.step_rows(k)
        assert len({users[i] for i in rows}) == len(rows)
    assert len({i for k in range(50) for i in plan.step_rows(k)}) > 10  # different rows of a user over time


def test_micro_batch_size_changes_neither_q_epsilon_nor_the_update(dp_config, tmp_path):
    """S10b: 4 rows x 2 micro-batches and 2 rows x 4 sample the same rows with the same q, spend the
    same epsilon and, since the clipped sum does not depend on how rows are split, give the same weights."""
    results = []
    for batch, accum, micro in ((4, 2, 4), (2, 4, 2), (8, 1, 8), (4, 2, 1)):
        cfg = copy.deepcopy(dp_config)
        cfg["name"] = f"dp-{batch}-{micro}"
        cfg["train"].update(batch_size=batch, grad_accum=accum)
        s = make_setup(cfg)
        s.optim.plan.micro_size = micro  # 1: as after two out-of-memory back-offs
        fitting.fit(s)
        results.append((s.optim.plan.sample_rate, s.optim.dp.epsilon(), trainables(s)))
    (q0, e0, w0) = results[0]
    for q, e, w in results[1:]:
        assert q == q0 and e == e0
        for n in w0:
            torch.testing.assert_close(w[n], w0[n], rtol=1e-5, atol=1e-6)


def test_an_out_of_memory_back_off_mid_step_keeps_q_epsilon_and_the_update(dp_config):
    """K4 under DP: the half-accumulated step is dropped (its clipped sums too) and redone in smaller
    micro-batches; sampling, noise and accounting are those of the run without the fault."""
    clean = make_setup({**dp_config, "name": "clean"})
    fitting.fit(clean)
    s = make_setup({**dp_config, "name": "oom"})
    real, calls = s.optim.loss_sum, {"n": 0}

    def oom_once_at_the_second_micro_batch(model, batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, batch)

    s.optim.loss_sum = oom_once_at_the_second_micro_batch
    fitting.fit(s)
    assert s.optim.plan.micro_size == 2 and calls["n"] > 2
    assert s.optim.plan.sample_rate == clean.optim.plan.sample_rate and s.optim.dp.epsilon() == clean.optim.dp.epsilon()
    assert s.optim.dp.steps_taken == clean.optim.dp.steps_taken == 4
    a, b = trainables(clean), trainables(s)
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=1e-5, atol=1e-6)


def test_report_states_the_privacy_unit_and_epsilon(dp_config):
    from tunesmith.recipes.loop import train

    dp_config["train"]["max_steps"] = 2
    run = train(config_from_dict(dp_config), causal_lm)
    report = run.read_json("eval.json")
    assert report["epsilon"] == report["privacy"]["epsilon"] > 0
    assert report["delta"] == pytest.approx(1 / (10 * 64))
    assert report["privacy"]["guarantee"].startswith("sample-level")
    import json

    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    assert len(steps) == 2 and all(x["epsilon"] > 0 for x in steps)
    assert steps[1]["epsilon"] > steps[0]["epsilon"]


# -- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "privacy, message",
    [
        ({"target_epsilon": 0}, "target_epsilon must be > 0"),
        ({"target_epsilon": -1}, "target_epsilon must be > 0"),
        ({}, "set target_epsilon"),
        ({"target_epsilon": 3, "unit": "user"}, "needs user_column"),
    ],
)
def test_bad_privacy_blocks_are_config_errors(dp_config, privacy, message):
    dp_config["privacy"] = privacy
    with pytest.raises(UserError, match=message):
        config_from_dict(dp_config)


def test_delta_at_or_above_one_over_n_is_refused_before_training(dp_config):
    dp_config["privacy"]["delta"] = 1 / 64
    with pytest.raises(UserError, match="not below 1/N"):
        make_setup(dp_config)
    dp_config["privacy"]["delta"] = 1 / 640
    make_setup(dp_config)  # control: accepted


def test_user_unit_without_the_user_column_in_the_data_is_refused(dp_config):
    from tunesmith.errors import DataError

    dp_config["privacy"].update(unit="user", user_column="author")
    with pytest.raises(DataError) as err:
        make_setup(dp_config)
    assert "author" in " ".join([err.value.title, *err.value.problems])


def test_dp_refuses_what_would_break_its_guarantee(dp_config):
    for key, value in (
        ("data", {"packing": True}),
        ("train", {"gradient_checkpointing": True}),
        ("train", {"precision": "fp16"}),
    ):
        cfg = copy.deepcopy(dp_config)
        cfg[key].update(value)
        with pytest.raises(UserError) as err:
            config_from_dict(cfg)
        assert "privacy (DP-SGD) does not work with" in str(err.value)
