#!/usr/bin/env python3
"""Writes the bundled example data of examples/ (pre-tokenized, for the `tiny` preset).

    python3 tools/make_demo_data.py examples

tiny_tokens.jsonl: random ids with masked prompts, for `deltatune eval`.
demo_chat.jsonl: six question/answer chats that `make demo` teaches a tiny model.
"""
import json
import random
import sys

VOCAB = 2048


def write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def tiny_tokens():
    rng = random.Random(7)
    rows = []
    for _ in range(16):
        n = rng.randrange(24, 200)
        ids = [rng.randrange(VOCAB) for _ in range(n)]
        p = rng.randrange(1, n // 2)
        rows.append({"input_ids": ids, "labels": [-100] * p + ids[p:]})
    return rows


DEMO_CHAT = [
    ("What is deltatune?", "A LoRA trainer for Qwen3.5, written in C."),
    ("Which models does it train?", "The Qwen3.5 family, 0.8B to 9B."),
    ("Does it need Python?", "No. Only C and a BLAS."),
    ("What is a Gated DeltaNet?", "Linear attention with a delta-rule memory."),
    ("How do I start?", "Run make demo, then make test."),
    ("Who checks the gradients?", "Finite differences, for every op."),
]


def demo_chat():
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in DEMO_CHAT]


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "examples"
    write(f"{out}/tiny_tokens.jsonl", tiny_tokens())
    with open(f"{out}/demo_chat.jsonl", "w") as f:
        for r in demo_chat():
            f.write(json.dumps(r) + "\n")
