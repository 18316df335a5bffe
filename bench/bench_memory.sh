#!/usr/bin/env bash
# Memory of LoRA training by preset and weight format: the weights as stored and the peak RSS of one
# step at batch 1 x BENCH_MEMORY_SEQ, gradient checkpointing, on the CPU. Quantized checkpoints are
# written by `deltatune quantize`, as an mlx-community download would be; all are cached in bench/out/.
#   bench/bench_memory.sh [build-dir]   (bench/bench.sh runs it)
#   env: BENCH_MEMORY_PRESETS ("0.8b"; "0.8b 4b 9b" for the whole table: hours on 2 cores),
#        BENCH_MEMORY_FORMATS ("bf16 8 4"), BENCH_MEMORY_SEQ (2048)
set -euo pipefail
build=${1:-build}
here=$(cd "$(dirname "$0")" && pwd)
dt="$build/deltatune"
out="$here/out"
mkdir -p "$out"

mem_seq=${BENCH_MEMORY_SEQ:-2048}
for mp in ${BENCH_MEMORY_PRESETS:-0.8b}; do
  base="$out/qwen35-$mp-bf16"
  [[ -f "$base/model.safetensors" || -f "$base/model.safetensors.index.json" ]] ||
      "$dt" init-model --preset "$mp" --out "$base" --seed 1 --dtype bf16 --force >/dev/null 2>&1
  vocab=$("$dt" info --model "$base" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["config"]["vocab_size"])')
  mdata="$out/tokens-1-x-$mem_seq.jsonl"
  python3 "$here/random_tokens.py" "$mdata" 1 "$mem_seq" "$vocab"
  for fmt in ${BENCH_MEMORY_FORMATS:-bf16 8 4}; do
    m="$base"
    if [[ $fmt != bf16 ]]; then
      m="$out/qwen35-$mp-q$fmt"
      [[ -f "$m/config.json" ]] || "$dt" quantize --model "$base" --out "$m" --bits "$fmt" --force >/dev/null 2>&1
    fi
    wbytes=$("$dt" info --model "$m" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["weights"]["bytes"])')
    dir="$out/mem-run"
    rm -rf "$dir"
    "$dt" train --device cpu --model "$m" --data "$mdata" --out "$dir" --steps 1 --batch-size 1 --grad-accum 1 \
        --max-seq-len "$mem_seq" >/dev/null 2>"$out/mem.err" || { cat "$out/mem.err" >&2; exit 1; }
    python3 - "$dir/train_log.jsonl" "$mp" "$fmt" "$mem_seq" "$wbytes" <<'PY'
import json, sys
r = [json.loads(l) for l in open(sys.argv[1]) if '"loss"' in l][-1]
fmt = "bf16" if sys.argv[3] == "bf16" else sys.argv[3] + "-bit"
print(f"memory  {sys.argv[2]} {fmt:<6} weights {int(sys.argv[5]) / 2**30:.2f} GiB, LoRA training 1 x {sys.argv[4]}: "
      f"peak {r['peak_mem_mb'] / 1024:.2f} GiB ({r['seconds']:.0f} s/step, loss {r['loss']:.3f})")
PY
  done
  rm -rf "$out/mem-run" "$out/mem.err"
done

