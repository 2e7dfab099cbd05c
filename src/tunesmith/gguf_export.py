"""`tunesmith export RUN --gguf FILE`: the fine-tuned model (LoRA merged) as one GGUF file for llama.cpp and
Ollama, with its tokenizer and chat template in the metadata.

Llama-family models only (SmolLM2 is one): GGUF's tensor names and metadata keys are per architecture, and a
file for an architecture written by guesswork would load and answer wrongly. The layout is the one llama.cpp's
own converter writes: tensor names from the `gguf` package's map, the q/k rows permuted into its rotary
order (transformers undoes it on load), tied output embeddings left out. `quant`: f32, f16 (matrices in
half precision, norms in f32) or q8_0 (matrices in 8-bit blocks, via the `gguf` package's quantizer).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tunesmith.errors import UserError

QUANTS = ("f32", "f16", "q8_0")
ARCHITECTURES = ("llama",)


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """HF's q/k rows into GGUF's rotary order (llama.cpp's convert_hf_to_gguf.py does the same)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tokenizer_parts(tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens in id order (padded to the model's vocabulary), their GGUF types, and the BPE merges."""
    import json

    import gguf

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    if state["model"]["type"] != "BPE":
        raise UserError(f"GGUF export supports BPE tokenizers; this one is {state['model']['type']}")
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"].get("merges", [])]
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    special = {a["id"] for a in state.get("added_tokens", []) if a.get("special")}
    tokens, types = [], []
    for i in range(vocab_size):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        kind = gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
        types.append(gguf.TokenType.UNUSED if i not in by_id else kind)
    return tokens, [int(t) for t in types], merges


def rope_theta(config) -> float:
    """transformers 5 keeps it in config.rope_parameters, 4.x in config.rope_theta."""
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    theta = theta or getattr(config, "rope_theta", None)
    if theta is None:
        raise UserError("GGUF export: the model config has no rope_theta")
    if isinstance(rope, dict) and rope.get("rope_type", "default") != "default":
        raise UserError(f"GGUF export: rope scaling {rope.get('rope_type')!r} is not written yet")
    return float(theta)


def check_architecture(config) -> None:
    if config.model_type not in ARCHITECTURES:
        raise UserError(
            f"GGUF export supports {', '.join(ARCHITECTURES)} models; this run's is {config.model_type}",
            hint="Export a Hugging Face directory instead: tunesmith export RUN --merge DIR",
        )


def write_gguf(model, tokenizer, out: Path, quant: str, name: str) -> None:
    import gguf

    config = model.config
    check_architecture(config)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    kinds = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}
    writer.add_file_type(getattr(gguf.LlamaFileType, kinds[quant]))
    tokens, types, merges = tokenizer_parts(tokenizer, config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, token in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id)):
        if token is not None:
            getattr(writer, f"add_{key}_token_id")(token)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp and transformers read tied output embeddings from token_embd
        if "rotary_emb" in hf_name:
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"GGUF export: no GGUF name for tensor {hf_name}")
        data = tensor.detach().float().cpu().numpy()
        if name.endswith("attn_q.weight"):
            data = permute(data, heads)
        elif name.endswith("attn_k.weight"):
            data = permute(data, kv_heads)
        add_tensor(writer, name, data, quant)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def add_tensor(writer, name: str, data: np.ndarray, quant: str) -> None:
    import gguf

    matrix = data.ndim == 2
    if quant == "f16" and matrix:
        writer.add_tensor(name, data.astype(np.float16))
    elif quant == "q8_0" and matrix and data.shape[-1] % 32 == 0:  # Q8_0 works in blocks of 32 along a row
        q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
        writer.add_tensor(name, data.astype(np.float32))


def export_gguf(run, out: Path, quant: str) -> None:
    from tunesmith.inference import load_finetuned

    if quant not in QUANTS:
        raise UserError(f"--quant {quant}: one of {', '.join(QUANTS)}")
    if not out.parent.is_dir():
        raise UserError(f"--gguf {out}: no folder {out.parent}")
    model, tokenizer, _ = load_finetuned(run, quantized=False)
    check_architecture(model.config)  # before merging: a refusal should be quick
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    write_gguf(model, tokenizer, out, quant, run.path.name)
