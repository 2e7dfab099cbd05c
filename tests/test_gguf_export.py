"""`tunesmith export RUN --gguf`: the tiny LoRA run merged and written as GGUF, loaded back by transformers
(`from_pretrained(dir, gguf_file=...)`, which undoes GGUF's q/k order): logits match the merged model (f32
exactly up to float error, f16 within 1e-2, q8_0 within a stated bound), greedy generation is the same, and the
tokenizer and chat template travel in the metadata."""

from __future__ import annotations

import pytest
import torch
from _cli import invoke_cli
from test_commands import made  # noqa: F401 (the module's finished runs)

pytest.importorskip("gguf")

IDS = torch.tensor([[5, 17, 33, 80, 121, 7, 64, 200]])
BOUND = {"f32": 1e-4, "f16": 1e-2, "q8_0": 0.15}  # q8_0: 8-bit blocks of 32 on a random tiny model


@pytest.fixture(scope="module")
def merged(made):  # noqa: F811
    from tunesmith.inference import load_finetuned
    from tunesmith.rundir import RunDir

    model, tokenizer, _ = load_finetuned(RunDir(made["lm"]))
    return model.merge_and_unload().eval(), tokenizer


@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0"])
def test_the_exported_file_loads_back_with_the_merged_models_logits_and_answers(made, merged, tmp_path, quant):  # noqa: F811
    from transformers import AutoModelForCausalLM

    out = tmp_path / f"lm-{quant}.gguf"
    res = invoke_cli("export", made["lm"], "--gguf", out, "--quant", quant)
    assert res.returncode == 0, res.stderr
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name).eval()
    model, _ = merged
    with torch.no_grad():
        want, got = model(IDS).logits, back(IDS).logits
    assert (got - want).abs().max().item() <= BOUND[quant]
    if quant != "q8_0":
        kw = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": 0}
        assert torch.equal(model.generate(IDS, **kw), back.generate(IDS, **kw))


def test_tokenizer_and_chat_template_travel_in_the_metadata(made, merged, tmp_path):  # noqa: F811
    import gguf

    out = tmp_path / "lm.gguf"
    assert invoke_cli("export", made["lm"], "--gguf", out).returncode == 0
    reader = gguf.GGUFReader(str(out))
    fields = reader.fields
    _, tokenizer = merged
    template = bytes(fields["tokenizer.chat_template"].parts[-1]).decode()
    assert template == tokenizer.chat_template
    tokens = [bytes(fields["tokenizer.ggml.tokens"].parts[i]).decode() for i in fields["tokenizer.ggml.tokens"].data]
    assert tokens[: len(tokenizer)] == [tokenizer.convert_ids_to_tokens(i) for i in range(len(tokenizer))]
    assert int(fields["tokenizer.ggml.eos_token_id"].parts[-1][0]) == tokenizer.eos_token_id
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied: read from token_embd


def test_bad_gguf_exports_are_refused_before_any_model_loads(made, tmp_path):  # noqa: F811
    taken = tmp_path / "taken.gguf"
    taken.write_text("")
    for args, says in (
        (["--gguf", taken], "exists"),
        (["--gguf", tmp_path / "x.gguf", "--quant", "q2"], "--quant"),
        (["--gguf", tmp_path / "x.gguf", "--merge", tmp_path / "m"], "exactly one"),
        ([], "exactly one"),
        (["--gguf", tmp_path / "no" / "x.gguf"], "no folder"),
    ):
        res = invoke_cli("export", made["lm"], *args)
        assert res.returncode == 2 and says in res.stderr, (args, res.stderr)
    res = invoke_cli("export", made["cls"], "--gguf", tmp_path / "c.gguf")
    assert res.returncode == 2 and "classification" in res.stderr


def test_a_non_default_rope_theta_survives_the_round_trip(tmp_path, tiny_llama, tiny_tokenizer):
    """SmolLM2's rope_theta is 100,000; transformers 5 keeps it in config.rope_parameters."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from tunesmith.gguf_export import write_gguf

    config = LlamaConfig.from_pretrained(str(tiny_llama))
    config.rope_parameters = {"rope_theta": 100_000.0, "rope_type": "default"}
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    write_gguf(model, tiny_tokenizer, tmp_path / "m.gguf", "f32", "m")
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf").eval()
    assert back.config.rope_parameters["rope_theta"] == 100_000.0
    with torch.no_grad():
        assert (back(IDS).logits - model(IDS).logits).abs().max().item() <= BOUND["f32"]


def test_overwrite_replaces_an_export_only_once_the_new_one_is_complete(made, tmp_path, monkeypatch):  # noqa: F811
    from tunesmith import gguf_export

    old = tmp_path / "old.gguf"
    old.write_bytes(b"old")
    res = invoke_cli("export", made["lm"], "--gguf", old)
    assert res.returncode == 2 and "--overwrite" in res.stderr and old.read_bytes() == b"old"

    def fails(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf_export, "write_gguf", fails)
    with pytest.raises(RuntimeError):
        invoke_cli("export", made["lm"], "--gguf", old, "--overwrite")
    assert old.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["old.gguf"]
    monkeypatch.undo()
    assert invoke_cli("export", made["lm"], "--gguf", old, "--overwrite").returncode == 0
    assert old.read_bytes()[:4] == b"GGUF"

    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "keep.txt").write_text("mine")
    res = invoke_cli("export", made["lm"], "--merge", merged)
    assert res.returncode == 2 and "not empty" in res.stderr and (merged / "keep.txt").read_text() == "mine"
    assert invoke_cli("export", made["lm"], "--merge", merged, "--overwrite").returncode == 0
    assert (merged / "config.json").is_file() and not (merged / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "old.gguf"]  # no staging left behind
    res = invoke_cli("export", made["lm"], "--merge", made["lm"], "--overwrite")
    assert res.returncode == 2 and "run directory" in res.stderr and (made["lm"] / "run.json").is_file()
