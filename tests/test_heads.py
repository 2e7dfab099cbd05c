"""Classifier pooling (`model.pooling`, heads.py): the logits are the head applied to a hand-written pooling of
the backbone's states, a pooled run trains, saves and is scored again the same by `tunesmith eval`/`predict`,
and pooling is refused where it cannot work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _cli import invoke_cli
from conftest import write_config
from reliability._harness import fresh_accelerator_state  # noqa: F401 (autouse fixture)
from safetensors.torch import load_file
from test_models import build_word_llama
from test_recipe_tasks import build_tiny_bert, classification_config

from tunesmith.config import ModelConfig, config_from_dict
from tunesmith.errors import UserError
from tunesmith.models import load_classifier
from tunesmith.recipes import recipe_for


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def word_llama(tmp_path_factory):
    return build_word_llama(tmp_path_factory.mktemp("word-llama"))


def hand_pooled(states: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """One row at a time, from the list of its real positions: the reference the batched pooling must match."""
    out = []
    for row, m in zip(states, mask):
        real = [i for i, v in enumerate(m.tolist()) if v == 1]
        if how == "mean":
            out.append(torch.stack([row[i] for i in real]).mean(0))
        else:
            out.append(row[real[0] if how == "cls" else real[-1]])
    return torch.stack(out)


def padded_batch(side: str):
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    if side == "left":
        ids, mask = ids.flip(-1), mask.flip(-1)  # the padded row's real tokens sit at the end
    return ids, mask


@pytest.mark.parametrize("how", ["mean", "cls", "last"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_logits_are_the_head_on_a_hand_written_pooling(how, side, arch, tiny_bert, word_llama):
    path = tiny_bert if arch == "bert" else word_llama
    model = load_classifier(str(path), ModelConfig(name=str(path), pooling=how), ["negative", "positive"], 0).eval()
    ids, mask = padded_batch(side)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        states = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        head = model.classifier if arch == "bert" else model.score
        expected = head(hand_pooled(states, mask, how))
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=1e-6)
    assert model.config.tunesmith_pooling == how


def test_mean_pooling_differs_from_the_architectures_own_head(tiny_bert):
    """A control: `auto` keeps BERT's pooler on [CLS], so the same weights give other logits than `mean`."""
    ids, mask = padded_batch("right")
    logits = {}
    for how in ("auto", "mean"):
        torch.manual_seed(0)  # the same fresh head for both
        model = load_classifier(str(tiny_bert), ModelConfig(name=str(tiny_bert), pooling=how), ["a", "b"], 0).eval()
        with torch.no_grad():
            logits[how] = model(input_ids=ids, attention_mask=mask).logits
    assert model.bert.pooler is None  # the unused [CLS] pooler is gone, so no LoRA or optimizer state sits on it
    assert not torch.allclose(logits["auto"], logits["mean"])


def test_pooling_mean_needs_a_backbone_that_takes_the_padding_mask(tiny_bert, monkeypatch):
    from transformers import BertModel

    def forward_without_mask(self, input_ids=None):
        raise AssertionError("never called: refused before")

    monkeypatch.setattr(BertModel, "forward", forward_without_mask)
    with pytest.raises(UserError, match="attention_mask"):
        load_classifier(str(tiny_bert), ModelConfig(name=str(tiny_bert), pooling="mean"), ["a", "b"], 0)
    load_classifier(str(tiny_bert), ModelConfig(name=str(tiny_bert), pooling="cls"), ["a", "b"], 0)  # needs none


def test_pooling_on_a_generative_task_is_a_config_error(tmp_path, tiny_llama):
    from tunesmith.errors import ConfigError

    tree = {
        "name": "x",
        "model": {"name": str(tiny_llama), "pooling": "mean"},
        "data": {"train": str(tmp_path / "t.jsonl"), "format": "instruction"},
    }
    with pytest.raises(ConfigError, match="model.pooling"):
        config_from_dict(tree)


