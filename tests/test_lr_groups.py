"""Per-parameter learning rates (training/optim.py): `train.head_lr` for a classifier's head and
`train.layer_decay` down the layers, under full fine-tuning and LoRA; without them, the optimizer is as before."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

from tunesmith.config import PeftConfig, TrainConfig, config_from_dict
from tunesmith.errors import ConfigError
from tunesmith.models import apply_peft
from tunesmith.training.optim import build_optimizer, build_scheduler

LAYERS = 3


def tiny_bert_classifier():
    torch.manual_seed(0)
    return BertForSequenceClassification(
        BertConfig(
            vocab_size=20,
            hidden_size=8,
            num_hidden_layers=LAYERS,
            num_attention_heads=2,
            intermediate_size=16,
            max_position_embeddings=16,
            num_labels=2,
        )
    )


def tiny_llama_classifier():
    torch.manual_seed(0)
    return LlamaForSequenceClassification(
        LlamaConfig(
            vocab_size=20,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=LAYERS,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=16,
            num_labels=2,
            pad_token_id=0,
        )
    )


def rates(model, opt) -> dict[str, tuple[float, float]]:
    """name -> (peak lr, weight decay) of every parameter the optimizer holds."""
    by_id = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    return {n: by_id[id(p)] for n, p in model.named_parameters() if id(p) in by_id}


def expected_bert(name: str, lr: float, head: float, decay: float) -> float:
    if name.startswith("classifier."):
        return head
    if name.startswith("bert.embeddings."):
        return lr * decay ** (LAYERS + 1)
    if name.startswith("bert.encoder.layer."):
        return lr * decay ** (LAYERS - int(name.split(".")[3]))
    assert name.startswith("bert.pooler."), name  # above the last layer: the peak rate
    return lr


def test_full_fine_tuning_gets_a_head_rate_and_rates_that_decay_down_the_layers():
    model = tiny_bert_classifier()
    got = rates(model, build_optimizer(model, TrainConfig(lr=0.1, head_lr=0.3, layer_decay=0.5, weight_decay=0.01)))
    assert len(got) == len(list(model.parameters()))
    for name, p in model.named_parameters():
        assert got[name] == (pytest.approx(expected_bert(name, 0.1, 0.3, 0.5)), 0.01 if p.ndim >= 2 else 0.0), name
    assert got["bert.encoder.layer.0.output.dense.weight"][0] == pytest.approx(0.1 * 0.5**3)  # a control


def test_under_lora_the_saved_head_copy_gets_the_head_rate_and_adapters_decay():
    model = apply_peft(
        tiny_llama_classifier(),
        PeftConfig(method="lora", r=2, target_modules=["q_proj", "v_proj"]),
        task_type="SEQ_CLS",
    )
    got = rates(model, build_optimizer(model, TrainConfig(lr=0.1, head_lr=0.3, layer_decay=0.5)))
    assert got == {n: got[n] for n, p in model.named_parameters() if p.requires_grad}  # frozen ones are left out
    head = [n for n in got if ".score." in n]
    assert head and all(got[n][0] == pytest.approx(0.3) for n in head), head  # modules_to_save.default.weight
    for name in (n for n in got if ".lora_" in n):
        layer = int(name.split(".layers.")[1].split(".")[0])
        assert got[name][0] == pytest.approx(0.1 * 0.5 ** (LAYERS - layer)), name


def test_without_the_options_the_optimizer_has_its_two_groups_in_their_order():
    model = tiny_bert_classifier()
    opt = build_optimizer(model, TrainConfig(lr=0.1, weight_decay=0.01))
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(0.1, 0.01), (0.1, 0.0)]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_the_schedule_scales_each_groups_own_peak():
    model = tiny_bert_classifier()
    cfg = TrainConfig(lr=0.1, head_lr=0.4, warmup_steps=1, schedule="linear")
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, 4)
    peaks = [g["initial_lr"] for g in opt.param_groups]
    assert sorted(set(peaks)) == [0.1, 0.4]
    for factor in (0.5, 1.0, 2 / 3, 1 / 3):  # warmup: (step + 1) / (warmup + 1) of the peak, then linear to 0
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([factor * peak for peak in peaks])
        opt.step()
        sched.step()


def test_head_lr_on_a_generative_task_is_a_config_error(tmp_path):
    tree = {
        "name": "x",
        "model": {"name": "m"},
        "train": {"head_lr": 1e-3},
        "data": {"train": str(tmp_path / "t.jsonl"), "format": "instruction"},
    }
    with pytest.raises(ConfigError, match="train.head_lr"):
        config_from_dict(tree)


def test_a_checkpoint_of_other_rate_groups_is_refused_clearly():
    """A resume with --allow-drift over a changed head_lr: a clear error, not torch's bare ValueError."""
    from tunesmith.errors import UserError
    from tunesmith.training.checkpoint import optimizer_from_tensors, optimizer_to_tensors

    model = tiny_bert_classifier()
    meta, tensors = optimizer_to_tensors(build_optimizer(model, TrainConfig(lr=0.1, head_lr=0.3)))
    optimizer_from_tensors(build_optimizer(model, TrainConfig(lr=0.1, head_lr=0.2)), meta, tensors)  # same groups
    with pytest.raises(UserError, match="optimizer state does not fit"):
        optimizer_from_tensors(build_optimizer(model, TrainConfig(lr=0.1)), meta, tensors)
