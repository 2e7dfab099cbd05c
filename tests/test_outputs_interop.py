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


# The module names vLLM's Llama takes LoRA on (its packed qkv_proj and gate_up_proj are filled from these).
VLLM_LLAMA_LORA = {
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "embed_tokens",
    "lm_head",
}


def test_the_adapter_directory_has_what_vllm_lora_modules_reads(tiny_config):
    """`vllm serve BASE --enable-lora --lora-modules NAME=runs/<run>/adapter` reads adapter_config.json (its
    PEFTHelper: r, lora_alpha, target_modules required; modules_to_save, DoRA and LoRA biases refused; r at most
    --max-lora-rank, 16 by default) and adapter_model.safetensors, every tensor named
    base_model.model.<module>.lora_A|B.weight for a module the architecture takes LoRA on."""
    import re

    from safetensors import safe_open

    folder = _trained_run(tiny_config).path / "adapter"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert {"r", "lora_alpha", "target_modules"} <= set(config) and config["r"] <= 16
    assert not config.get("modules_to_save") and not config.get("use_dora") and config.get("bias") == "none"
    # peft writes the modules all-linear matched as full paths; vLLM goes by the tensor names' last part
    targets = {t.rsplit(".", 1)[-1] for t in config["target_modules"]}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        shapes = {name: f.get_slice(name).get_shape() for name in f.keys()}
    assert len(shapes) == 2 * 2 * len(targets)  # A and B for each target in each of the 2 layers
    for name, shape in shapes.items():
        parsed = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", name)
        assert parsed and parsed[1].rsplit(".", 1)[-1] in targets & VLLM_LLAMA_LORA, name
        assert (shape[0] if parsed[2] == "A" else shape[1]) == config["r"], (name, shape)
