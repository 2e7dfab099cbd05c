"""Sequence packing: the same loss and gradients as the rows unpacked, rows isolated from each other."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import instruction_rows, write_config, write_jsonl

from tunesmith.config import config_from_dict
from tunesmith.data.collate import collate
from tunesmith.data.pack import collate_packed, pack
from tunesmith.data.tokenize import IGNORE, Tokenized
from tunesmith.errors import ConfigError
from tunesmith.training.loss import causal_lm_loss_sum, chunked_loss_sum


def _rows(n: int = 9, seed: int = 0) -> list[Tokenized]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = int(torch.randint(4, 40, (1,), generator=g))
        ids = torch.randint(3, 250, (length,), generator=g).tolist()
        prompt = length // 3
        rows.append(Tokenized(f"r{i}", f"train.jsonl:{i + 1}", ids, [IGNORE] * prompt + ids[prompt:]))
    return rows


@pytest.fixture(scope="module")
def model(tiny_llama):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa", dtype=torch.float32)
    return m.eval()


def test_pack_places_every_row_once_within_max_length():
    rows = _rows(40)
    packs = pack(rows, 64)
    members = [m for p in packs for m in p.id.split("+")]
    assert sorted(members) == sorted(r.id for r in rows)
    assert all(len(p.input_ids) <= 64 and sum(p.lengths) == len(p.input_ids) for p in packs)
    assert len(packs) < len(rows) / 2  # rows of 4-40 tokens: several share each 64-token sequence
    assert [p.id for p in pack(rows, 64)] == [p.id for p in packs]  # deterministic


def test_collate_packed_mask_is_block_diagonal_and_causal():
    rows = [Tokenized("a", "x:1", [5, 6, 7], [IGNORE, 6, 7]), Tokenized("b", "x:2", [8, 9], [IGNORE, 9])]
    batch = collate_packed(pack(rows, 8), pad_id=0)
    mask = batch["attention_mask"][0, 0]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 1]
    expected = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]], dtype=torch.bool
    )
    assert torch.equal(mask, expected)
    # Row b's first token is not a target: row a's last token must not learn to predict it.
    assert batch["labels"][0].tolist() == [IGNORE, 6, 7, IGNORE, 9]
    assert int(batch["n_tokens"]) == 5


@pytest.mark.parametrize("loss_fn", [causal_lm_loss_sum, chunked_loss_sum])
def test_packed_loss_and_gradients_equal_the_unpacked(model, loss_fn):
    rows = _rows()
    packs = pack(rows, 96)
    assert len(packs) < len(rows)
    grads = []
    for batch in (collate(rows, 0), collate_packed(packs, 0)):
        model.zero_grad()
        loss, n = loss_fn(model, batch)
        loss.backward()
        grads.append((loss.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters()}))
    (a, na, ga), (b, nb, gb) = grads
    assert na == nb == sum(r.n_trainable for r in rows)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-5, atol=1e-5)


def test_reset_positions_without_the_block_mask_leak_across_rows(model):
    """The control: position ids alone do not isolate packed rows (the measured trap); the 4-D mask does."""
    rows = _rows()
    unpacked, _ = causal_lm_loss_sum(model, collate(rows, 0))
    batch = collate_packed(pack(rows, 96), 0)
    leaky = {**batch, "attention_mask": (batch["labels"] != -12345).long()}  # 2-D: every token attends back
    leaked, _ = causal_lm_loss_sum(model, leaky)
    assert abs(float(leaked) - float(unpacked)) > 1e-3


def test_packing_config_errors():
    base = {"data": {"train": "x.jsonl", "packing": True}}
    with pytest.raises(ConfigError, match="needs model.attn_implementation: sdpa"):
        config_from_dict({**base, "model": {"attn_implementation": "eager"}})
    with pytest.raises(ConfigError, match="classification rows are not packed"):
        config_from_dict({"data": {"train": "x.jsonl", "packing": True, "format": "classification"}})


def test_a_packed_run_trains_and_reports_the_fill(tmp_path, tiny_llama):
    from tunesmith.recipes import causal_lm

    train = write_jsonl(tmp_path / "train.jsonl", instruction_rows(48))
    cfg = write_config(
        tmp_path,
        {
            "name": "packed",
            "output_dir": str(tmp_path / "runs"),
            "model": {"name": str(tiny_llama)},
            "peft": {"method": "lora", "r": 4},
            "data": {"train": str(train), "format": "instruction", "max_length": 128, "packing": True},
            "train": {"max_steps": 3, "batch_size": 2, "lr": 1e-2},
            "eval": {"samples": 0, "before_after": False, "max_new_tokens": 2, "generate_rows": 2},
        },
    )
    from tunesmith.config import load_config

    run = causal_lm.train(load_config(cfg, []))
    report = json.loads((run / "data_report.json").read_text())["packing"]
    assert report["packs"] < report["rows"] and 0.5 < report["fill"] <= 1.0
    steps = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(steps) == 3 and all(s["loss"] == s["loss"] for s in steps)


def test_length_grouped_plan_covers_each_row_once_with_less_padding():
    from tunesmith.training.plan import LengthGroupedPlan, ShuffledPlan

    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(5, 500, (1000,), generator=g).tolist()
    grouped, plain = LengthGroupedPlan(lengths, 8, 1, seed=0), ShuffledPlan(1000, 8, 1, seed=0)

    def padding(plan, epoch):
        steps = range(epoch * plan.steps_per_epoch, (epoch + 1) * plan.steps_per_epoch)
        return sum(
            max(lengths[i] for i in m) * len(m) - sum(lengths[i] for i in m)
            for s in steps
            for m in plan.micro_batches(s)
        )

    for epoch in (0, 1):
        rows = [i for s in range(epoch * 125, (epoch + 1) * 125) for i in grouped.step_rows(s)]
        assert sorted(rows) == list(range(1000))
        assert padding(grouped, epoch) < 0.2 * padding(plain, epoch)
    assert grouped.epoch_order(0) != grouped.epoch_order(1)  # reshuffled every epoch
    again = LengthGroupedPlan(lengths, 8, 1, seed=0)
    assert [again.step_rows(s) for s in (3, 130)] == [grouped.step_rows(s) for s in (3, 130)]  # pure function


def test_gradient_checkpointing_trains_the_same_weights(tmp_path, tiny_llama):
    from safetensors.torch import load_file

    from tunesmith.config import load_config
    from tunesmith.recipes import causal_lm

    train = write_jsonl(tmp_path / "train.jsonl", instruction_rows(32))
    weights = []
    for gc in (False, True):
        cfg = write_config(
            tmp_path,
            {
                "name": f"gc-{gc}",
                "output_dir": str(tmp_path / "runs"),
                "model": {"name": str(tiny_llama)},
                "peft": {"method": "lora", "r": 4, "dropout": 0.0},
                "data": {"train": str(train), "format": "instruction", "max_length": 128},
                "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "gradient_checkpointing": gc},
                "eval": {"samples": 0, "before_after": False, "max_new_tokens": 2, "generate_rows": 2},
            },
        )
        run = causal_lm.train(load_config(cfg, []))
        weights.append(load_file(str(run / "adapter" / "adapter_model.safetensors")))
    assert sorted(weights[0]) == sorted(weights[1])
    moved = [k for k in weights[0] if "lora_B" in k and weights[0][k].abs().sum() > 0]
    assert moved  # the comparison is between trained adapters, not two zero matrices
    for k in weights[0]:
        torch.testing.assert_close(weights[0][k], weights[1][k], rtol=1e-5, atol=1e-6)


def test_bf16_loss_curve_stays_within_tolerance_of_fp32(tmp_path, tiny_llama):
    from accelerate.state import AcceleratorState

    from tunesmith.config import load_config
    from tunesmith.recipes import causal_lm

    train = write_jsonl(tmp_path / "train.jsonl", instruction_rows(64))
    curves = {}
    for precision in ("fp32", "bf16"):
        AcceleratorState._reset_state(reset_partial_state=True)  # one mixed-precision setting per state
        cfg = write_config(
            tmp_path,
            {
                "name": precision,
                "output_dir": str(tmp_path / "runs"),
                "model": {"name": str(tiny_llama)},
                "peft": {"method": "lora", "r": 4, "dropout": 0.0},
                "data": {"train": str(train), "format": "instruction", "max_length": 128, "packing": True},
                "train": {"max_steps": 12, "batch_size": 4, "lr": 1e-2, "precision": precision},
                "eval": {"samples": 0, "before_after": False, "max_new_tokens": 2, "generate_rows": 2},
            },
        )
        run = causal_lm.train(load_config(cfg, []))
        curves[precision] = [
            r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r
        ]
    AcceleratorState._reset_state(reset_partial_state=True)
    assert len(curves["fp32"]) == len(curves["bf16"]) == 12
    assert curves["fp32"][-1] < curves["fp32"][0]  # the curve is a learning curve, not flat
    for a, b in zip(curves["fp32"], curves["bf16"]):
        assert b == pytest.approx(a, rel=0.02)  # bf16 matmuls: ~3 significant digits
    assert curves["bf16"] != curves["fp32"]  # and bf16 really ran
