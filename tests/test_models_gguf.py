"""A user's own GGUF file as `model.name` (or a directory plus `model.gguf_file`): converted once to a
safetensors cache and trained like any model. The GGUF is written here from the tiny random Llama, so
its weights are known exactly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from _cli import run_cli
from conftest import instruction_rows, write_config, write_jsonl
from safetensors.torch import load_file

from tunesmith.config import ModelConfig, config_from_dict
from tunesmith.errors import ConfigError, UserError
from tunesmith.models import resolve

SRC = Path(__file__).resolve().parents[1] / "src"


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp stores q/k rows interleaved for its rotary layout; transformers undoes this on load
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model_dir: Path, out: Path) -> Path:
    """The Llama in `model_dir` as an fp32 GGUF file, written the way llama.cpp's converter does."""
    import gguf
    from transformers import AutoTokenizer, LlamaForCausalLM

    model, tok = LlamaForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    c = model.config
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    vocab = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(vocab)
    w.add_token_types([3 if t in tok.all_special_tokens else 1 for t in vocab])  # 3: control
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(tok.chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        a = t.float().numpy()
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            a = _permute(a, c.num_attention_heads if "q_proj" in name else c.num_key_value_heads)
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_llama) -> Path:
    return write_gguf(tiny_llama, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf")


def _weights(folder: Path) -> dict:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def test_a_gguf_file_is_converted_once_to_the_same_weights(tiny_gguf, tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path / "home"))
    cached = Path(resolve(ModelConfig(name=str(tiny_gguf))))
    assert cached.is_relative_to(tmp_path / "home")
    ref, got = _weights(tiny_llama), _weights(cached)
    assert set(got) == set(ref) - {"lm_head.weight"} or set(got) == set(ref)
    for name, tensor in got.items():
        assert torch.equal(tensor, ref[name]), name
    assert "quantization_config" not in json.loads((cached / "config.json").read_text())
    stamp = (cached / "config.json").stat().st_mtime_ns
    assert Path(resolve(ModelConfig(name=str(tiny_gguf)))) == cached  # the second use reads the cache
    assert (cached / "config.json").stat().st_mtime_ns == stamp
    os.utime(tiny_gguf, ns=(stamp, stamp + 10**9))  # a changed file is converted again, into a new cache
    assert Path(resolve(ModelConfig(name=str(tiny_gguf)))) != cached


def test_a_directory_and_gguf_file_key(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path / "home"))
    mcfg = ModelConfig(name=str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    assert (Path(resolve(mcfg)) / "model.safetensors").is_file()
    with pytest.raises(UserError, match="model.gguf_file"):
        resolve(ModelConfig(name=str(tiny_gguf.parent), gguf_file="other.gguf"))
    with pytest.raises(UserError, match=r"set model.gguf_file to one of \['tiny-f32.gguf'\]"):
        resolve(ModelConfig(name=str(tiny_gguf.parent)))  # a folder of GGUF files says which key to set


def test_gguf_file_is_path_checked(tiny_gguf, tmp_path):
    """The directory is inside the allowed root; the file in it is a link to one outside."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "linked.gguf").symlink_to(tiny_gguf)
    tree = {
        "data": {"train": "t.jsonl"},
        "output_dir": str(tmp_path / "runs"),
        "allowed_roots": [str(tmp_path)],
        "model": {"name": str(tmp_path / "m"), "gguf_file": "linked.gguf"},
    }
    with pytest.raises(ConfigError, match="model.gguf_file: .*linked.gguf resolves to .* outside allowed_roots"):
        config_from_dict(tree)
    tree["model"]["gguf_file"] = "linked.bin"
    with pytest.raises(ConfigError, match="model.gguf_file"):
        config_from_dict(tree)


def test_not_a_gguf_file_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path / "home"))
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(UserError, match="as a GGUF model"):
        resolve(ModelConfig(name=str(tmp_path / "broken.gguf")))


def test_train_on_a_gguf_says_one_line_and_prints_no_bars_or_deepspeed_warning(tiny_gguf, tmp_path):
    """The whole CLI in a fresh process (DeepSpeed's warning is printed at its import, once per process):
    a run that uses neither DeepSpeed nor a bar prints one conversion line and then trains."""
    write_jsonl(tmp_path / "data" / "train.jsonl", instruction_rows(24))
    write_jsonl(tmp_path / "data" / "val.jsonl", instruction_rows(6, seed=1))
    write_config(
        tmp_path,
        {
            "name": "g",
            "output_dir": "runs",
            "model": {"name": str(tiny_gguf)},
            "peft": {"method": "lora", "r": 4, "dropout": 0.0},
            "data": {
                "train": "data/train.jsonl",
                "validation": "data/val.jsonl",
                "max_length": 128,
                "overlength": "drop",
            },
            "train": {"max_steps": 1, "batch_size": 4},
            "eval": {"before_after": False, "samples": 0, "generate_rows": 1, "max_new_tokens": 2},
        },
    )
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TUNESMITH_HOME": str(tmp_path / "home"),
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    res = run_cli("train", "config.yaml", cwd=tmp_path, env=env, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert out.count(f"converting {tiny_gguf.name} to safetensors") == 1, out[-3000:]
    assert "Setting accelerator" not in out, out[-3000:]
    assert "de-quantizing" not in out, out[-3000:]
