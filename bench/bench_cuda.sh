#!/usr/bin/env bash
# GPU benchmark: deltatune's LoRA training step (`train --device cuda`) against transformers + PEFT
# doing the same step (bench/hf_peer_cuda.py), on the same random checkpoints (written here by
# `init-model --layout text`, no downloads; cached in bench/out/) and the same rows: batch 2 x 2048
# random tokens, LoRA r16 alpha 16 on the 10 default modules, gradient checkpointing, AdamW lr 2e-4,
# grad-accum 1. Prints a table (tokens/s, peak GiB, deltatune/HF, MFU against the card's measured
# bf16 matmul rate; the FLOPs per token are counted by flops_per_token in bench/hf_peer_cuda.py,
# whose docstring gives the formula) and appends it, dated, to bench/RESULTS.md.
#   bench/bench_cuda.sh [build-dir]
#   env: BENCH_PRESETS ("0.8b 4b"), BENCH_STEPS (8; the median skips 2 warm-ups),
#        BENCH_RESULTS (bench/RESULTS.md; empty: append nowhere),
#        BENCH_DT_TIMEOUT (600: seconds one deltatune run may take before it counts as failed),
#        BENCH_QUANTIZE ("8 4": deltatune again with the base quantized on load to these bits; empty: not)
# A run of deltatune that fails (no CUDA build, no --device flag, an error) is reported in the
# table and its notes; the transformers side runs all the same.
set -uo pipefail
build=${1:-build}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
dt="$build/deltatune"
presets=${BENCH_PRESETS:-"0.8b 4b"}
steps=${BENCH_STEPS:-8}
dt_timeout=${BENCH_DT_TIMEOUT:-600}
results=${BENCH_RESULTS-$here/RESULTS.md}
seq=2048
bs=2
out="$here/out"
peer="$here/hf_peer_cuda.py"
mkdir -p "$out"

# flash-linear-attention / Liger wheels, when someone brought them (.whl/ is git-ignored)
if compgen -G "$root/.whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$root"/.whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

[[ -x "$dt" ]] || { echo "bench-cuda: $dt not found (build first)" >&2; exit 1; }
card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
[[ -n "$card" ]] || { echo "bench-cuda: no GPU (nvidia-smi shows none)" >&2; exit 1; }
echo "bench-cuda: $card, $(date -u +%Y-%m-%d), presets: $presets, $steps steps of $bs x $seq tokens" >&2
python3 "$peer" env >&2
python3 "$peer" matmul > "$out/cuda-matmul.json" || { echo "bench-cuda: the matmul timing failed" >&2; exit 1; }
echo "bench-cuda: bf16 matmul $(python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["tflops"]))' \
      "$out/cuda-matmul.json") TFLOP/s" >&2

cases=()
for preset in $presets; do
  model="$out/qwen35-$preset-bf16-text"
  if [[ ! -f "$model/model.safetensors" ]]; then
    echo "bench-cuda: writing a random $preset checkpoint to $model" >&2
    "$dt" init-model --preset "$preset" --out "$model" --seed 1 --dtype bf16 --layout text --force 2>/dev/null \
        || { echo "bench-cuda: init-model --preset $preset failed" >&2; exit 1; }
  fi
  rows=$((steps * bs))
  data="$out/tokens-$rows-x-$seq.jsonl"
  vocab=$(python3 -c 'import json,sys; c=json.load(open(sys.argv[1])); print(c.get("text_config", c)["vocab_size"])' \
          "$model/config.json")
  python3 "$here/random_tokens.py" "$data" "$rows" "$seq" "$vocab"

  run="$out/cuda-train-$preset"
  rm -rf "$run"
  echo "bench-cuda: deltatune train --device cuda, $preset" >&2
  if timeout "$dt_timeout" "$dt" train --device cuda --model "$model" --data "$data" --out "$run" --batch-size "$bs" --grad-accum 1 \
        --steps "$steps" --max-seq-len "$seq" --no-shuffle >"$out/cuda-dt-$preset.out" 2>"$out/cuda-dt-$preset.err"; then
    grep -h '^train:' "$out/cuda-dt-$preset.err" >&2
    grep -h '"step"' "$run/train_log.jsonl" >&2
    # the per-op breakdown from a short run of its own: the profile's events keep the step out of
    # a CUDA graph, so the timed run above goes without them
    rm -rf "$run-profile"
    DT_CUDA_PROFILE=1 timeout "$dt_timeout" "$dt" train --device cuda --model "$model" --data "$data" --out "$run-profile" \
        --batch-size "$bs" --grad-accum 1 --steps 3 --max-seq-len "$seq" --no-shuffle >/dev/null \
        2>"$out/cuda-dt-$preset-profile.err" || echo "bench-cuda: the profiled run failed" >&2
  else
    rc=$?
    # steps it logged before failing are no result
    [[ -f "$run/train_log.jsonl" ]] && mv "$run/train_log.jsonl" "$run/train_log.failed.jsonl"
    [[ $rc == 124 ]] && echo "bench-cuda: stopped after $dt_timeout s (BENCH_DT_TIMEOUT)" >>"$out/cuda-dt-$preset.err"
    echo "bench-cuda: deltatune's run FAILED (exit $rc): $(grep -v '^\s*$' "$out/cuda-dt-$preset.err" | tail -n 1)" >&2
  fi

  echo "bench-cuda: transformers + PEFT, $preset" >&2
  timeout "${BENCH_HF_TIMEOUT:-600}" python3 "$peer" peer --model "$model" --data "$data" --steps "$steps" --batch-size "$bs" \
      >"$out/cuda-hf-$preset.json" 2>"$out/cuda-hf-$preset.err"
  grep -E '^hf step|Error|fast path|flash-linear|causal-conv1d' "$out/cuda-hf-$preset.err" | tail -n 20 >&2
  cases+=(--case "$preset" "$model" "$run/train_log.jsonl" "$out/cuda-dt-$preset.err" "$out/cuda-hf-$preset.json")
