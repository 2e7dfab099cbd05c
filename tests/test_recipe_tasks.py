"""One recipe run per task family on tiny random models: which metrics land in eval.json, and that they
are the task's metrics computed on the right rows (recomputed here from the saved sample outputs)."""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import pytest
import sacrebleu
from _cli import run_cli
from conftest import write_config, write_jsonl

from tunesmith.config import config_from_dict
from tunesmith.data.formats import parse_rows
from tunesmith.data.prepare import load_examples
from tunesmith.data.sources import read_source
from tunesmith.errors import DataError
from tunesmith.evaluation import metrics
from tunesmith.evaluation.tasks import TASKS, generation_rows
from tunesmith.recipes import causal_lm, recipe_for

NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: with another CPU job running, a second OpenMP thread makes each op ~100x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def one_thread_cli(*args):
    """The CLI in a fresh process, on one thread like this module's in-process runs (see one_thread)."""
    return run_cli(*args, env={**os.environ, "OMP_NUM_THREADS": "1"})


def train(cfg_dict: dict) -> tuple[Path, dict]:
    cfg = config_from_dict(cfg_dict)
    run = recipe_for(cfg).train(cfg, overwrite=True)
    return run.path, json.loads((run / "eval.json").read_text())


def causal_config(tiny_config: dict, tmp_path: Path, fmt: str, train_rows: list, val_rows: list) -> dict:
    tiny_config["data"].update(
        format=fmt,
        max_length=256,
        train=str(write_jsonl(tmp_path / "data" / f"{fmt}-train.jsonl", train_rows)),
        validation=str(write_jsonl(tmp_path / "data" / f"{fmt}-val.jsonl", val_rows)),
    )
    tiny_config["train"]["max_steps"] = 4
    tiny_config["eval"].update(samples=len(val_rows), max_new_tokens=6)  # every scored row becomes a sample
    return tiny_config


class FakeGenerate:
    """Stands in for batched generation in causal_lm: answers each prompt from a table, per model
    ("base" or "finetuned"), so every generation metric is known by hand. Records what it was asked."""

    def __init__(self, answers: dict[str, dict[str, str]], stopped: dict[str, list[bool]]):
        self.answers, self.stopped, self.calls = answers, stopped, []

    def __call__(self, model, tokenizer, prompts, max_new_tokens=128, batch_size=8, device=None, label=""):
        which, split = label.split()
        asked = [p[-1]["content"] for p in prompts]
        self.calls.append((which, split, asked))
        return [self.answers[which][a] for a in asked], self.stopped[which][: len(prompts)]


# ---------------------------------------------------------------- summarization

SUM_VAL = [
    ("one two three four five six", "one two"),
    ("seven eight nine ten one two", "seven eight"),
    ("three four five six seven eight", "three four"),
]


def summarization_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        doc = [rng.choice(NUMBERS) for _ in range(6)]
        rows.append({"id": f"s{seed}-{i}", "document": " ".join(doc) + f" #{i}", "summary": " ".join(doc[:2])})
    return rows


