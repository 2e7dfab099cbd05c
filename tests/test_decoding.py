"""eval.decoding: several candidates per prompt and the one kept (evaluation/decoding.py), in a run's
evaluation, `tunesmith eval` and `tunesmith generate`, on a tiny random Llama."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import yaml
from _cli import main_in_process
from conftest import build_tiny_llama, write_config, write_jsonl
from reliability._harness import fresh_accelerator_state  # noqa: F401 (autouse fixture)
from test_commands import no_model_loads, refused
from test_recipe_tasks import concept_rows, one_thread  # noqa: F401 (autouse fixture)

from tunesmith.config.decoding import Decoding
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
    mask = torch.cat([kwargs["attention_mask"].repeat_interleave(n, 0), torch.ones_like(out[:, prompt_len:])], dim=1)
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
    batch = left_pad(
        [tok(render_prompt(tok, p), add_special_tokens=False)["input_ids"] for p in PROMPTS], tok.pad_token_id
    )
    with dec.seeded(SAMPLED, 0, "cpu"):
        texts, scores, _ = dec.candidates(model, tok, batch, 8, SAMPLED)
    assert [len(t) for t in texts] == [4, 4] and len({*texts[0], *texts[1]}) > 2
    ((kwargs, out),) = calls
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
    ((kwargs, _),) = calls
    assert (kwargs["num_beams"], kwargs["num_return_sequences"], kwargs["do_sample"]) == (3, 3, False)
    best = model.generate(**{**kwargs, "num_return_sequences": 1})  # the beam search's own single answer
    texts = [t.strip() for t in tok.batch_decode(best[:, kwargs["input_ids"].shape[1] :], skip_special_tokens=True)]
    lengths = [len(tok(render_prompt(tok, p), add_special_tokens=False)["input_ids"]) for p in PROMPTS]
    order = sorted(range(len(PROMPTS)), key=lambda i: lengths[i])  # generate()'s batch order
    assert [outputs[i] for i in order] == texts


def test_coverage_rerank_without_concepts_is_a_programming_error(lm):
    model, tok = lm
    with pytest.raises(ValueError, match="concepts"):
        generate(model, tok, PROMPTS, 4, decoding=Decoding(**COVERAGE))


# ---------------------------------------------------------------- bad settings: exit 2 before training


@pytest.mark.parametrize(
    "fmt, decoding, says",
    [
        ("classification", {"rerank": "coverage"}, "generative tasks"),
        ("classification", {"num_candidates": 2, "do_sample": True}, "generative tasks"),
        ("instruction", COVERAGE, "rerank: coverage needs each row's concepts"),
        ("concepts", {"num_candidates": 0}, "num_candidates: Input should be greater than or equal to 1"),
        ("concepts", {"num_candidates": 3}, "needs do_sample: true or num_beams >= 3"),
        ("concepts", {"num_candidates": 4, "num_beams": 2}, "more than num_beams"),
    ],
)
def test_a_decoding_that_cannot_work_stops_train_before_anything_runs(
    tmp_path, tiny_config, capsys, monkeypatch, fmt, decoding, says
):
    no_model_loads(monkeypatch)
    tiny_config["data"]["format"] = fmt
    tiny_config["eval"]["decoding"] = decoding
    err = refused("train", write_config(tmp_path, tiny_config))
    assert says in err
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- a run: evaluation, eval, generate


@pytest.fixture(scope="module")
def concepts_run(tmp_path_factory):
    """A constrained-generation run that keeps the best of 3 sampled candidates by coverage."""
    from tunesmith.config import config_from_dict
    from tunesmith.recipes import recipe_for

    root = tmp_path_factory.mktemp("concepts-run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNESMITH_HOME", str(root / "home"))
        cfg = config_from_dict(run_config(root, build_tiny_llama(root / "llama")))
        return recipe_for(cfg).train(cfg).path


def run_config(root, llama) -> dict:
    train_rows, val_rows = concept_rows()
    return {
        "name": "cg",
        "output_dir": str(root / "runs"),
        "seed": 0,
        "model": {"name": str(llama)},
        "peft": {"method": "lora", "r": 4, "dropout": 0.0},
        "data": {
            "train": str(write_jsonl(root / "d" / "train.jsonl", train_rows)),
            "validation": str(write_jsonl(root / "d" / "val.jsonl", val_rows)),
            "format": "concepts",
            "max_length": 256,
            "dedup": False,
        },
        "train": {"max_steps": 3, "lr": 1e-2, "batch_size": 4, "warmup_ratio": 0.0},
        "eval": {"batch_size": 8, "max_new_tokens": 6, "samples": 3, "decoding": COVERAGE},
    }


def spy_on_candidates(monkeypatch, inject: str | None = None) -> list[dict]:
    """Records every batch's prompts and candidates; `inject` replaces each prompt's last candidate and gives
    it the worst score."""
    calls = []
    real = dec.candidates

    def spy(model, tokenizer, batch, *args, **kwargs):
        texts, scores, stopped = real(model, tokenizer, batch, *args, **kwargs)
        if inject is not None:
            for t, s in zip(texts, scores):
                t[-1], s[-1] = inject, min(s) - 100.0
        prompts = tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
        calls.append({"prompts": prompts, "texts": texts, "scores": scores})
        return texts, scores, stopped

    monkeypatch.setattr(dec, "candidates", spy)
    return calls


def picks(call: dict, concept_sets: list[list[str]]) -> dict[tuple, str]:
    """The reranker's choice for each concept set in a recorded batch, found by its prompt."""
    out = {}
    for prompt, texts, scores in zip(call["prompts"], call["texts"], call["scores"]):
        concepts = next(c for c in concept_sets if f"{', '.join(c)}." in prompt)
        out[tuple(concepts)] = texts[dec.pick(texts, scores, concepts)]
    return out