def scored_again(run, validation: str, capsys) -> tuple[float, float, float]:
    """The validation accuracy of the training run, of `tunesmith eval RUN` and of `tunesmith predict RUN` on the
    same rows: a pooled run must be rebuilt with its pooling, or the last two would score another model."""
    tuned = json.loads((run / "eval.json").read_text())["finetuned"]["validation"]["accuracy"]
    res = invoke_cli("eval", run)
    assert res.returncode == 0, res.stderr
    rescored = json.loads((run / "eval.json").read_text())["finetuned"]["validation"]["accuracy"]
    truth = [json.loads(line)["label"] for line in Path(validation).read_text().splitlines()]
    res = invoke_cli("predict", run, "--input", validation)
    assert res.returncode == 0, res.stderr
    predicted = [json.loads(line)["label"] for line in res.stdout.splitlines() if line.startswith("{")]
    assert len(predicted) == len(truth)
    return tuned, rescored, 100 * sum(p == t for p, t in zip(predicted, truth)) / len(truth)


PEFTS = {
    "lora": {"method": "lora", "r": 8, "dropout": 0.0},
    "full": {"method": "full"},
    "freeze": {"method": "freeze", "trainable": ["bert.encoder.layer.1.*"]},
}


@pytest.mark.parametrize("method", sorted(PEFTS))
def test_a_mean_pooled_run_learns_and_is_scored_again_the_same(tmp_path, tiny_bert, method, capsys):
    tree = classification_config(tmp_path, tiny_bert)
    tree["model"]["pooling"] = "mean"
    tree["peft"] = PEFTS[method]
    cfg = config_from_dict(tree)
    run = recipe_for(cfg).train(cfg, overwrite=True)
    if method != "lora":  # the whole model is saved: its config.json says how it pools
        assert json.loads((run / "model" / "config.json").read_text())["tunesmith_pooling"] == "mean"
    tuned, rescored, predicted = scored_again(run.path, tree["data"]["validation"], capsys)
    assert tuned >= 87.5  # at most 2 of 16 wrong; majority: 62.5
    assert rescored == pytest.approx(tuned) and predicted == pytest.approx(tuned)


def test_a_decoder_classifier_pooled_on_its_last_token_trains_through_the_cli(tmp_path, capsys):
    """`tunesmith train` on a Llama whose config has no pad id (rows are padded with the tokenizer's), then
    `tunesmith eval` and `predict` on the finished run."""
    tree = classification_config(tmp_path, build_word_llama(tmp_path / "word-llama", config_pad=False))
    tree["model"]["pooling"] = "last"
    res = invoke_cli("train", write_config(tmp_path, tree))
    assert res.returncode == 0, res.stderr
    run = tmp_path / "runs" / tree["name"]
    head = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert any(".score." in k for k in head), sorted(head)  # the head trained and is saved with the adapter
    tuned, rescored, predicted = scored_again(run, tree["data"]["validation"], capsys)
    assert tuned >= 87.5
    assert rescored == pytest.approx(tuned) and predicted == pytest.approx(tuned)


def test_bad_pooling_stops_the_cli_before_training(tmp_path, tiny_bert, tiny_llama, capsys, monkeypatch):
    from transformers import BertModel

    tree = classification_config(tmp_path, tiny_bert)
    tree["model"]["pooling"] = "mean"
    monkeypatch.setattr(BertModel, "forward", lambda self, input_ids=None: None)
    res = invoke_cli("train", write_config(tmp_path, tree))
    assert res.returncode == 2 and "takes no attention_mask" in res.stderr
    assert not (tmp_path / "runs" / tree["name"] / "metrics.jsonl").exists()
    generative = {
        "name": "lm",
        "output_dir": str(tmp_path / "runs"),
        "model": {"name": str(tiny_llama), "pooling": "last"},
        "data": {"train": tree["data"]["train"], "format": "instruction"},
    }
    res = invoke_cli("train", write_config(tmp_path, generative))
    assert res.returncode == 2 and "model.pooling" in res.stderr
