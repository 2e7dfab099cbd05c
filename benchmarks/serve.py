"""`tunesmith serve` batching: N concurrent chat requests answered with --max-batch B against --max-batch 1
(one request at a time), same model and prompts, alternating in one invocation; prints requests/s of each
and their ratio on the last line.

Run:  .venv/bin/python benchmarks/serve.py RUN [--requests 8] [--batch 8] [--tokens 32] [--rounds 2]
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


def burst(client: TestClient, n: int, tokens: int) -> float:
    """n requests sent at once (temperature 0: the same work in both modes); seconds until the last answer."""
    gate = threading.Barrier(n + 1)
    done: list = []

    def one(i: int) -> None:
        text = f"Summarize in one sentence: you may cancel {TOPICS[i % len(TOPICS)]} at any time, rule {i}."
        gate.wait()
        res = client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": text}], "max_tokens": tokens, "temperature": 0},
        )
        done.append(res.status_code)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    gate.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    assert done == [200] * n, done
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    model, tokenizer, cfg = load_finetuned(RunDir(a.run))
    clients = {b: TestClient(create_app(model, tokenizer, cfg, "run", max_batch=b)) for b in (1, a.batch)}
    burst(clients[a.batch], 2, 4)  # warm-up: first-call allocations out of the timing
    seconds: dict = {1: [], a.batch: []}
    for r in range(a.rounds):
        for b in (1, a.batch) if r % 2 == 0 else (a.batch, 1):
            before = len(clients[b].app.state.batcher.batches)
            seconds[b].append(burst(clients[b], a.requests, a.tokens))
            batches = clients[b].app.state.batcher.batches[before:]
            print(f"round {r} max_batch {b}: {seconds[b][-1]:.1f} s, batch sizes {batches}", flush=True)
    rate = {b: a.requests * len(s) / sum(s) for b, s in seconds.items()}
    print(f"requests/s: one at a time {rate[1]:.2f}, batched (max {a.batch}) {rate[a.batch]:.2f}")
    print(f"batched / one at a time: {rate[a.batch] / rate[1]:.2f}x")


if __name__ == "__main__":
    main()