def test_the_evaluation_scores_the_candidate_covering_most_concepts(tmp_path, tiny_llama, monkeypatch):
    from tunesmith.config import config_from_dict
    from tunesmith.recipes import recipe_for

    everything = "dog park fox bird cat book"  # every validation concept set, whatever the row
    calls = spy_on_candidates(monkeypatch, inject=everything)
    cfg = config_from_dict(run_config(tmp_path, tiny_llama))
    run = recipe_for(cfg).train(cfg)
    report = json.loads((run.path / "eval.json").read_text())
    assert len(calls) == 2 and all(len(t) == 3 for call in calls for t in call["texts"])
    for which in ("base", "finetuned"):  # the worst-scored candidate is kept: it alone has every concept
        assert report[which]["validation"]["coverage"] == 100.0 and report[which]["validation"]["all_concepts"] == 100
        assert report[which]["decoding"]["validation"] == {
            **COVERAGE,
            "temperature": 1.0,
            "top_p": 1.0,
            "num_beams": 1,
            "seed": 0,
        }
    assert [s["finetuned"] for s in report["samples"]] == [everything] * 3


def test_eval_and_generate_keep_the_rerankers_pick_and_reproduce_the_evaluation(
    concepts_run, tmp_path, monkeypatch, capsys
):
    """`tunesmith eval` and `tunesmith generate` decode like the run's evaluation: 3 candidates, the same
    pick, and for the same rows in the same batches the same outputs the metric saw."""
    report = json.loads((concepts_run / "eval.json").read_text())
    trained = [s["finetuned"] for s in report["samples"]]
    run = shutil.copytree(concepts_run, tmp_path / "cg")
    calls = spy_on_candidates(monkeypatch)
    assert main_in_process("eval", run) == 0
    again = json.loads((run / "eval.json").read_text())
    assert [s["finetuned"] for s in again["samples"]] == trained
    assert again["finetuned"]["validation"]["coverage"] == report["finetuned"]["validation"]["coverage"]
    sets = [["dog", "park"], ["fox", "bird"], ["cat", "book"]]
    assert len(calls) == 2 and all(len(t) == 3 for call in calls for t in call["texts"])
    chosen = picks(calls[-1], sets)
    assert trained == [chosen[tuple(c)] for c in sets]
    capsys.readouterr()

    calls.clear()
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"concepts": c} for c in sets])
    assert main_in_process("generate", run, "--input", rows, "--max-new-tokens", "6", "--batch-size", "8") == 0
    outputs = [json.loads(line)["output"] for line in capsys.readouterr().out.splitlines()]
    assert outputs == trained
    assert outputs == [picks(calls[0], sets)[tuple(c)] for c in sets] and len(calls[0]["texts"][0]) == 3