def test_summarization_scores_rouge_and_lengths(tmp_path, tiny_config, monkeypatch):
    val_rows = [{"id": f"v{i}", "document": d, "summary": s} for i, (d, s) in enumerate(SUM_VAL)]
    cfg = causal_config(tiny_config, tmp_path, "summarization", summarization_rows(24, 0), val_rows)
    prompts = [f"Summarize the following document in plain English.\n\n{d}" for d, _ in SUM_VAL]
    fake = FakeGenerate(
        {"base": dict.fromkeys(prompts, "one two three"), "finetuned": {p: s for p, (_, s) in zip(prompts, SUM_VAL)}},
        {"base": [False, False, False], "finetuned": [True, False, True]},
    )
    monkeypatch.setattr(causal_lm, "generate", fake)
    run, report = train(cfg)
    assert report["task"] == "summarization"
    assert fake.calls == [("base", "validation", prompts), ("finetuned", "validation", prompts)]
    base, tuned = report["base"]["validation"], report["finetuned"]["validation"]
    keys = {"loss", "perplexity", "tokens", "rows", "rouge1", "rouge2", "rougeL", "mean_output_words", "stopped_on_own"}
    assert set(base) == set(tuned) == keys
    # base "one two three" against "one two":    R1 P=2/3 R=1 F=4/5; R2 P=1/2 R=1 F=2/3; RL F=4/5
    #                      against "seven eight": 0 for all three
    #                      against "three four":  R1 P=1/3 R=1/2 F=2/5; R2 0; RL F=2/5
    assert base["rouge1"] == pytest.approx(100 * (4 / 5 + 0 + 2 / 5) / 3, abs=1e-6)  # 40
    assert base["rouge2"] == pytest.approx(100 * (2 / 3) / 3, abs=1e-6)  # 22.2
    assert base["rougeL"] == pytest.approx(100 * (4 / 5 + 0 + 2 / 5) / 3, abs=1e-6)
    assert (base["mean_output_words"], base["stopped_on_own"]) == (3.0, 0.0)
    assert {k: tuned[k] for k in ("rouge1", "rouge2", "rougeL")} == pytest.approx(
        {"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0}, abs=1e-9
    )
    assert tuned["mean_output_words"] == 2.0 and tuned["stopped_on_own"] == pytest.approx(200 / 3)
    assert [(s["id"], s["base"], s["finetuned"], s["reference"]) for s in report["samples"]] == [
        (f"v{i}", "one two three", summ, summ) for i, (_, summ) in enumerate(SUM_VAL)
    ]
    assert tuned["loss"] < base["loss"] and tuned["rows"] == 3


def test_generative_few_shot_baseline_prompts_the_base_model_with_k_solved_training_rows(
    tmp_path, tiny_config, monkeypatch
):
    from tunesmith.report.numbers import verdict_rows

    val_rows = [{"id": f"v{i}", "document": d, "summary": s} for i, (d, s) in enumerate(SUM_VAL)]
    train_rows = summarization_rows(24, 0)
    cfg = causal_config(tiny_config, tmp_path, "summarization", train_rows, val_rows)
    cfg["eval"].update(baselines=["few_shot"], few_shot_k=2)
    prompts = [f"Summarize the following document in plain English.\n\n{d}" for d, _ in SUM_VAL]
    exact = {p: s for p, (_, s) in zip(prompts, SUM_VAL)}
    fake = FakeGenerate(
        {"base": dict.fromkeys(prompts, "one two three"), "2-shot": exact, "finetuned": exact},
        {k: [True] * 3 for k in ("base", "2-shot", "finetuned")},
    )
    asked: dict = {}

    def recording(model, tokenizer, prompts, *args, **kw):
        asked[kw["label"]] = prompts
        return fake(model, tokenizer, prompts, *args, **kw)

    monkeypatch.setattr(causal_lm, "generate", recording)
    run, report = train(cfg)
    few = asked["2-shot prompt"]
    assert [m["role"] for m in few[0]] == ["user", "assistant"] * 2 + ["user"]
    summaries = {r["summary"] for r in train_rows}
    assert all(m["content"] in summaries for m in few[0][1:4:2])  # the demonstrations are solved training rows
    assert few[0][:4] == few[2][:4] and [p[-1]["content"] for p in few] == prompts  # same demos, every question
    shot = report["base"]["baselines"]["2-shot prompt"]["validation"]
    assert shot["rougeL"] == pytest.approx(100.0) and report["base"]["validation"]["rougeL"] < 100
    rows = {(split, metric): (b, f) for split, metric, b, f, _ in verdict_rows(report)}
    assert rows[("validation", "rougeL vs 2-shot prompt")] == (
        shot["rougeL"],
        report["finetuned"]["validation"]["rougeL"],
    )


def test_generative_tasks_refuse_a_separate_baseline_model(tmp_path, tiny_config):
    from tunesmith.errors import UserError

    tiny_config["eval"]["baseline_model"] = "smollm2-135m-instruct"
    with pytest.raises(UserError, match="baseline_model is for classification"):
        config_from_dict(tiny_config)


# ---------------------------------------------------------------- constrained generation (CommonGen)

CONCEPT_TRAIN = [
    (["dog", "ball"], "the dog chased the ball"),
    (["fox", "jump"], "the fox jumps"),
    (["cat", "sit"], "a cat sits"),
    (["man", "ride", "bike"], "a man rides a bike"),
    (["bird", "sing"], "birds sing"),
    (["child", "run", "park"], "children run in the park"),
    (["boy", "kick", "ball"], "the boy kicked the ball"),
    (["girl", "read", "book"], "a girl reads a book"),
]
# validation: several rows (one per reference) share a concept set, as in CommonGen files
CONCEPT_VAL = [
    ("v0", ["dog", "park"], "a dog runs in the park"),
    ("v1", ["dog", "park"], "the park has a dog"),
    ("v2", ["fox", "bird"], "a fox watches a bird"),
    ("v3", ["fox", "bird"], "the bird flies over the fox"),
    ("v4", ["fox", "bird"], "birds and a fox"),
    ("v5", ["cat", "book"], "the cat sits on a book"),
]
CONCEPT_PROMPT = "Write one short sentence that uses all of these words: {}."


def concept_rows():
    train = [
        {"id": f"t{i}", "concepts": c, "target": t, "references": [t]} for i, (c, t) in enumerate(CONCEPT_TRAIN * 2)
    ]
    refs: dict[tuple, list[str]] = {}
    for _, c, t in CONCEPT_VAL:
        refs.setdefault(tuple(c), []).append(t)
    val = [{"id": i, "concepts": c, "target": t, "references": refs[tuple(c)]} for i, c, t in CONCEPT_VAL]
    return train, val


def test_constrained_generation_scores_one_row_per_concept_set(tmp_path, tiny_config, monkeypatch):
    train_rows, val_rows = concept_rows()
    cfg = causal_config(tiny_config, tmp_path, "concepts", train_rows, val_rows)
    cfg["data"]["dedup"] = False  # train repeats each row twice on purpose
    # the rows generation scores: the first of each concept set, in file order
    parsed, problems = parse_rows(read_source(cfg["data"]["validation"]), config_from_dict(cfg).data)
    assert problems == [] and len(parsed) == 6
    task = TASKS["constrained_generation"]
    assert [ex.id for ex in generation_rows(task, parsed, None)] == ["v0", "v2", "v5"]
    assert [ex.id for ex in generation_rows(task, parsed, 2)] == ["v0", "v2"]

    prompts = [CONCEPT_PROMPT.format(c) for c in ("dog, park", "fox, bird", "cat, book")]
    finetuned = [
        "a dog runs in the park",  # both concepts; equals a reference
        "the fox saw two birds",  # fox, bird (plural): both
        "a cat sat",
    ]  # cat only: 1/2
    fake = FakeGenerate(
        {"base": dict.fromkeys(prompts, "the dog"), "finetuned": dict(zip(prompts, finetuned))},
        {"base": [False] * 3, "finetuned": [True] * 3},
    )
    monkeypatch.setattr(causal_lm, "generate", fake)
    run, report = train(cfg)
    assert report["task"] == "constrained_generation"
    assert [c[2] for c in fake.calls] == [prompts, prompts]  # 3 prompts, not 6
    ids = [s["id"] for s in report["samples"]]
    assert ids == ["v0", "v2", "v5"]  # eval.samples=6 but only one row per concept set was scored
    base, tuned = report["base"]["validation"], report["finetuned"]["validation"]
    assert set(tuned) == {"loss", "perplexity", "tokens", "rows", "coverage", "all_concepts", "bleu4", "rougeL"}
    # coverage: mean over the 3 sets, not the 6 rows (which would give (1+1+1+1+1+1/2)/6 = 91.7)
    assert tuned["coverage"] == pytest.approx(100 * (1 + 1 + 1 / 2) / 3)  # 83.3
    assert tuned["all_concepts"] == pytest.approx(200 / 3)
    assert base["coverage"] == pytest.approx(100 * (1 / 2) / 3) and base["all_concepts"] == 0.0  # "the dog"
    refs = [r["references"] for r in val_rows if r["id"] in ids]
    assert tuned["bleu4"] == pytest.approx(
        sacrebleu.corpus_bleu(finetuned, [[r[i] if i < len(r) else None for r in refs] for i in range(3)]).score,
        abs=1e-9,
    )
    assert tuned["bleu4"] > 30 and base["bleu4"] < tuned["bleu4"]
    # rougeL takes each set's best reference: scoring against one reference per set gives less
    assert tuned["rougeL"] == pytest.approx(metrics.rouge(finetuned, refs)["rougeL"], abs=1e-9)
    assert tuned["rougeL"] > metrics.rouge(finetuned, [[r[-1]] for r in refs])["rougeL"]  # not just one reference
    assert tuned["rows"] == 6  # loss and perplexity still use every row


def test_commongen_rows_without_a_references_column_keep_every_target_as_a_reference(tmp_path, tiny_config):
    """CommonGen files hold one row per reference ({concepts, target}); scoring one row per concept set
    must still score it against all of that set's targets, or BLEU/ROUGE are computed against one."""
    rows = [{"id": i, "concepts": c, "target": t} for i, c, t in CONCEPT_VAL]
    tiny_config["data"].update(format="concepts", train=str(write_jsonl(tmp_path / "cg.jsonl", rows)))
    parsed, _ = parse_rows(read_source(tiny_config["data"]["train"]), config_from_dict(tiny_config).data)
    scored = generation_rows(TASKS["constrained_generation"], parsed, None)
    assert [ex.id for ex in scored] == ["v0", "v2", "v5"]
    assert [ex.references for ex in scored] == [
        ["a dog runs in the park", "the park has a dog"],
        ["a fox watches a bird", "the bird flies over the fox", "birds and a fox"],
        ["the cat sits on a book"],
    ]


# ---------------------------------------------------------------- language modeling + retention


def text_rows(n: int, seed: int, column: str = "text") -> list[dict]:
    rng = random.Random(seed)
    return [{column: " ".join(rng.choice(NUMBERS) for _ in range(8)) + f" #{seed}-{i}"} for i in range(n)]


def test_language_modeling_reports_perplexity_and_retention_only(tmp_path, tiny_config):
    cfg = causal_config(tiny_config, tmp_path, "text", text_rows(24, 0), text_rows(6, 1))
    general = write_jsonl(
        tmp_path / "data" / "general.jsonl",
        [
            {"content": line}
            for line in [
                "the quick brown fox jumps over the lazy dog",
                "reverse the words sort the numbers",
                "name the colour",
                "instruction input output",
                "one two three",
                "seven eight nine ten",
                "a b c d e f",
            ]
        ],
    )
    cfg["retention"] = [{"name": "general", "data": str(general), "column": "content", "max_rows": 5}]
    run, report = train(cfg)
    assert report["task"] == "language_modeling"
    for which in ("base", "finetuned"):
        val = report[which]["validation"]
        assert set(val) == {"loss", "perplexity", "tokens", "rows"}  # no generation metrics
        assert val["rows"] == 6 and val["perplexity"] == pytest.approx(math.exp(val["loss"]), rel=1e-9)
        ret = report[which]["retention"]
        assert set(ret) == {"general"}
        assert ret["general"]["rows"] == 5  # retention max_rows: the first 5 of 7
        assert ret["general"]["perplexity"] == pytest.approx(math.exp(ret["general"]["loss"]), rel=1e-9)
        assert ret["general"]["tokens"] > 0
    assert report["base"]["retention"]["general"]["tokens"] == report["finetuned"]["retention"]["general"]["tokens"]
    assert report["finetuned"]["retention"]["general"]["loss"] != report["base"]["retention"]["general"]["loss"]
    assert report["samples"] == []  # text rows have no prompt to generate from
    assert report["finetuned"]["validation"]["loss"] < report["base"]["validation"]["loss"]


def test_bad_rows_in_a_retention_file_are_reported(tmp_path, tiny_config, tiny_tokenizer):
    general = tmp_path / "general.jsonl"
    general.write_text('{"text": "one two three"}\n{"text": "four five\n{"text": ""}\n{"text": "six seven"}\n')
    tiny_config["retention"] = [{"name": "general", "data": str(general)}]
    cfg = config_from_dict(tiny_config)
    with pytest.raises(DataError) as caught:
        causal_lm.retention_rows(cfg, tiny_tokenizer, {})
    err = caught.value
    assert err.exit_code == 2 and len(err.problems) == 2
    assert err.problems[0].startswith(f"{general}:2: malformed JSON")
    assert err.problems[1] == f"{general}:3: column 'text' is empty"
    tiny_config["data"].update(on_error="skip", max_bad_fraction=0.6)
    report: dict = {}
    rows = causal_lm.retention_rows(config_from_dict(tiny_config), tiny_tokenizer, report)
    assert len(rows["retention:general"]) == 2
    assert report["retention"]["general"]["bad_rows"] == {"malformed_json": 1, "empty_field": 1}


# ---------------------------------------------------------------- instruction + `tunesmith eval --data`


def test_instruction_rougeL_and_eval_on_a_data_file(tmp_path, tiny_config):
    tiny_config["eval"]["samples"] = 12  # every validation row
    run, report = train(tiny_config)
    samples = report["samples"]
    assert len(samples) == 12
    for which in ("base", "finetuned"):
        val = report[which]["validation"]
        want = metrics.rouge([s[which] for s in samples], [[s["reference"]] for s in samples])["rougeL"]
        assert val["rougeL"] == pytest.approx(want, abs=1e-9)
        outputs = [s[which] for s in samples]
        assert val["mean_output_words"] == pytest.approx(sum(len(o.split()) for o in outputs) / 12)
        assert {"mean_output_words", "stopped_on_own"} <= set(val) and "rouge1" not in val

    # score the validation file again as --data: the same rows, so the same numbers, from a fresh process
    res = one_thread_cli("eval", run, "--data", tiny_config["data"]["validation"])
    assert res.returncode == 0, res.stderr
    again = json.loads((run / "eval.json").read_text())
    for which in ("base", "finetuned"):
        scored = again[which]["data:val.jsonl"]
        assert scored["rows"] == 12
        assert scored["loss"] == pytest.approx(report[which]["validation"]["loss"], rel=1e-4)
        assert scored["rougeL"] == pytest.approx(report[which]["validation"]["rougeL"], abs=1e-6)
        assert again[which]["validation"] == report[which]["validation"]  # the earlier entries are kept
    assert again["samples"] == report["samples"]


# ---------------------------------------------------------------- classification on a tiny random BERT

FILLER = [
    "the",
    "movie",
    "film",
    "was",
    "really",
    "quite",
    "plot",
    "acting",
    "music",
    "story",
    "and",
    "it",
    "very",
    "so",
    "this",
    "a",
    "show",
    "ending",
    "cast",
    "script",
]


def build_tiny_bert(path: Path) -> Path:
    """An encoder-only checkpoint (no classification head), like the embedded minilm-l6."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *FILLER, "good", "bad"]
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    tok.save_pretrained(path)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def sentiment_rows(n_pos: int, n_neg: int, seed: int, taken: set) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for label, n in (("positive", n_pos), ("negative", n_neg)):
        while sum(r["label"] == label for r in rows) < n:
            words = rng.sample(FILLER, 4)
            words.insert(rng.randint(0, 4), "good" if label == "positive" else "bad")
            text = " ".join(words)
            if text not in taken:
                taken.add(text)
                rows.append({"id": f"{seed}-{len(rows)}", "text": text, "label": label})
    rng.shuffle(rows)
    return rows


def classification_config(tmp_path: Path, tiny_bert: Path) -> dict:
    taken: set = set()
    train_rows = sentiment_rows(36, 28, 0, taken)
    val_rows = sentiment_rows(10, 6, 1, taken)
    return {
        "name": "sentiment",
        "output_dir": str(tmp_path / "runs"),
        "seed": 0,
        "model": {"name": str(tiny_bert)},
        "peft": {"method": "lora", "r": 8, "dropout": 0.0},
        "data": {
            "train": str(write_jsonl(tmp_path / "data" / "cls-train.jsonl", train_rows)),
            "validation": str(write_jsonl(tmp_path / "data" / "cls-val.jsonl", val_rows)),
            "format": "classification",
            "labels": ["negative", "positive"],
            "max_length": 32,
        },
        "train": {"max_steps": 40, "lr": 1e-2, "batch_size": 16, "warmup_ratio": 0.1, "schedule": "cosine"},
        "eval": {"batch_size": 16, "samples": 3},
    }


def test_classification_learns_and_compares_with_the_majority_baseline(tmp_path, tiny_bert):
    run, report = train(classification_config(tmp_path, tiny_bert))
    assert report["task"] == "classification"
    base, tuned = report["base"], report["finetuned"]
    assert "majority" in base["note"]
    # majority of train is positive (36 vs 28): 10 of the 16 validation rows are right
    assert base["validation"]["accuracy"] == pytest.approx(62.5)
    assert base["validation"]["confusion_matrix"] == {"labels": ["negative", "positive"], "matrix": [[0, 6], [0, 10]]}
    assert base["validation"]["per_class"]["negative"]["recall"] == 0.0
    assert tuned["validation"]["accuracy"] >= 90, tuned["validation"]
    cm = tuned["validation"]["confusion_matrix"]
    assert cm["labels"] == ["negative", "positive"] and sum(map(sum, cm["matrix"])) == 16
    assert [sum(row) for row in cm["matrix"]] == [6, 10]
    assert tuned["validation"]["accuracy"] == pytest.approx(100 * (cm["matrix"][0][0] + cm["matrix"][1][1]) / 16)
    assert json.loads((run / "adapter" / "labels.json").read_text()) == ["negative", "positive"]
    assert len(report["samples"]) == 3
    for s in report["samples"]:
        assert s["base"] == "positive" and s["finetuned"] in ("negative", "positive")
        assert ("good" in s["prompt"].split()) == (s["reference"] == "positive")


def test_classification_label_outside_the_label_set_exits_2_with_file_and_line(tmp_path, tiny_bert):
    cfg = classification_config(tmp_path, tiny_bert)
    train_path = Path(cfg["data"]["train"])
    lines = train_path.read_text().splitlines()
    lines[6] = json.dumps({"text": "the movie was meh", "label": "neutral"})
    train_path.write_text("\n".join(lines) + "\n")
    res = one_thread_cli("train", write_config(tmp_path, cfg))
    assert res.returncode == 2, res.stderr
    assert f"{train_path}:7: label is not one of labels ['negative', 'positive']" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "runs" / "sentiment").exists()  # no half-made run left behind


def oracle_generate(model, tokenizer, prompts, max_new_tokens=128, batch_size=8, device=None, label=""):
    """A zero-shot 'model' that is always right: it answers from the sentiment word in the text."""
    texts = [p[-1]["content"].split("Text: ", 1)[1] for p in prompts]
    return ["positive" if "good" in t.split() else "negative" for t in texts], [True] * len(prompts)


@pytest.mark.parametrize(
    "overlong_row",
    [
        None,
        1,
    ],
)
def test_zero_shot_baseline_scores_the_rows_it_is_compared_with(
    tmp_path, tiny_bert, tiny_llama, monkeypatch, overlong_row
):
    import tunesmith.evaluation.generate as generation

    cfg = classification_config(tmp_path, tiny_bert)
    cfg["eval"]["baseline_model"] = str(tiny_llama)
    cfg["data"]["overlength"] = "drop"
    cfg["train"]["max_steps"] = 1
    val_path = Path(cfg["data"]["validation"])
    rows = [json.loads(x) for x in val_path.read_text().splitlines()]
    if overlong_row is not None:  # longer than max_length=32 tokens: dropped from validation
        rows[overlong_row]["text"] += " and" * 40
    write_jsonl(val_path, rows)
    monkeypatch.setattr(generation, "generate", oracle_generate)
    run, report = train(cfg)
    assert report["base"]["note"] == f"zero-shot prompting of {tiny_llama}"
    kept = 16 if overlong_row is None else 15
    assert sum(map(sum, report["base"]["validation"]["confusion_matrix"]["matrix"])) == kept
    assert report["base"]["validation"]["accuracy"] == 100.0


def test_few_shot_prompting_baseline_puts_k_solved_training_rows_before_the_question(
    tmp_path, tiny_bert, tiny_llama, monkeypatch
):
    import tunesmith.evaluation.generate as generation
    from tunesmith.report.console import before_after_table

    seen: dict = {}

    def recording(model, tokenizer, prompts, **kw):
        seen[kw.get("label")] = prompts
        return oracle_generate(model, tokenizer, prompts, **kw)

    cfg = classification_config(tmp_path, tiny_bert)
    cfg["eval"].update(baseline_model=str(tiny_llama), baselines=["zero_shot", "few_shot"], few_shot_k=4)
    cfg["train"]["max_steps"] = 1
    monkeypatch.setattr(generation, "generate", recording)
    run, report = train(cfg)
    few = seen["4-shot prompt"][0]
    assert [m["role"] for m in few] == ["user", "assistant"] * 4 + ["user"]
    assert {m["content"] for m in few[1:8:2]} == {"negative", "positive"}  # stratified: both labels shown
    train_texts = {json.loads(x)["text"] for x in Path(cfg["data"]["train"]).read_text().splitlines()}
    assert all(m["content"].split("Text: ", 1)[1] in train_texts for m in few[0:8:2])
    assert len(seen["0-shot prompt"][0]) == 1  # zero-shot: the question alone
    assert report["base"]["baselines"]["4-shot prompt"]["validation"]["accuracy"] == 100.0
    rows = [" ".join(str(c) for c in col._cells) for col in before_after_table(report).columns]
    assert "accuracy vs 4-shot prompt" in rows[1]


def test_prompting_baselines_need_a_model(tmp_path, tiny_bert):
    from tunesmith.errors import UserError

    cfg = classification_config(tmp_path, tiny_bert)
    cfg["eval"]["baselines"] = ["few_shot"]
    with pytest.raises(UserError, match="need eval.baseline_model"):
        config_from_dict(cfg)


# ---------------------------------------------------------------- bad rows from the issue


def test_empty_document_row_exits_2_with_file_and_line(tmp_path, tiny_config):
    rows = summarization_rows(10, 0)
    rows[2]["document"] = "   "
    val = write_jsonl(tmp_path / "data" / "sum-val.jsonl", summarization_rows(3, 1))
    tiny_config["data"].update(
        format="summarization", train=str(write_jsonl(tmp_path / "data" / "sum.jsonl", rows)), validation=str(val)
    )
    tiny_config["model"]["name"] = str(tmp_path / "no-such-model")  # the data check comes before any load
    res = one_thread_cli("train", write_config(tmp_path, tiny_config))
    assert res.returncode == 2, res.stderr
    assert f"{tmp_path / 'data' / 'sum.jsonl'}:3: column 'document' is empty" in res.stderr
    assert "1 bad row(s)" in res.stderr and "Traceback" not in res.stderr


def test_empty_concept_list_is_reported_or_skipped_and_counted(tmp_path, tiny_config):
    train_rows, val_rows = concept_rows()
    train_rows[4] = {"concepts": [], "target": "nothing at all"}
    path = write_jsonl(tmp_path / "data" / "cg.jsonl", train_rows)
    cfg = causal_config(tiny_config, tmp_path, "concepts", train_rows, val_rows)
    cfg["data"].update(train=str(path), dedup=False)
    with pytest.raises(DataError) as err:
        load_examples(config_from_dict(cfg))
    assert err.value.exit_code == 2
    assert err.value.problems == [f"{path}:5: column 'concepts' is an empty list"]

    cfg["data"].update(on_error="skip", max_bad_fraction=0.1)
    examples = load_examples(config_from_dict(cfg))
    assert examples.report["bad_rows"] == {"empty_field": 1}
    assert examples.report["rows"] == {"train": 15, "validation": 6}


def test_classification_with_dp_lora_learns_and_reports_epsilon(tmp_path, tiny_bert):
    """DP-SGD through the classifier recipe: LoRA on a BERT encoder plus the PEFT classifier head (a
    modules_to_save copy), each trained from clipped, noised per-example gradients."""
    cfg = classification_config(tmp_path, tiny_bert)
    # DP needs large logical batches to beat its noise: 400 rows, 128 expected per step.
    cfg["data"]["train"] = str(write_jsonl(tmp_path / "data" / "dp-train.jsonl", sentiment_rows(200, 200, 5, set())))
    cfg["train"].update(max_steps=40, lr=3e-2, batch_size=32, grad_accum=4)
    cfg["eval"]["before_after"] = False
    cfg["privacy"] = {"target_epsilon": 8.0, "max_grad_norm": 1.0}
    run, report = train(cfg)
    assert 0 < report["epsilon"] <= 8.0 and report["privacy"]["steps"] == 40
    assert report["finetuned"]["validation"]["accuracy"] >= 75, report["finetuned"]["validation"]  # majority: 62.5
