"""tunesmith's preference losses against TRL on a tiny Llama with LoRA and one batch of pairs: DPO and IPO
equal TRL DPOTrainer's loss and LoRA gradients, SimPO equals TRL CPOTrainer's simpo loss, to 1e-5. The
pairs are TRL's own tokenization, fed to tunesmith's one-row-per-pair layout (prompt once, block mask)."""

from __future__ import annotations

import types

import pytest
import torch

from tunesmith.config import PreferenceConfig
from tunesmith.data.pairs import PairRow, collate_pairs
from tunesmith.training.preference_loss import answer_logps, pair_losses

trl = pytest.importorskip("trl")


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """TRL's Trainer sets accelerate's process-wide state: later tests' Accelerator() must start afresh."""
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


PAIRS = [
    {"prompt": "reverse the words one two", "chosen": "two one", "rejected": "one two one"},
    {"prompt": "sort the numbers three one", "chosen": "one three", "rejected": "three"},
    {"prompt": "name the colour of the sky", "chosen": "blue", "rejected": "the quick brown fox jumps"},
    {"prompt": "one two three four", "chosen": "five six", "rejected": "four three two one zero"},
]


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")


def lora_model(path, weights: dict[str, torch.Tensor]):
    """The tiny model with LoRA holding `weights` (TRL's adapter after its B matrices were drawn)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), lora_config())
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    return model


def trl_dpo(tmp_path, path, tokenizer, loss_type: str):
    """TRL's loss and LoRA gradients on one batch of PAIRS; its tokenized rows and the adapter's weights.
    The base model goes in with a LoRA config, as TRL's docs show: the reference is the base with the
    adapter disabled (a ready PeftModel would make TRL copy the adapter as the reference instead)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=0.1,
        loss_type=[loss_type],
        per_device_train_batch_size=len(PAIRS),
        report_to=[],
        use_cpu=True,
        bf16=False,  # TRL's default is bf16: the comparison is in fp32
        max_length=None,
    )
    trainer = trl.DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(PAIRS),
        processing_class=tokenizer,
        peft_config=lora_config(),
    )
    torch.manual_seed(0)
    with torch.no_grad():  # B = 0 would make the policy the reference: every log-ratio 0
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    rows = [trainer.train_dataset[i] for i in range(len(PAIRS))]
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, trainer.data_collator(rows))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return float(loss.detach()), grads, rows, weights


def ours(path, rows, weights, pad, cfg: PreferenceConfig, chunked: bool):
    model = lora_model(path, weights)
    pairs = [
        PairRow(f"r{i}", f"x:{i}", r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for i, r in enumerate(rows)
    ]
    batch = collate_pairs(pairs, pad)
    with torch.no_grad(), model.disable_adapter():  # the reference: the base, as tunesmith's setup computes it
        reference, _ = answer_logps(model.eval(), batch, chunked)
    model.train()
    logps, counts = answer_logps(model, batch, chunked)
    loss = pair_losses(logps, counts, reference, cfg).sum() / len(pairs)  # the fitting loop's sum / pairs
    loss.backward()
    return float(loss.detach()), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, logps, counts


@pytest.mark.parametrize(("ours_loss", "trl_loss"), [("dpo", "sigmoid"), ("ipo", "ipo")])
@pytest.mark.parametrize("chunked", [True, False])
def test_dpo_and_ipo_equal_trl_dpo_trainer_loss_and_gradients(
    tmp_path, tiny_llama, tiny_tokenizer, ours_loss, trl_loss, chunked
):
    expected, expected_grads, rows, weights = trl_dpo(tmp_path, tiny_llama, tiny_tokenizer, trl_loss)
    cfg = PreferenceConfig(loss=ours_loss, beta=0.1)
    got, grads, _, _ = ours(tiny_llama, rows, weights, tiny_tokenizer.pad_token_id, cfg, chunked)
    assert abs(expected - 0.6931) > 1e-3  # the policy is not its reference
    assert abs(got - expected) < 1e-5, (got, expected)
    assert expected_grads.keys() == grads.keys() and len(grads) == 2 * 2 * 7
    for name, g in expected_grads.items():
        assert torch.allclose(grads[name], g, atol=1e-5, rtol=1e-4), (name, (grads[name] - g).abs().max())
    assert max(g.abs().max() for g in grads.values()) > 1e-3  # gradients that are there to compare


def test_simpo_equals_trl_cpo_trainers_simpo_loss(tmp_path, tiny_llama, tiny_tokenizer):
    from trl.experimental.cpo import CPOTrainer

    _, _, rows, weights = trl_dpo(tmp_path, tiny_llama, tiny_tokenizer, "sigmoid")  # its tokenized pairs
    cfg = PreferenceConfig(loss="simpo", beta=2.0, gamma=0.5)
    got, _, logps, counts = ours(tiny_llama, rows, weights, tiny_tokenizer.pad_token_id, cfg, chunked=True)
    mean = (logps / counts).detach()
    stub = types.SimpleNamespace(
        alpha=0.0,
        loss_type="simpo",
        simpo_gamma=0.5,
        beta=2.0,
        label_smoothing=0.0,
        accelerator=types.SimpleNamespace(device=torch.device("cpu")),
    )
    losses = CPOTrainer.cpo_loss(stub, mean[:, 0], mean[:, 1])[0]
    assert abs(got - float(losses.mean())) < 1e-5, (got, float(losses.mean()))


def test_the_sft_term_adds_the_chosen_answers_mean_token_nll():
    from tunesmith.training.preference_loss import pair_losses

    logps, counts = torch.tensor([[-6.0, -9.0], [-2.0, -1.0]]), torch.tensor([[3.0, 3.0], [4.0, 1.0]])
    reference = torch.tensor([[-7.0, -8.0], [-2.5, -0.5]])
    plain = pair_losses(logps, counts, reference, PreferenceConfig(beta=0.1))
    with_sft = pair_losses(logps, counts, reference, PreferenceConfig(beta=0.1, sft_weight=0.5))
    torch.testing.assert_close(with_sft - plain, 0.5 * torch.tensor([6.0 / 3, 2.0 / 4]))
    margin = torch.tensor([(-6 + 7) - (-9 + 8), (-2 + 2.5) - (-1 + 0.5)])  # by hand: -log sigmoid(beta * margin)
    torch.testing.assert_close(plain, -torch.nn.functional.logsigmoid(0.1 * margin))
