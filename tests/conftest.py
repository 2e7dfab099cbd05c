"""Shared fixtures: a tiny byte-level tokenizer with a chat template and a tiny random Llama.

Everything is built offline in about a second, so recipe tests run the real CLI path on CPU.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _session_tunesmith_home(tmp_path_factory):
    """For fixtures wider than one test (a model, a trained run): never the user's ~/.cache/tunesmith."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNESMITH_HOME", str(tmp_path_factory.mktemp("tunesmith-home-session")))
        yield


@pytest.fixture(autouse=True)
def tunesmith_home(tmp_path_factory, monkeypatch) -> Path:
    """Each test's own TUNESMITH_HOME (caches of tokenized data, converted models), so that no test sees
    another's cache; CLI subprocesses inherit it (tests/reliability/_harness.py ENV). Not created here."""
    path = tmp_path_factory.mktemp("tunesmith-home") / "home"
    monkeypatch.setenv("TUNESMITH_HOME", str(path))
    return path


CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "instruction input output response answer question",
    "one two three four five six seven eight nine ten",
    "reverse the words sort the numbers name the colour",
    '{"category": "billing", "urgency": "high"}',
]


def build_tokenizer(path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    fast.chat_template = CHATML
    fast.save_pretrained(path)
    return fast


def build_tiny_llama(path: Path, seed: int = 0, hidden: int = 32) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(path)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        tie_word_embeddings=True,
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def instruction_rows(n: int, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    words = ["one", "two", "three", "four", "five", "six", "seven", "eight"]
    rows = []
    for i in range(n):
        k = rng.randint(1, 6)
        ws = [rng.choice(words) for _ in range(k)]
        rows.append(
            {
                "id": f"r{i}",
                "instruction": "reverse the words",
                "input": " ".join(ws) + f" #{i}",
                "output": " ".join(reversed(ws)),
            }
        )
    return rows


@pytest.fixture
def tiny_config(tmp_path, tiny_llama):
    """A config dict for a fast run on the tiny model; tests tweak and write it."""
    train = write_jsonl(tmp_path / "data" / "train.jsonl", instruction_rows(48))
    val = write_jsonl(tmp_path / "data" / "val.jsonl", instruction_rows(12, seed=1))
    return {
        "name": "tiny",
        "output_dir": str(tmp_path / "runs"),
        "seed": 0,
        "model": {"name": str(tiny_llama)},
        "peft": {"method": "lora", "r": 4, "dropout": 0.0},
        "data": {
            "train": str(train),
            "validation": str(val),
            "format": "instruction",
            "max_length": 128,
            "overlength": "drop",
        },
        "train": {"max_steps": 6, "lr": 1e-2, "batch_size": 4, "grad_accum": 1, "warmup_ratio": 0.0},
        "eval": {"batch_size": 8, "max_new_tokens": 8, "samples": 1},
    }


def crash_then_resume(train, cfg, monkeypatch, step: int):
    """`train(cfg)` interrupted right after the checkpoint of update `step` is committed, then resumed;
    the resumed run's directory."""
    from tunesmith.recipes import fitting

    real_save = fitting.save_checkpoint

    def crash(s, updates, data_step):
        real_save(s, updates, data_step)
        if updates == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(fitting, "save_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, overwrite=True)
    monkeypatch.setattr(fitting, "save_checkpoint", real_save)
    return train(cfg, resume=True).path


def write_config(tmp_path: Path, cfg: dict) -> Path:
    import yaml

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def pytest_terminal_summary(terminalreporter):
    """The fuzz tally (tests/reliability/_fuzz.py) when a fuzz module ran: a report after the tests, so that
    no test depends on which other modules ran before it."""
    stats = getattr(sys.modules.get("_fuzz"), "STATS", None)
    if not stats:
        return
    total = sum(c["inputs"] for c in stats.values())
    terminalreporter.write_sep("-", f"fuzz: {total} generated inputs")
    for name, c in sorted(stats.items()):
        rest = ", ".join(f"{k} {v}" for k, v in sorted(c.items()) if k != "inputs")
        terminalreporter.write_line(f"  {name}: {c['inputs']} inputs; {rest}")
