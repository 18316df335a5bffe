#!/usr/bin/env python3
"""Writes the bundled example data of examples/ (pre-tokenized, for the `tiny` preset).

    python3 tools/make_demo_data.py examples

tiny_tokens.jsonl: random ids with masked prompts, for `deltatune eval`.
demo_train/valid.jsonl: stretches of one fixed cycle of 64 ids, a pattern a LoRA learns fast.
"""
import json
import random
import sys

VOCAB = 2048


def write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, separators=(",", ":") if "demo" in path else (", ", ": ")) + "\n")


def tiny_tokens():
    rng = random.Random(7)
    rows = []
    for _ in range(16):
        n = rng.randrange(24, 200)
        ids = [rng.randrange(VOCAB) for _ in range(n)]
        p = rng.randrange(1, n // 2)
        rows.append({"input_ids": ids, "labels": [-100] * p + ids[p:]})
    return rows


def demo():
    rng = random.Random(2026)
    cycle = rng.sample(range(VOCAB), 64)

    def rows(n):
        out = []
        for _ in range(n):
            start, length = rng.randrange(64), rng.randrange(48, 97)
            ids = [cycle[(start + i) % 64] for i in range(length)]
            out.append({"input_ids": ids, "labels": ids})
        return out

    return rows(64), rows(8)


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "examples"
    write(f"{out}/tiny_tokens.jsonl", tiny_tokens())
    train, valid = demo()
    write(f"{out}/demo_train.jsonl", train)
    write(f"{out}/demo_valid.jsonl", valid)
