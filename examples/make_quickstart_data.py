"""Write the quickstart dataset: support tickets -> a one-line JSON triage (written by tunesmith).

Run: python examples/make_quickstart_data.py examples/data/quickstart

The task is small on purpose: a fixed output format the base model does not know, learnable in a
few dozen CPU steps, so the before/after table shows a real drop in validation loss.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

PRODUCTS = ["router", "laptop", "phone", "printer", "smart watch", "headphones", "tablet", "camera"]
ISSUES = {
    "billing": [
        "I was charged twice for my {p}",
        "the invoice for my {p} shows the wrong amount",
        "I want a refund for the {p} I returned",
        "my card was billed after I cancelled the {p} plan",
    ],
    "shipping": [
        "my {p} has not arrived yet",
        "the tracking number for my {p} does not work",
        "the box with my {p} was delivered to the wrong address",
        "my {p} arrived damaged in transit",
    ],
    "technical": [
        "my {p} keeps restarting",
        "the {p} will not connect to wifi",
        "the screen of my {p} stays black",
        "my {p} gets very hot after a few minutes",
    ],
    "account": [
        "I cannot log in to manage my {p}",
        "please change the email on my {p} account",
        "I forgot the password for my {p} app",
        "how do I delete the account linked to my {p}",
    ],
}
URGENT = ["This is urgent, I need it today.", "Please help as soon as possible!", "I need this fixed right now."]
CALM = ["No rush.", "Whenever you have time.", "Thanks in advance.", ""]
OPENERS = ["Hello,", "Hi team,", "Good morning.", "Hey,", ""]


def ticket(rng: random.Random) -> dict:
    category = rng.choice(sorted(ISSUES))
    product = rng.choice(PRODUCTS)
    urgent = rng.random() < 0.4
    body = rng.choice(ISSUES[category]).format(p=product)
    tail = rng.choice(URGENT if urgent else CALM)
    text = " ".join(x for x in (rng.choice(OPENERS), body[0].upper() + body[1:] + ".", tail) if x)
    answer = {"category": category, "product": product, "urgency": "high" if urgent else "normal"}
    return {
        "instruction": "Triage this support ticket. Answer with one line of JSON.",
        "input": text,
        "output": json.dumps(answer),
    }


def main(out_dir: str) -> None:
    rng = random.Random(0)
    rows, seen = [], set()
    while len(rows) < 460:
        row = ticket(rng)
        if row["input"] not in seen:  # unique inputs, so validation never repeats a training row
            seen.add(row["input"])
            rows.append(row)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", rows[:400]), ("validation", rows[400:])):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    print(f"wrote {out}/train.jsonl (400 rows) and validation.jsonl (60 rows)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "examples/data/quickstart")