def test_generate_takes_concepts_and_the_command_line_decoding(concepts_run, tmp_path, monkeypatch, capsys):
    calls = spy_on_candidates(monkeypatch, inject="a dog in the park")
    assert main_in_process("generate", concepts_run, "--concepts", "dog, park", "--max-new-tokens", "4") == 0
    assert capsys.readouterr().out.strip() == "a dog in the park"
    assert len(calls[-1]["texts"][0]) == 3
    assert main_in_process("generate", concepts_run, "--concepts", "dog,park", "--num-candidates", "1") == 0
    assert len(calls[-1]["texts"][0]) == 1 and capsys.readouterr().out.strip() == "a dog in the park"
    assert main_in_process("generate", concepts_run, "--concepts", "dog", "--decoding", "num_candidates=2") == 0
    assert len(calls[-1]["texts"][0]) == 2


@pytest.mark.parametrize(
    "args, says",
    [
        (["--prompt", "a dog in a park"], "--concepts"),
        (["--input", "{rows}"], "{rows}:2: expected a 'concepts' list"),
        (["--concepts", " , "], "--concepts is empty"),
        (["--concepts", "dog", "--num-candidates", "0"], "greater than or equal to 1"),
        (["--concepts", "dog", "--decoding", "do_sample=false"], "needs do_sample: true or num_beams >= 3"),
        (["--concepts", "dog", "--decoding", "beams=2"], "eval.decoding.beams: unknown key"),
        (["--concepts", "dog", "--prompt", "hi"], "exactly one of --prompt, --input or --concepts"),
    ],
)
def test_generate_refuses_what_it_cannot_decode_before_loading_a_model(
    concepts_run, tmp_path, capsys, monkeypatch, args, says
):
    no_model_loads(monkeypatch)
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"concepts": ["dog"]}, {"prompt": "hi"}])
    err = refused("generate", concepts_run, *[a.format(rows=rows) for a in args])
    assert says.format(rows=rows) in err


def test_concepts_are_refused_on_a_run_without_them(concepts_run, tmp_path, capsys):
    run = shutil.copytree(concepts_run, tmp_path / "as-instruction")
    tree = yaml.safe_load((run / "config.yaml").read_text())
    tree["data"]["format"], tree["data"]["columns"] = "prompt_completion", {}
    tree["eval"]["decoding"] = {"num_candidates": 3, "do_sample": True}
    (run / "config.yaml").write_text(yaml.safe_dump(tree))
    assert "--concepts is for constrained-generation runs" in refused("generate", run, "--concepts", "dog")
    assert "rerank: coverage needs" in refused("generate", run, "--prompt", "hi", "--decoding", "rerank=coverage")
    assert "rerank: coverage needs" in refused("eval", run, "--decoding", "rerank=coverage")


def test_eval_records_the_decoding_of_each_scoring(concepts_run, tmp_path):
    run = shutil.copytree(concepts_run, tmp_path / "cg")
    assert main_in_process("eval", run, "--num-candidates", "1") == 0
    report = json.loads((run / "eval.json").read_text())
    assert report["finetuned"]["decoding"]["validation"]["num_candidates"] == 1
    assert report["base"]["decoding"]["validation"]["num_candidates"] == 1
    assert main_in_process("eval", run, "--split", "validation") == 0
    assert json.loads((run / "eval.json").read_text())["finetuned"]["decoding"]["validation"]["num_candidates"] == 3


def test_a_stage_decodes_greedily_unless_it_says_otherwise(tmp_path, tiny_config):
    """eval.decoding belongs to the final task, like its baselines: a stage of another task is not refused."""
    from tunesmith.config import config_from_dict, stage_config

    train_rows, val_rows = concept_rows()
    stage_data = dict(tiny_config["data"])
    tiny_config["data"].update(
        format="concepts",
        train=str(write_jsonl(tmp_path / "cg.jsonl", train_rows)),
        validation=str(write_jsonl(tmp_path / "cgv.jsonl", val_rows)),
    )
    tiny_config["eval"]["decoding"] = COVERAGE
    tiny_config["stages"] = [{"name": "warmup", "data": stage_data}]
    cfg = config_from_dict(tiny_config)
    assert stage_config(cfg, 0).eval.decoding.plain and stage_config(cfg, 1).eval.decoding.by_concepts
