"""Writes ROWS rows of SEQ random token ids below VOCAB (seed 0) as pre-tokenized JSONL, the labels
equal to the inputs: the benches' data.
    python3 bench/random_tokens.py PATH ROWS SEQ VOCAB
"""
import json
import random
import sys

path, rows, seq, vocab = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(0)
with open(path, "w") as f:
    for _ in range(rows):
        ids = [rng.randrange(vocab) for _ in range(seq)]
        f.write(json.dumps({"input_ids": ids, "labels": ids}) + "\n")
