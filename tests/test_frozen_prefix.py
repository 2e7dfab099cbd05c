"""`train.cache_frozen_layers` (training/frozen_prefix.py): with LoRA on the top layers, the frozen bottom
layers run once per row; the logits, the LoRA gradients and a whole DP run's weights equal the plain
forward's; batches whose rows are not independent run the plain forward; what cannot work is refused."""

from __future__ import annotations

import pytest
import torch
from _cli import invoke_cli
from conftest import write_config
from reliability._harness import fresh_accelerator_state  # noqa: F401 (autouse fixture)
from test_privacy_exact import trainables
from test_recipe_tasks import classification_config

from tunesmith.config import config_from_dict
from tunesmith.errors import UserError
from tunesmith.recipes import classification, fitting
from tunesmith.rundir import RunDir
from tunesmith.training.frozen_prefix import FrozenPrefix, backbone_of, cache_frozen_layers

TOP = r"model\.layers\.[23]\..*_proj"  # LoRA on the top 2 of 4 layers


def lora_classifier(target: str = TOP):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        num_labels=2,
    )
    lora = LoraConfig(r=4, target_modules=target, task_type="SEQ_CLS", init_lora_weights=False)
    return get_peft_model(LlamaForSequenceClassification(config), lora)


def forward_and_grads(model, ids, mask):
    logits = model(input_ids=ids, attention_mask=mask).logits
    (logits * torch.arange(1, 3)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return logits.detach(), grads


def bottom_calls(model) -> list:
    calls: list = []
    backbone_of(model).layers[0].register_forward_hook(lambda *_: calls.append(1))
    return calls


RIGHT_PADDED = torch.tensor([[5, 6, 7, 8, 9], [3, 4, 0, 0, 0], [11, 12, 13, 0, 0]])


def test_cached_logits_and_lora_gradients_equal_the_plain_forward_and_skip_the_bottom():
    model, ids = lora_classifier(), RIGHT_PADDED
    mask = (ids != 0).long()
    want_logits, want_grads = forward_and_grads(model, ids, mask)
    cache = cache_frozen_layers(model, torch.device("cpu"))
    assert cache.k == 2
    calls = bottom_calls(model)
    for epoch in range(2):
        order = torch.tensor([2, 0, 1]) if epoch else torch.arange(3)  # another batch order: keyed by tokens
        logits, grads = forward_and_grads(model, ids[order], mask[order])
        torch.testing.assert_close(logits, want_logits[order])
        for name, grad in want_grads.items():
            torch.testing.assert_close(grads[name], grad, msg=name)
    assert len(calls) == 1  # the bottom ran once, for the first pass
    assert (cache.misses, cache.hits) == (3, 3)
    assert len(backbone_of(model).layers) == 4  # the layer list is restored after each forward


def test_a_full_cache_computes_further_rows_and_stays_right(capsys):
    model, ids = lora_classifier(), RIGHT_PADDED
    mask = (ids != 0).long()
    want, _ = forward_and_grads(model, ids, mask)
    cache = FrozenPrefix(backbone_of(model), 2, budget=0).attach()
    for _ in range(2):
        logits, _ = forward_and_grads(model, ids, mask)
        torch.testing.assert_close(logits, want)
    assert cache.states == {} and cache.misses == 6
    assert "the cache is full" in capsys.readouterr().err.replace("\n", " ")


@pytest.mark.parametrize("kind", ["left_padded", "positions", "packed"])
def test_batches_whose_rows_depend_on_the_batch_run_the_plain_forward(kind):
    model = lora_classifier()
    ids = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 8, 9, 10]])
    mask = (ids != 0).long()
    extra = {}
    if kind == "positions":
        extra["position_ids"] = torch.tensor([[0, 1, 0, 1, 2]] * 2)  # packed rows restart their positions
    if kind == "packed":
        mask = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
        ids = torch.tensor([[5, 6, 7, 8, 9], [3, 4, 8, 9, 10]])
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, **extra).logits
    cache = cache_frozen_layers(model, torch.device("cpu"))
    calls = bottom_calls(model)
    for _ in range(2):
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, **extra).logits, want)
    assert len(calls) == 2 and cache.states == {}


