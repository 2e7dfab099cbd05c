"""eval.decoding: several candidates per prompt and the one kept (evaluation/decoding.py), in a run's
evaluation, `tunesmith eval` and `tunesmith generate`, on a tiny random Llama."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import build_tiny_llama, write_config, write_jsonl
from reliability._harness import fresh_accelerator_state, main_in_process  # noqa: F401 (autouse fixture)
from test_commands import no_model_loads, refused
from test_recipe_tasks import concept_rows, one_thread  # noqa: F401 (autouse fixture)

from tunesmith.config_decoding import Decoding
from tunesmith.data.collate import left_pad
from tunesmith.data.tokenize import render_prompt
from tunesmith.evaluation import decoding as dec
from tunesmith.evaluation.generate import generate
from tunesmith.evaluation.metrics import concept_hits

SAMPLED = Decoding(num_candidates=4, do_sample=True, temperature=0.7, top_p=0.9)
COVERAGE = {"num_candidates": 3, "do_sample": True, "rerank": "coverage"}
PROMPTS = [[{"role": "user", "content": "one two three"}], [{"role": "user", "content": "reverse the words four"}]]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = build_tiny_llama(tmp_path_factory.mktemp("llama"))
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


# ---------------------------------------------------------------- the reranker, by hand


def test_pick_keeps_the_candidate_covering_most_concepts_then_the_best_score():
    concepts = ["dog", "frisbee", "catch"]
    texts = ["a dog", "dogs catching a frisbee", "the dog caught a frisbee", "a dog catches frisbees"]
    assert [sum(concept_hits(t, concepts)) for t in texts] == [1, 3, 2, 3]  # "caught" is irregular: not counted
    scores = [-0.1, -2.0, -0.5, -1.0]
    assert dec.pick(texts, scores, concepts) == 3  # of the two with all three concepts, the better score
    assert dec.pick(texts, [-0.1, -1.0, -0.5, -2.0], concepts) == 1
    assert dec.pick(texts, scores) == 0  # rerank: score
    assert dec.pick(["a cat", "the dogs"], [-0.01, -9.0], ["dog"]) == 1  # coverage first, however bad the score
    assert dec.pick(["a cat", "a hat", "a bat"], [-1.0, -0.5, -0.5], ["dog"]) == 1  # a full tie: the first


# ---------------------------------------------------------------- candidates from the real generate()


def spy_on_generate(model, monkeypatch) -> list:
    calls = []
    real = model.generate

    def spy(**kwargs):
        out = real(**kwargs)
        calls.append((kwargs, out))
        return out

    monkeypatch.setattr(model, "generate", spy)
    return calls


def mean_log_probs(model, kwargs: dict, out: torch.Tensor, eos: int, temperature: float = 1.0) -> list[float]:
    """By one forward pass: each candidate's mean log-probability of its tokens up to its first EOS."""
    n, prompt_len = kwargs["num_return_sequences"], kwargs["input_ids"].shape[1]
    mask = torch.cat([kwargs["attention_mask"].repeat_interleave(n, 0),
                      torch.ones_like(out[:, prompt_len:])], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=out, attention_mask=mask, position_ids=positions).logits
    logp = torch.log_softmax(logits / temperature, -1)
    means = []
    for row in range(out.shape[0]):
        total, count = 0.0, 0
        for t in range(prompt_len, out.shape[1]):
            total += float(logp[row, t - 1, out[row, t]])
            count += 1
            if out[row, t] == eos:
                break
        means.append(total / count)
    return means


def test_a_sampled_candidates_score_is_its_mean_token_log_prob_before_temperature(lm, monkeypatch):
    model, tok = lm
    calls = spy_on_generate(model, monkeypatch)
    batch = left_pad([tok(render_prompt(tok, p), add_special_tokens=False)["input_ids"] for p in PROMPTS],
                     tok.pad_token_id)
    with dec.seeded(SAMPLED, 0, "cpu"):
        texts, scores, _ = dec.candidates(model, tok, batch, 8, SAMPLED)
    assert [len(t) for t in texts] == [4, 4] and len({*texts[0], *texts[1]}) > 2
    (kwargs, out), = calls
    flat = [s for per_prompt in scores for s in per_prompt]
    assert flat == pytest.approx(mean_log_probs(model, kwargs, out, tok.eos_token_id), abs=1e-4)
    # a control: the sampling distribution's own log-probabilities (temperature 0.7) are another number
    warped = mean_log_probs(model, kwargs, out, tok.eos_token_id, temperature=0.7)
    assert not any(math.isclose(a, b, abs_tol=1e-2) for a, b in zip(flat, warped))


def test_sampling_is_seeded_and_leaves_the_callers_random_state(lm):
    model, tok = lm
    state = torch.get_rng_state()
    first = generate(model, tok, PROMPTS * 3, 8, decoding=SAMPLED, seed=0)
    assert torch.equal(torch.get_rng_state(), state)  # training's dropout and shuffling are not moved
    assert generate(model, tok, PROMPTS * 3, 8, decoding=SAMPLED, seed=0) == first
    assert generate(model, tok, PROMPTS * 3, 8, decoding=SAMPLED, seed=1)[0] != first[0]


def test_beam_search_keeps_the_searchs_best_beam(lm, monkeypatch):
    model, tok = lm
    calls = spy_on_generate(model, monkeypatch)
    outputs, _ = generate(model, tok, PROMPTS, 8, decoding=Decoding(num_candidates=3, num_beams=3))
    (kwargs, _), = calls
    assert (kwargs["num_beams"], kwargs["num_return_sequences"], kwargs["do_sample"]) == (3, 3, False)
    best = model.generate(**{**kwargs, "num_return_sequences": 1})  # the beam search's own single answer
    texts = [t.strip() for t in tok.batch_decode(best[:, kwargs["input_ids"].shape[1]:], skip_special_tokens=True)]
    lengths = [len(tok(render_prompt(tok, p), add_special_tokens=False)["input_ids"]) for p in PROMPTS]
    order = sorted(range(len(PROMPTS)), key=lambda i: lengths[i])  # generate()'s batch order
    assert [outputs[i] for i in order] == texts


def test_coverage_rerank_without_concepts_is_a_programming_error(lm):
    model, tok = lm
    with pytest.raises(ValueError, match="concepts"):
        generate(model, tok, PROMPTS, 4, decoding=Decoding(**COVERAGE))


# ---------------------------------------------------------------- bad settings: exit 2 before training


@pytest.mark.parametrize("fmt, decoding, says", [
    ("classification", {"rerank": "coverage"}, "generative tasks"),
    ("classification", {"num_candidates": 2, "do_sample": True}, "generative tasks"),
    ("instruction", COVERAGE, "rerank: coverage needs each row's concepts"),
    ("concepts", {"num_candidates": 0}, "num_candidates: Input should be greater than or equal to 1"),
    ("concepts", {"num_candidates": 3}, "needs do_sample: true or num_beams >= 3"),
    ("concepts", {"num_candidates": 4, "num_beams": 2}, "more than num_beams"),
])
def test_a_decoding_that_cannot_work_stops_train_before_anything_runs(tmp_path, tiny_config, capsys, monkeypatch,
                                                                      fmt, decoding, says):
    no_model_loads(monkeypatch)
    tiny_config["data"]["format"] = fmt
    tiny_config["eval"]["decoding"] = decoding
    err = refused(capsys, "train", write_config(tmp_path, tiny_config))
    assert says in err
    assert not (tmp_path / "runs").exists()
