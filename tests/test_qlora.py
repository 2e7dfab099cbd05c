"""peft.method qlora on a tiny Llama, on CPU (bitsandbytes' 4-bit layers run there): the base loads as
4-bit layers under LoRA, LoRA's gradients equal those over the de-quantized weights (also after an
evaluation forward, which bitsandbytes would otherwise repack for a kernel without a backward), a run trains,
resumes exactly, exports merged unquantized weights, trains with DP-SGD, and missing pieces are refused."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from _cli import run_cli
from conftest import build_tiny_llama, crash_then_resume, write_config
from safetensors.torch import load_file

from tunesmith import models
from tunesmith.config import config_from_dict
from tunesmith.recipes import causal_lm

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def llama64(tmp_path_factory):
    # bitsandbytes quantizes in blocks of 64 along a row: the usual 32-wide tiny model is too narrow
    return build_tiny_llama(tmp_path_factory.mktemp("llama64"), hidden=64)


@pytest.fixture
def qlora_config(tiny_config, llama64):
    tiny_config["model"]["name"] = str(llama64)
    tiny_config["peft"]["method"] = "qlora"
    return tiny_config


def four_bit_layers(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]


def test_the_base_loads_in_4_bits_under_lora_and_only_lora_trains(qlora_config):
    cfg = config_from_dict(qlora_config)
    model = models.apply_peft(models.load_causal_lm(cfg.model.name, cfg.model, cfg.peft), cfg.peft)
    layers = four_bit_layers(model)
    assert len(layers) == 2 * 7  # q k v o gate up down in each of the 2 layers
    q = model.get_submodule(layers[0])
    assert q.weight.dtype == torch.uint8 and q.weight.quant_state.quant_type == "nf4"
    assert q.weight.quant_state.nested  # double quantization
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def dequantized_copy(model, cfg):
    """The same LoRA over plain float weights equal to the 4-bit layers' de-quantized values."""
    plain = models.apply_peft(models.load_causal_lm(cfg.model.name, cfg.model), cfg.peft)
    state = plain.state_dict()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                w = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
                state[f"{name}.weight"].copy_(w)
        for name, p in model.named_parameters():
            if p.requires_grad:
                state[name].copy_(p)
    return plain


def test_lora_gradients_equal_those_over_the_dequantized_weights_after_an_eval_forward(qlora_config, tiny_tokenizer):
    cfg = config_from_dict(qlora_config)
    torch.manual_seed(0)
    model = models.apply_peft(models.load_causal_lm(cfg.model.name, cfg.model, cfg.peft), cfg.peft)
    with torch.no_grad():  # LoRA starts with B = 0, where A gets no gradient: give B values
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    batch = tiny_tokenizer(["one two three four five", "the quick brown fox"], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model.eval()
    with torch.no_grad():  # the before-evaluation: must leave the 4-bit layers as they train
        model(**batch)
    model.train()
    model(**batch, labels=labels).loss.backward()
    plain = dequantized_copy(model, cfg).train()
    plain(**batch, labels=labels).loss.backward()
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    checked = 0
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.allclose(p.grad, grads[n], atol=1e-5, rtol=1e-4), n
            checked += 1
    assert checked == 2 * 2 * 7  # A and B of every wrapped layer, the first layer's included


def test_a_qlora_run_trains_resumes_exactly_and_exports_unquantized_merged_weights(
    tmp_path, qlora_config, monkeypatch, llama64
):
    qlora_config["train"].update(max_steps=6, save_every=2, lr=2e-2)
    qlora_config["eval"].update(every=3, samples=0)
    cfg = config_from_dict(qlora_config)
    run = causal_lm.train(cfg, overwrite=True).path
    uninterrupted = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    report = json.loads((run / "eval.json").read_text())
    assert report["finetuned"]["validation"]["loss"] < report["base"]["validation"]["loss"]
    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["base_model_name_or_path"] == str(llama64)

    resumed = load_file(
        str(crash_then_resume(causal_lm.train, cfg, monkeypatch, 4) / "adapter" / "adapter_model.safetensors")
    )
    for name, t in uninterrupted.items():
        assert torch.equal(resumed[name], t), name

    res = run_cli("export", run, "--merge", tmp_path / "merged")
    assert res.returncode == 0, res.stderr
    merged_config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in merged_config  # 16/32-bit weights any loader reads, as peers merge
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    base = load_file(str(llama64 / "model.safetensors"))
    key = "model.layers.1.self_attn.q_proj"
    a, b = (resumed[f"base_model.model.{key}.lora_{x}.weight"] for x in "AB")
    scale = adapter_config["lora_alpha"] / adapter_config["r"]
    # the LoRA delta lands on the original (unquantized) base weight
    assert torch.allclose(merged[f"{key}.weight"], base[f"{key}.weight"] + scale * b @ a, atol=1e-6)


def test_qlora_trains_with_dp_sgd_and_spends_epsilon(tmp_path, qlora_config):
    qlora_config["train"].update(max_steps=3, batch_size=4)
    qlora_config["eval"]["samples"] = 0
    qlora_config["privacy"] = {"target_epsilon": 8.0, "expected_batch_size": 16}
    res = run_cli("train", write_config(tmp_path, qlora_config))
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "runs" / "tiny" / "eval.json").read_text())
    assert 0 < report["privacy"]["epsilon"] <= 8.0


def test_qlora_without_bitsandbytes_or_with_adapters_to_fold_is_refused_before_loading(
    tmp_path, qlora_config, monkeypatch
):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    cfg = config_from_dict(qlora_config)
    with pytest.raises(models.UserError, match="needs bitsandbytes") as err:
        models.load_causal_lm(cfg.model.name, cfg.model, cfg.peft)
    assert "tunesmith[qlora]" in err.value.hint
    qlora_config["model"]["adapters"] = [str(tmp_path)]
    res = run_cli("train", write_config(tmp_path, qlora_config))
    assert res.returncode == 2 and "cannot fold model.adapters" in res.stderr
