"""Batched generation: left padding and the KV cache, never one prompt at a time; greedy unless eval.decoding
asks for several candidates per prompt (decoding.py)."""

from __future__ import annotations

import torch
from rich.progress import Progress

from tunesmith.config.decoding import Decoding
from tunesmith.data.collate import left_pad
from tunesmith.data.tokenize import render_prompt
from tunesmith.evaluation import decoding as dec


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[list[dict[str, str]] | str],
    max_new_tokens: int = 128,
    batch_size: int = 8,
    device=None,
    label: str = "generate",
    synced: bool = False,
    decoding: Decoding | None = None,
    concepts: list[list[str]] | None = None,
    seed: int = 0,
    streamer=None,
) -> tuple[list[str], list[bool]]:
    """Return the decoded answers and, for each, whether it ended with EOS before the length limit.
    `decoding` (default: greedy, one output): the candidates per prompt and which is kept (decoding.py);
    `concepts`: each prompt's concepts, for rerank: coverage; `seed`: sampling's seed; `streamer`: see
    decoding.candidates (one prompt, one candidate).
    `synced`: every rank keeps stepping until all have finished (ZeRO-3, whose forward is a collective)."""
    from tunesmith.console import console

    decoding = decoding or dec.GREEDY
    by_concepts = decoding.by_concepts
    if by_concepts and (concepts is None or len(concepts) != len(prompts)):
        raise ValueError("rerank: coverage needs each prompt's concepts")
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    # a prompt is chat messages (rendered with the template) or, for plain continuation, a string as it is
    texts = [p if isinstance(p, str) else render_prompt(tokenizer, p) for p in prompts]
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    # Similar lengths in one batch: less left padding to compute through.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    outputs, stopped = [""] * len(prompts), [False] * len(prompts)
    with (
        Progress(console=console, transient=True, disable=not console.is_terminal) as bar,
        dec.seeded(decoding, seed, device),
    ):
        task = bar.add_task(label, total=len(order))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = {k: v.to(device) for k, v in left_pad([encoded[i] for i in idx], tokenizer.pad_token_id).items()}
            texts, scores, stops = dec.candidates(model, tokenizer, batch, max_new_tokens, decoding, synced, streamer)
            for k, i in enumerate(idx):
                j = dec.pick(texts[k], scores[k], concepts[i] if by_concepts else None)
                outputs[i], stopped[i] = texts[k][j], stops[k][j]
            bar.advance(task, len(idx))
    model.train(was_training)
    return outputs, stopped


def generate_sharded(acc, model, tokenizer, prompts: list, *args, fn=None, **kwargs) -> tuple[list[str], list[bool]]:
    """`fn` (default: generate) with the prompts split across the launch's processes (every world-th
    prompt) and the answers gathered back in order; every rank gets all of them."""
    fn = fn or generate
    if acc is None or acc.num_processes == 1:
        return fn(model, tokenizer, prompts, *args, **kwargs)
    from accelerate.utils import gather_object

    from tunesmith.training.processes import collective_forward

    mine = list(range(acc.process_index, len(prompts), acc.num_processes))
    ask = [prompts[i] for i in mine]
    concepts = kwargs.get("concepts")  # per prompt: sharded alongside
    if concepts is not None:
        kwargs["concepts"] = [concepts[i] for i in mine]
    if collective_forward(acc):  # as many prompts on every rank (copies pad), generated in lock-step
        pad = -(-len(prompts) // acc.num_processes) - len(mine)
        ask += prompts[:1] * pad
        if concepts is not None:
            kwargs["concepts"] += concepts[:1] * pad
        kwargs["synced"] = True
    outputs, stopped = fn(model, tokenizer, ask, *args, **kwargs) if ask else ([], [])
    outputs, stopped = outputs[: len(mine)], stopped[: len(mine)]
    gathered = gather_object([(i, o, st) for i, o, st in zip(mine, outputs, stopped)])
    ordered = sorted(gathered, key=lambda x: x[0])
    return [o for _, o, _ in ordered], [st for _, _, st in ordered]