def test_bf16_autocast_states_are_kept_apart_from_fp32_ones():
    model, ids = lora_classifier(), RIGHT_PADDED[:2]
    mask = (ids != 0).long()
    cache = cache_frozen_layers(model, torch.device("cpu"))
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids, attention_mask=mask)
        again = model(input_ids=ids, attention_mask=mask).logits
    assert cache.misses == 4 and {key[0] for key in cache.states} == {None, torch.bfloat16}
    torch.testing.assert_close(again, plain)


def test_nothing_to_cache_or_an_unsupported_model_is_refused():
    with pytest.raises(UserError, match="the bottom layer trains"):
        cache_frozen_layers(lora_classifier(r".*_proj"), torch.device("cpu"))
    other = lora_classifier()
    other.get_base_model().base_model.config.model_type = "gemma"  # scales inputs_embeds inside its forward
    with pytest.raises(UserError, match="llama, mistral, qwen2, qwen3 decoders; this model is gemma"):
        cache_frozen_layers(other, torch.device("cpu"))


def dp_tree(tmp_path, tiny_llama) -> dict:
    tree = classification_config(tmp_path, tiny_llama)
    tree["model"].update(pooling="last")
    tree["peft"]["target_modules"] = r"model\.layers\.1\..*_proj"  # the tiny Llama's top layer of 2
    tree["train"] = {"epochs": 3, "lr": 0.05, "batch_size": 8, "schedule": "linear", "warmup_ratio": 0.0}
    tree["eval"]["before_after"] = False
    tree["privacy"] = {"noise_multiplier": 1.0, "max_grad_norm": 0.5, "expected_batch_size": 16}
    return tree


def trained_without_and_with_the_cache(recipe, tree: dict) -> dict:
    """The cache's summary after fitting `tree` with the cache on; asserts the weights equal those without."""
    weights, summaries = {}, {}
    for on in (False, True):
        tree["name"], tree["train"]["cache_frozen_layers"] = f"cache-{on}", on
        cfg = config_from_dict(tree)
        s = recipe.setup(cfg, RunDir.create(cfg, resume=False, overwrite=True))
        summary = fitting.fit(s)
        weights[on], summaries[on] = trainables(s.model), summary.get("frozen_layers_cache")
    assert summaries[False] is None and weights[True].keys() == weights[False].keys()
    for name, w in weights[False].items():
        torch.testing.assert_close(weights[True][name], w, rtol=1e-5, atol=1e-6, msg=name)
    return summaries[True]


def test_a_dp_run_with_the_cache_ends_with_the_same_weights(tmp_path, tiny_llama):
    cache = trained_without_and_with_the_cache(classification, dp_tree(tmp_path, tiny_llama))
    assert cache["layers"] == 1 and cache["hits"] > 0  # later epochs read the cache
    assert cache["misses"] == cache["rows"] > 0  # each row computed once


def test_the_refusal_comes_before_training_with_exit_2(tmp_path, tiny_llama):
    tree = dp_tree(tmp_path, tiny_llama)
    tree["peft"]["target_modules"] = ["q_proj", "v_proj"]  # every layer trains
    tree["train"]["cache_frozen_layers"] = True
    res = invoke_cli("train", write_config(tmp_path, tree))
    assert res.returncode == 2 and "the bottom layer trains" in res.stderr
    assert not (tmp_path / "runs" / tree["name"] / "metrics.jsonl").exists()


def test_a_causal_lm_run_with_the_cache_ends_with_the_same_weights(tiny_config):
    from tunesmith.recipes import causal_lm  # noqa: PLC0415

    tiny_config["peft"]["target_modules"] = r"model\.layers\.1\..*_proj"
    tiny_config["train"].update(max_steps=24, batch_size=4)  # two epochs of the 48 rows
    tiny_config["eval"]["before_after"] = False
    assert trained_without_and_with_the_cache(causal_lm, tiny_config)["hits"] > 0
