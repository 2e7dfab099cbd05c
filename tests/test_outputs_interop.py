"""Outputs other tools load: the adapter with plain peft, the merged export with plain transformers."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch
from _cli import run_cli

from tunesmith.config import config_from_dict
from tunesmith.inference import load_finetuned
from tunesmith.recipes import causal_lm
from tunesmith.rundir import RunDir

PLAIN_PEFT = textwrap.dedent("""
    import json, sys, torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base, adapter, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    with torch.no_grad():
        print(json.dumps(model(torch.tensor([ids])).logits[0].tolist()))
""")


def _trained_run(tiny_config):
    tiny_config["train"].update(max_steps=3, lr=5e-2)
    tiny_config["eval"].update(before_after=False, samples=0)
    return causal_lm.train(config_from_dict(tiny_config), overwrite=True)


def test_adapter_loads_with_plain_peft_in_another_process(tiny_config, tiny_llama):
    run = _trained_run(tiny_config)
    model, tok, _ = load_finetuned(RunDir.open(run.path))
    ids = tok("reverse the words one two")["input_ids"]
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0]
    # A separate interpreter that imports peft and transformers only.
    res = subprocess.run(
        [sys.executable, "-c", PLAIN_PEFT, str(tiny_llama), str(run / "adapter"), json.dumps(ids)],
        capture_output=True,
        text=True,
        check=True,
    )
    theirs = torch.tensor(json.loads(res.stdout))
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    plain_base = PLAIN_PEFT.replace(
        "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)",
        "AutoModelForCausalLM.from_pretrained(base)",
    )
    base = torch.tensor(
        json.loads(
            subprocess.run(
                [sys.executable, "-c", plain_base, str(tiny_llama), str(run / "adapter"), json.dumps(ids)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
    )
    assert (base - ours).abs().max() > 1e-3  # the adapter really changes the model


def test_export_merge_writes_a_plain_hf_model_with_the_same_logits(tiny_config, tmp_path):
    from transformers import AutoModelForCausalLM

    run = _trained_run(tiny_config)
    out = tmp_path / "merged"
    res = run_cli("export", run.path, "--merge", out)
    assert res.returncode == 0, res.stderr
    model, tok, _ = load_finetuned(RunDir.open(run.path))
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([tok("reverse the words three")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)


def test_generate_cli_answers_prompts_and_a_jsonl_file(tiny_config, tmp_path):
    run = _trained_run(tiny_config)
    one = run_cli("generate", run.path, "--prompt", "reverse the words", "--max-new-tokens", "5")
    assert one.returncode == 0, one.stderr
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"instruction": "reverse the words", "input": "one two"}\n{"prompt": "three four"}\n')
    many = run_cli("generate", run.path, "--input", prompts, "--max-new-tokens", "5")
    assert many.returncode == 0, many.stderr
    assert len([json.loads(x)["output"] for x in many.stdout.splitlines()]) == 2
