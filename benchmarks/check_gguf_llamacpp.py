"""Check that a `tunesmith export --gguf` file runs in llama.cpp itself as the merged model runs in
transformers: the same prompt token ids from llama.cpp's tokenizer (read from the GGUF), next-token logits
within a bound, and the same greedy tokens.

llama.cpp (llama-cpp-python, which builds it from source) needs no torch, so the check runs in two Pythons:
  .venv/bin/python benchmarks/check_gguf_llamacpp.py reference RUN OUT.json ["prompt"]
  <python with llama_cpp> benchmarks/check_gguf_llamacpp.py check FILE.gguf OUT.json
"""

from __future__ import annotations

import json
import sys

TOKENS = 30


def reference(
    run_path: str, out: str, prompt: str = "Summarize: the tenant may end the lease with 30 days notice."
) -> None:
    import torch

    from tunesmith.data.tokenize import render_prompt
    from tunesmith.inference import load_finetuned
    from tunesmith.rundir import RunDir

    model, tok, _ = load_finetuned(RunDir.open(run_path), quantized=False)
    model = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    text = render_prompt(tok, [{"role": "user", "content": prompt}])
    ids = tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].tolist()
        greedy = model.generate(torch.tensor([ids]), max_new_tokens=TOKENS, do_sample=False)[0, len(ids) :].tolist()
    with open(out, "w") as f:
        json.dump({"text": text, "ids": ids, "logits": logits, "greedy": greedy}, f)
    print(f"reference: {len(ids)} prompt tokens, {len(greedy)} greedy tokens -> {out}")


def check(gguf: str, ref_path: str) -> None:
    import numpy as np
    from llama_cpp import Llama

    with open(ref_path) as f:
        ref = json.load(f)
    llm = Llama(model_path=gguf, n_ctx=512, logits_all=True, verbose=False)
    ids = llm.tokenize(ref["text"].encode(), add_bos=False, special=True)
    print(f"prompt ids equal to transformers': {ids == ref['ids']} ({len(ids)} tokens)")
    llm.eval(ref["ids"])
    logits = np.array(llm.scores[len(ref["ids"]) - 1])
    diff = float(np.abs(logits - np.array(ref["logits"])).max())
    print(f"next-token logits: max |llama.cpp - transformers| = {diff:.4f}")
    llm.reset()
    greedy = []
    for token in llm.generate(ref["ids"], top_k=1, temp=0.0, reset=True):
        if token == llm.token_eos() or len(greedy) == TOKENS:
            break
        greedy.append(token)
    same = greedy == ref["greedy"][: len(greedy)] and len(greedy) >= min(TOKENS, len(ref["greedy"])) - 1
    print(f"greedy tokens equal: {same} ({len(greedy)} tokens)")
    print(f"llama.cpp: {llm.detokenize(greedy).decode(errors='replace')!r}")


if __name__ == "__main__":
    {"reference": reference, "check": check}[sys.argv[1]](*sys.argv[2:])
