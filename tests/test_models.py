"""Loading models (models.py): what trains under `peft.method: freeze`, `model.dropout`, a decoder LM as a
classifier, and a hub id found in a local hub cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_recipe_tasks import build_tiny_bert, classification_config

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
    assert torch.equal(after["bert.embeddings.word_embeddings.weight"], before["bert.embeddings.word_embeddings.weight"])
