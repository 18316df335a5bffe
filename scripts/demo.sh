#!/usr/bin/env bash
# make demo: fine-tune a LoRA on a tiny random Qwen3.5 checkpoint on the CPU and show the loss
# falling. The data (examples/demo_*.jsonl) are stretches of one fixed cycle of 64 token ids, a
# pattern the adapter has to learn: the validation loss goes from about ln(2048) to near zero.
set -euo pipefail
build=${1:-build}
dt="$build/deltatune"
here=$(cd "$(dirname "$0")/.." && pwd)
work="$build/demo"
model="$work/model"
adapter="$work/adapter"
valid="$here/examples/demo_valid.jsonl"
rm -rf "$adapter"

loss_of() { tail -n 1 | python3 -c 'import json,sys; print("%.4f" % json.loads(sys.stdin.read())["loss"])'; }

echo "== deltatune init-model --preset tiny --out $model --init-std 0.1"
# a stronger init than transformers' 0.02, so the frozen tied LM head can express sharp predictions
"$dt" init-model --preset tiny --out "$model" --seed 1 --init-std 0.1 --force 2>&1 | tail -n 1
echo
echo "== validation loss of the base model"
before=$("$dt" eval --model "$model" --data "$valid" 2>/dev/null | loss_of)
echo "eval loss: $before"
echo
echo "== deltatune train (LoRA r16 on the 10 default modules, 8 epochs, gradient checkpointing)"
"$dt" train --model "$model" --data "$here/examples/demo_train.jsonl" --valid "$valid" --out "$adapter" \
    --epochs 8 --lr 3e-3 --batch-size 4 --grad-accum 1 --warmup-steps 5 --eval-every 32 --log-every 16 \
    2>&1 >/dev/null | grep -Ev '^train: [0-9]+/'
echo
echo "== validation loss with the adapter"
after=$("$dt" eval --model "$model" --adapter "$adapter" --data "$valid" 2>/dev/null | loss_of)
echo "eval loss: $before -> $after  (adapter and train_log.jsonl in $adapter)"
