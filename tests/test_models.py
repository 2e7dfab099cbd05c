"""Loading models (models.py): what trains under `peft.method: freeze`, `model.dropout`, a decoder LM as a
classifier, and a hub id found in a local hub cache."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_recipe_tasks import FILLER, build_tiny_bert, classification_config

from tunesmith.config import config_from_dict
from tunesmith.recipes import classification, recipe_for
from tunesmith.rundir import RunDir


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def _saved_model(run: Path) -> dict:
    state = {}
    for f in sorted((run / "model").glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def test_freeze_always_trains_the_new_classification_head(tmp_path, tiny_bert, monkeypatch):
    """The patterns name one encoder layer only; the classifier head is new (random) and must train too."""
    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path / "home"))
    tree = classification_config(tmp_path, tiny_bert)
    tree["peft"] = {"method": "freeze", "trainable": ["bert.encoder.layer.1.*"]}
    tree["train"].update(max_steps=4, warmup_ratio=0.0)
    tree["eval"]["before_after"] = False
    cfg = config_from_dict(tree)
    (tmp_path / "scratch").mkdir()
    s = classification.setup(cfg, RunDir(tmp_path / "scratch"))  # the same seed: the same initial head
    trains = {n: p.requires_grad for n, p in s.model.named_parameters()}
    assert trains["classifier.weight"] and trains["classifier.bias"], trains
    assert trains["bert.encoder.layer.1.output.dense.weight"] and not trains["bert.embeddings.word_embeddings.weight"]
    before = {n: p.detach().clone() for n, p in s.model.named_parameters()}
    run = recipe_for(cfg).train(cfg, overwrite=True)
    after = _saved_model(run.path)
    assert not torch.equal(after["classifier.weight"], before["classifier.weight"])
    frozen = "bert.embeddings.word_embeddings.weight"
    assert torch.equal(after[frozen], before[frozen])


def test_model_dropout_reaches_the_modules(tiny_llama, tiny_bert):
    """The override is applied to the config before the weights load, so the modules are built with it."""
    from tunesmith.config import ModelConfig
    from tunesmith.models import load_causal_lm, load_classifier

    lm = load_causal_lm(str(tiny_llama), ModelConfig(name=str(tiny_llama), dropout=0.3))
    assert lm.config.attention_dropout == 0.3
    assert {layer.self_attn.attention_dropout for layer in lm.model.layers} == {0.3}
    bert = load_classifier(str(tiny_bert), ModelConfig(name=str(tiny_bert), dropout=0.25), ["a", "b"])
    rates = {m.p for m in bert.modules() if isinstance(m, torch.nn.Dropout)}
    assert rates == {0.25}, rates
    default = load_classifier(str(tiny_bert), ModelConfig(name=str(tiny_bert)), ["a", "b"])
    assert {m.p for m in default.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}  # unset: the model's own


def build_word_llama(path: Path, config_pad: bool = True) -> Path:
    """A tiny random Llama whose tokenizer has one token per word of the sentiment rows (the shared tiny
    Llama spells "good" and "bad" letter by letter, and on 64 rows it memorises rather than learns)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = ["<pad>", "<unk>", "<s>", "</s>", *FILLER, "good", "bad"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(path)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0 if config_pad else None,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.mark.parametrize("config_pad", [True, False], ids=["pad-in-config", "pad-only-in-tokenizer"])
def test_a_decoder_lm_as_a_classifier_trains_and_evaluates(tmp_path, monkeypatch, config_pad):
    """Llama with a sequence-classification head ("score"), LoRA plus the head, scored on the last
    real token: it learns the good/bad rule past the majority baseline. Without pad_token_id in the model
    config (many decoders), the model must still find the last real token by the id rows are padded with."""
    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path / "home"))
    tree = classification_config(tmp_path, build_word_llama(tmp_path / "word-llama", config_pad))
    tree["train"].update(max_steps=40, lr=1e-2)
    (tmp_path / "scratch").mkdir()
    s = classification.setup(config_from_dict(tree), RunDir(tmp_path / "scratch"))
    row = s.data.rows["validation"][0]
    rows = [dataclasses.replace(row, input_ids=row.input_ids[:3]), row]  # the first is padded in the batch
    with torch.no_grad():  # a padded row is scored on its last real token, as when it is alone
        batched = s.model(
            **{k: v for k, v in classification.collate_labeled(rows, s.tokenizer.pad_token_id).items() if k != "labels"}
        ).logits
        alone = s.model(input_ids=torch.tensor([rows[0].input_ids])).logits
    torch.testing.assert_close(batched[0], alone[0])
    run, report = train_dict(tree)
    assert report["task"] == "classification"
    base, tuned = report["base"]["validation"], report["finetuned"]["validation"]
    assert base["accuracy"] == pytest.approx(62.5)  # majority class: 10 of the 16 rows
    print(f"decoder classifier accuracy {tuned['accuracy']}")
    assert tuned["accuracy"] >= 87.5, tuned  # at most 2 of 16 wrong
    assert json.loads((run / "adapter" / "labels.json").read_text()) == ["negative", "positive"]
    head = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert any("score" in k for k in head), sorted(head)  # the new head is saved with the adapter


def train_dict(tree: dict):
    cfg = config_from_dict(tree)
    run = recipe_for(cfg).train(cfg, overwrite=True)
    return run.path, json.loads((run / "eval.json").read_text())


def test_a_regex_of_target_modules_puts_lora_on_the_top_layers_only_and_backward_stops_there():
    """peft.target_modules as a regular expression (peft's whole-name match): LoRA on the last layer of three,
    the classifier head trains as always, and no gradient flows through the layers below (the speed-up)."""
    from test_lr_groups import tiny_llama_classifier

    from tunesmith.config import PeftConfig
    from tunesmith.models import apply_peft

    model = apply_peft(tiny_llama_classifier(), PeftConfig(r=2, target_modules=r"model\.layers\.2\..*_proj"), "SEQ_CLS")
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(".layers.2." in n or ".score." in n for n in trained)
    assert any("lora_A" in n for n in trained) and any(".score." in n for n in trained)
    seen = {}
    for i in (0, 1, 2):
        layer = model.base_model.model.model.layers[i]
        layer.register_forward_hook(
            lambda _m, _i, out, i=i: seen.update({i: out[0] if isinstance(out, tuple) else out})
        )
    model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([1])).loss.backward()
    assert not seen[0].requires_grad and not seen[1].requires_grad  # nothing to differentiate below layer 2
    assert seen[2].requires_grad
