"""Multi-stage fine-tuning on the tiny Llama: stage 2 starts from stage 1's weights."""

from __future__ import annotations

import json

import pytest
import torch
from _cli import run_cli
from conftest import instruction_rows, write_config, write_jsonl

from tunesmith.config import config_from_dict, stage_config
from tunesmith.errors import UserError


def staged(tiny_config, tmp_path) -> dict:
    # Stage 1 teaches a different mapping (copy instead of reverse) on its own rows.
    copy_rows = [
        {**r, "instruction": "copy the words", "output": r["input"].split(" #")[0]}
        for r in instruction_rows(48, seed=7)
    ]
    tiny_config["train"].update(max_steps=6, lr=3e-2)
    tiny_config["eval"].update(samples=0, max_rows=6, generate_rows=2, max_new_tokens=4)
    tiny_config["stages"] = [
        {
            "name": "copy",
            "data": {
                "train": str(write_jsonl(tmp_path / "s1.jsonl", copy_rows)),
                "format": "instruction",
                "max_length": 128,
                "overlength": "drop",
            },
            "train": {"max_steps": 8},
        }
    ]
    return tiny_config


def test_each_stage_starts_from_the_previous_stages_weights(tiny_config, tmp_path):
    from safetensors.torch import load_file

    res = run_cli("train", write_config(tmp_path, staged(tiny_config, tmp_path)))
    assert res.returncode == 0, res.stderr
    runs = tmp_path / "runs"
    stage1, final = runs / "tiny-stage1-copy", runs / "tiny"
    assert json.loads((stage1 / "data_report.json").read_text())["rows"]["train"] < 48  # its own data, split
    final_cfg = (final / "config.yaml").read_text()
    assert str(stage1 / "merged") in final_cfg  # the final stage loads stage 1's merged weights
    # Those weights are the original base plus stage 1's LoRA update, not the original base.
    base = load_file(str(next((tmp_path.parent).glob("**/tiny-llama*/model.safetensors"))))
    merged = load_file(str(stage1 / "merged" / "model.safetensors"))
    q = next(k for k in merged if "q_proj" in k)
    assert not torch.equal(merged[q], base[q])
    report = json.loads((final / "eval.json").read_text())
    assert [r["stage"] for r in report["stages"]] == ["copy", "final"]
    # The final run's "base" row is the stage-1 model on the final task: what the stages table reports.
    assert report["base"]["validation"]["loss"] == pytest.approx(report["stages"][0]["final_task"]["loss"], rel=1e-5)
    assert "Stages: the final task" in res.stderr + res.stdout
    assert "<th>tiny-stage1-copy</th><th>tiny</th>" in (final / "stages.html").read_text()
    html = (final / "report.html").read_text()  # the report's stages table: the final task after each stage
    loss = report["stages"][0]["final_task"]["loss"]
    assert "<th>final-task loss</th>" in html and "<tr><td>copy</td><td>instruction</td>" in html
    assert f"{loss:.4f}" in html


def test_stage_configs_are_checked_before_anything_runs(tiny_config, tmp_path):
    cfg = staged(tiny_config, tmp_path)
    assert stage_config(config_from_dict(cfg), 0).train.max_steps == 8
    cfg["stages"][0]["train"] = {"max_stepz": 8}
    with pytest.raises(UserError, match=r"stages\[0\] \(copy\): train.max_stepz: unknown key"):
        config_from_dict(cfg)
    cfg["stages"][0]["train"] = {}
    cfg["stages"][0]["data"]["format"] = "classification"
    with pytest.raises(UserError, match="generative task"):
        config_from_dict(cfg)


def test_stack_mode_trains_a_new_adapter_on_top_of_the_previous_one(tiny_config, tmp_path):
    from peft import PeftModel

    from tunesmith import models
    from tunesmith.inference import load_finetuned
    from tunesmith.rundir import RunDir

    cfg = staged(tiny_config, tmp_path)
    cfg["stage_mode"] = "stack"
    res = run_cli("train", write_config(tmp_path, cfg))
    assert res.returncode == 0, res.stderr
    runs = tmp_path / "runs"
    stage1, final = runs / "tiny-stage1-copy", runs / "tiny"
    assert not (stage1 / "merged").exists()  # nothing merged on disk: two small adapters
    final_cfg = RunDir(final).config()
    assert final_cfg.model.name == tiny_config["model"]["name"]
    assert final_cfg.model.adapters == [str(stage1 / "adapter")]
    report = json.loads((final / "eval.json").read_text())
    # The final stage starts from base + stage-1 adapter: its "base" row is what stage 1 left.
    assert report["base"]["validation"]["loss"] == pytest.approx(report["stages"][0]["final_task"]["loss"], rel=1e-5)

    # The run loads as base, stage-1 adapter folded in, final adapter on top, and nothing else.
    model, tok, _ = load_finetuned(RunDir(final))
    plain = models.load_causal_lm(
        str(tiny_config["model"]["name"]), final_cfg.model.model_copy(update={"adapters": []})
    )
    by_hand = PeftModel.from_pretrained(
        PeftModel.from_pretrained(plain, str(stage1 / "adapter")).merge_and_unload(), str(final / "adapter")
    ).eval()
    ids = tok("copy the words", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, by_hand(ids).logits, atol=1e-5)
        without_stage1 = PeftModel.from_pretrained(
            models.load_causal_lm(
                str(tiny_config["model"]["name"]), final_cfg.model.model_copy(update={"adapters": []})
            ),
            str(final / "adapter"),
        ).eval()
        assert not torch.allclose(model(ids).logits, without_stage1(ids).logits, atol=1e-4)


def test_stack_mode_needs_lora_and_adapter_dirs(tiny_config, tmp_path):
    cfg = staged(tiny_config, tmp_path)
    cfg.update(stage_mode="stack", peft={"method": "full"})
    with pytest.raises(UserError, match="stage_mode: stack .* needs peft.method: lora"):
        config_from_dict(cfg)
    from tunesmith import models

    with pytest.raises(UserError, match="is not a PEFT adapter directory"):
        models.fold_adapters(object(), [str(tmp_path)])