done

cmd="BENCH_PRESETS=\"$presets\" BENCH_STEPS=$steps bench/bench_cuda.sh $build"
python3 "$peer" table --card "$card" --matmul "$out/cuda-matmul.json" --command "$cmd" --seq "$seq" \
    ${results:+--results "$results"} "${cases[@]}" | tee "$out/cuda-results-section.md"

# deltatune again on the same rows with the frozen base quantized on load: the quantized products'
# speed and the memory they save, beside the bf16 run above
quant=${BENCH_QUANTIZE-"8 4"}
if [[ -n "$quant" ]]; then
  {
    echo
    echo "deltatune with the base quantized on load (\`--quantize\`, MLX affine, group 64), same rows and settings:"
    echo
    echo "| model | base | tokens/s | s/step | peak GiB | step-1 loss |"
    echo "|---|---|---|---|---|---|"
    for preset in $presets; do
      model="$out/qwen35-$preset-bf16-text"
      data="$out/tokens-$((steps * bs))-x-$seq.jsonl"
      for bits in bf16 $quant; do
        run="$out/cuda-train-$preset" err="$out/cuda-dt-$preset.err"
        if [[ $bits != bf16 ]]; then
          run="$out/cuda-train-$preset-q$bits" err="$out/cuda-dt-$preset-q$bits.err"
          rm -rf "$run"
          timeout "$dt_timeout" "$dt" train --device cuda --quantize "$bits" --model "$model" --data "$data" --out "$run" \
              --batch-size "$bs" --grad-accum 1 --steps "$steps" --max-seq-len "$seq" --no-shuffle \
              >/dev/null 2>"$err"
        fi
        python3 - "$here" "$run/train_log.jsonl" "$err" "$preset" "$bits" <<'PY'
import sys
sys.path.insert(0, sys.argv[1])
from hf_peer_cuda import dt_result
r, base = dt_result(sys.argv[2], sys.argv[3]), sys.argv[5] if sys.argv[5] == "bf16" else sys.argv[5] + "-bit"
if "error" in r:
    print(f"| {sys.argv[4]} | {base} | failed: {r['error']} | | | |")
else:
    print(f"| {sys.argv[4]} | {base} | {r['tok_per_s']:,.0f} | {r['median_s']:.3f} | {r['peak_mib'] / 1024:.2f} | "
          f"{r['loss_first']:.4f} |")
PY
      done
    done
  } | tee -a "$out/cuda-results-section.md" | { if [[ -n "$results" ]]; then tee -a "$results"; else cat; fi; } >&2
fi

# where deltatune's GPU time goes (DT_CUDA_PROFILE: events around each region, warm-up step excluded;
# from the short profiled runs)
{
  for preset in $presets; do
    [[ -f "$out/cuda-dt-$preset-profile.err" ]] || continue
    echo
    echo "deltatune $preset, per-op breakdown (ms per step, share of the step; a 3-step run with DT_CUDA_PROFILE=1, without graphs):"
    echo '```'
    sed -n 's/^profile: //p' "$out/cuda-dt-$preset-profile.err"
    echo '```'
  done
} | tee -a "$out/cuda-results-section.md" | { if [[ -n "$results" ]]; then tee -a "$results"; else cat; fi; } >&2
