"""`model.head_init: label_words` with a classification `data.prompt` template (heads.py): the new head starts as
the language-model head's rows of the labels' words, so on the last token the classifier's logits are the LM's
next-token logits for those words (its zero-shot answer); the template reaches training, eval and predict; and
what cannot work is refused before training."""

from __future__ import annotations

import pytest
import torch
from _cli import invoke_cli
from conftest import write_config
from reliability._harness import fresh_accelerator_state  # noqa: F401 (autouse fixture)
from test_heads import scored_again
from test_models import build_word_llama
from test_recipe_tasks import build_tiny_bert, classification_config

from tunesmith.config import DataConfig, ModelConfig, config_from_dict
from tunesmith.errors import ConfigError, UserError
from tunesmith.heads import label_word_ids
from tunesmith.models import load_classifier

PROMPT = "Review: {text}\nSentiment:"


@pytest.fixture(scope="module")
def word_llamas(tmp_path_factory):
    """The word-level tiny Llama with tied embeddings, and a copy whose LM head is its own matrix."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tied = build_word_llama(tmp_path_factory.mktemp("tied"))
    untied = tmp_path_factory.mktemp("untied")
    model = AutoModelForCausalLM.from_pretrained(tied)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))  # differs from the embeddings
    model.save_pretrained(untied)
    AutoTokenizer.from_pretrained(tied).save_pretrained(untied)
    return {"tied": tied, "untied": untied}


@pytest.mark.parametrize("kind", ["tied", "untied"])
def test_the_head_starts_as_the_lm_next_token_logits_of_the_label_words(kind, word_llamas):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(word_llamas[kind])
    tok = AutoTokenizer.from_pretrained(path)
    ids = label_word_ids(tok, ["bad", "good"])
    assert ids == [tok.convert_tokens_to_ids("bad"), tok.convert_tokens_to_ids("good")]
    clf = load_classifier(path, ModelConfig(name=path, pooling="last"), ["bad", "good"], tok.pad_token_id, None, ids)
    lm = AutoModelForCausalLM.from_pretrained(path)
    batch = tok(["the plot was good and", "bad"], return_tensors="pt", padding=True)
    with torch.no_grad():
        got = clf(**batch).logits
        last = batch["attention_mask"].sum(1) - 1
        want = lm(**batch).logits[torch.arange(2), last][:, ids]
    torch.testing.assert_close(got, want)


def test_labels_that_share_a_first_token_are_refused(word_llamas):
    from transformers import AutoTokenizer

    path = str(word_llamas["tied"])
    tok = AutoTokenizer.from_pretrained(path)
    labels = ["negative", "positive"]  # both unknown words: the same <unk> token
    with pytest.raises(UserError, match="first tokens differ"):
        load_classifier(path, ModelConfig(name=path, pooling="last"), labels, None, None, label_word_ids(tok, labels))


def test_the_refusals_come_before_any_weights_load(tmp_path, word_llamas, monkeypatch):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded before the refusal")

    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", no_weights)
    bert = str(build_tiny_bert(tmp_path / "bert"))
    with pytest.raises(UserError, match="needs a decoder language model"):
        load_classifier(bert, ModelConfig(name=bert, pooling="last"), ["negative", "positive"], None, None, [5, 6])
    llama = str(word_llamas["tied"])
    shared = label_word_ids(AutoTokenizer.from_pretrained(llama), ["negative", "positive"])
    with pytest.raises(UserError, match="first tokens differ"):
        load_classifier(llama, ModelConfig(name=llama, pooling="last"), ["negative", "positive"], None, None, shared)


def test_a_prompted_label_word_run_trains_and_is_scored_again_the_same(tmp_path, tiny_llama, capsys):
    """The template wraps every row in training, `tunesmith eval` and `tunesmith predict`: all three agree."""
    from tunesmith.recipes import classification
    from tunesmith.rundir import RunDir

    tree = classification_config(tmp_path, tiny_llama)
    tree["model"].update(pooling="last", head_init="label_words")
    tree["data"].update(prompt=PROMPT, max_length=64)
    tree["train"]["max_steps"] = 4
    cfg = config_from_dict(tree)
    (tmp_path / "scratch").mkdir()
    s = classification.setup(cfg, RunDir(tmp_path / "scratch"))
    text = s.tokenizer.decode(s.data.rows["validation"][0].input_ids)
    assert text.startswith("Review: ") and text.endswith("\nSentiment:"), text
    res = invoke_cli("train", write_config(tmp_path, tree))
    assert res.returncode == 0, res.stderr
    tuned, rescored, predicted = scored_again(tmp_path / "runs" / tree["name"], tree["data"]["validation"], capsys)
    assert rescored == pytest.approx(tuned) and predicted == pytest.approx(tuned)


def test_what_cannot_work_is_refused_before_training(tmp_path, tiny_llama):
    tree = classification_config(tmp_path, tiny_llama)
    tree["model"].update(pooling="mean", head_init="label_words")
    with pytest.raises(ConfigError, match="model.pooling: last"):
        config_from_dict(tree)
    tree["model"]["pooling"] = "last"
    tree["data"]["prompt"] = "Sentiment of the review:"
    with pytest.raises(ConfigError, match=r"\{text\}"):
        config_from_dict(tree)
    bert = classification_config(tmp_path, build_tiny_bert(tmp_path / "bert"))
    bert["model"].update(pooling="last", head_init="label_words")
    res = invoke_cli("train", write_config(tmp_path, bert))
    assert res.returncode == 2 and "needs a decoder language model" in res.stderr
    assert not (tmp_path / "runs" / bert["name"] / "metrics.jsonl").exists()


def _tokenized(tokenizer, template: str, max_length: int, text: str):
    from tunesmith.data.formats import Example
    from tunesmith.data.tokenize import tokenize_classification

    labels = ["negative", "positive"]
    data = DataConfig(
        train="t.jsonl",
        format="classification",
        labels=labels,
        prompt=template,
        max_length=max_length,
        overlength="truncate",
    )
    return tokenize_classification([Example("r1", "r1", text=text, label="positive")], tokenizer, data, labels)


def test_a_long_row_is_cut_inside_the_template_so_its_tail_stays(tiny_tokenizer):
    text = " ".join(f"word{i}" for i in range(200))
    tail = tiny_tokenizer("\nSentiment:", add_special_tokens=False)["input_ids"]
    split = _tokenized(tiny_tokenizer, PROMPT, 40, text)
    ids = split.rows[0].input_ids
    assert split.counts["truncated"] == 1 and len(ids) <= 40
    assert ids[-len(tail) :] == tail  # the template's end survives; the review's end does not
    decoded = tiny_tokenizer.decode(ids)
    assert decoded.count("Review:") == 1 and "word0 word1" in decoded and "word199" not in decoded

    long_template = "Read the following movie review with care and then answer: {text}\nSentiment:"
    with pytest.raises(UserError, match="data.prompt alone"):  # the template alone is longer than 8 tokens
        _tokenized(tiny_tokenizer, long_template, 8, text)
