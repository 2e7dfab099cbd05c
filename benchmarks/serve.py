"""`tunesmith serve` under load: C concurrent clients (1, 4, 16), each sending its share of N chat requests
one after another, against a one-request-at-a-time loop over the same N requests (the server with
--max-batch 1, no concurrency), same model and prompts, alternating in one invocation. Prints requests/s and
completion tokens/s of each, and each level's ratio to the loop on the last lines.

Run:  .venv/bin/python benchmarks/serve.py RUN [--requests 16] [--clients 1,4,16] [--tokens 32] [--rounds 2]
"""

from __future__ import annotations

import argparse
import threading
import time

from fastapi.testclient import TestClient

from tunesmith.inference import load_finetuned
from tunesmith.rundir import RunDir
from tunesmith.serve import create_app

TOPICS = ["a library card", "a gym membership", "a phone contract", "a cloud storage plan", "a streaming service"]


def request(client: TestClient, i: int, tokens: int) -> int:
    """One chat request (temperature 0: the same work in every mode); its completion tokens."""
    text = f"Summarize in one sentence: you may cancel {TOPICS[i % len(TOPICS)]} at any time, rule {i}."
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": tokens, "temperature": 0}
    res = client.post("/v1/chat/completions", json=body)
    assert res.status_code == 200, res.text
    return res.json()["usage"]["completion_tokens"]


def load(client: TestClient, clients: int, n: int, tokens: int) -> tuple[float, int]:
    """`clients` threads share requests 0..n-1, each sending its next one when its last is answered;
    seconds from the start to the last answer, and the completion tokens."""
    gate, counts = threading.Barrier(clients + 1), []

    def one(k: int) -> None:
        gate.wait()
        counts.extend(request(client, i, tokens) for i in range(k, n, clients))

    threads = [threading.Thread(target=one, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    gate.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    assert len(counts) == n
    return time.perf_counter() - start, sum(counts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    levels = [int(x) for x in a.clients.split(",")]
    model, tokenizer, cfg = load_finetuned(RunDir(a.run))
    loop = TestClient(create_app(model, tokenizer, cfg, "run", max_batch=1))
    server = TestClient(create_app(model, tokenizer, cfg, "run", max_batch=max(levels)))
    load(server, 2, 2, 4)  # warm-up: first-call allocations out of the timing
    modes = [("loop", loop, 1)] + [(f"{c} clients", server, c) for c in levels]
    totals: dict = {name: [0.0, 0] for name, _, _ in modes}
    for r in range(a.rounds):
        for name, client, c in modes if r % 2 == 0 else modes[::-1]:
            before = len(client.app.state.batcher.batches)
            seconds, done = load(client, c, a.requests, a.tokens)
            totals[name][0] += seconds
            totals[name][1] += done
            sizes = client.app.state.batcher.batches[before:]
            print(f"round {r} {name}: {seconds:.1f} s, {done} tokens, batch sizes {sizes}", flush=True)
    rate = {name: (a.requests * a.rounds / s, t / s) for name, (s, t) in totals.items()}
    for name, (req, tok) in rate.items():
        print(f"{name}: {req:.2f} requests/s, {tok:.1f} tokens/s")
    for name, _, _ in modes[1:]:
        req, tok = rate[name]
        print(f"{name} / loop: requests/s {req / rate['loop'][0]:.2f}x, tokens/s {tok / rate['loop'][1]:.2f}x")


if __name__ == "__main__":
    main()
