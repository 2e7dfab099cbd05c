"""Batched greedy generation: left padding and the KV cache, never one prompt at a time."""

from __future__ import annotations

import torch
from rich.progress import Progress

from tunesmith.data.collate import left_pad
from tunesmith.data.tokenize import render_prompt


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[dict[str, str]]], max_new_tokens: int = 128,
             batch_size: int = 8, device=None, label: str = "generate",
             synced: bool = False) -> tuple[list[str], list[bool]]:
    """Return the decoded answers and, for each, whether it ended with EOS before the length limit.
    `synced`: every rank keeps stepping until all have finished (ZeRO-3, whose forward is a collective)."""
    from tunesmith.training.progress import console

    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    encoded = [tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
    # Similar lengths in one batch: less left padding to compute through.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    outputs, stopped = [""] * len(prompts), [False] * len(prompts)
    eos = tokenizer.eos_token_id
    with Progress(console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(label, total=len(order))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = {k: v.to(device) for k, v in left_pad([encoded[i] for i in idx], tokenizer.pad_token_id).items()}
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=eos, synced_gpus=synced)
            for i, seq in zip(idx, out[:, batch["input_ids"].shape[1] :]):
                outputs[i] = tokenizer.decode(seq, skip_special_tokens=True).strip()
                stopped[i] = bool((seq == eos).any())
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
    if collective_forward(acc):  # as many prompts on every rank (copies pad), generated in lock-step
        ask += prompts[:1] * (-(-len(prompts) // acc.num_processes) - len(mine))
        kwargs["synced"] = True
    outputs, stopped = fn(model, tokenizer, ask, *args, **kwargs) if ask else ([], [])
    outputs, stopped = outputs[: len(mine)], stopped[: len(mine)]
    gathered = gather_object([(i, o, st) for i, o, st in zip(mine, outputs, stopped)])
    ordered = sorted(gathered, key=lambda x: x[0])
    return [o for _, o, _ in ordered], [st for _, _, st in ordered]
