#!/usr/bin/env bash
# The demo for now: a tiny random Qwen3.5 checkpoint, what `info` says about it, and
# `eval` on bundled token rows. Training replaces this with a real fine-tuning run.
set -euo pipefail
build=${1:-build}
dt="$build/deltatune"
model="$build/demo/model"
here=$(cd "$(dirname "$0")/.." && pwd)

echo "== deltatune init-model --preset tiny --out $model"
"$dt" init-model --preset tiny --out "$model" --seed 1 --force 2>&1 | tail -n 1
echo
echo "== deltatune info --model $model"
"$dt" info --model "$model"
echo
echo "== deltatune eval --model $model --data examples/tiny_tokens.jsonl"
"$dt" eval --model "$model" --data "$here/examples/tiny_tokens.jsonl" 2>&1 | grep -v '^eval: [0-9]'
