#!/usr/bin/env bash
# Where one CUDA training step's time goes, kernel by kernel: runs one `deltatune train --device
# cuda` step (batch 2 x 2048 random tokens, r16, checkpointing, as bench_cuda.sh) under Nsight
# Compute, reading only each kernel's duration, and prints the time per kernel name (summed over
# the step, largest first), with each name's share and launch count. Complements the per-region
# breakdown of bench_cuda.sh (DT_CUDA_PROFILE), which cannot see inside cuBLAS or split a region.
#   bench/profile_cuda.sh [build-dir] [preset]     (defaults: build, 0.8b)
#   env: PROFILE_DETAIL=regex  also writes ncu's full sections for the first launches of the
#        kernels whose names match (PROFILE_DETAIL_COUNT, 8, after skipping PROFILE_DETAIL_SKIP, 0)
#        to bench/out/profile-detail-PRESET.txt
# Kernel replay under ncu serialises the kernels: the durations are each kernel alone, and their
# sum runs a little over the step's time in bench_cuda.sh.
set -euo pipefail
build=${1:-build}
preset=${2:-0.8b}
here=$(cd "$(dirname "$0")" && pwd)
dt="$build/deltatune"
out="$here/out"
mkdir -p "$out"
[[ -x "$dt" ]] || { echo "profile-cuda: $dt not found (build first)" >&2; exit 1; }
command -v ncu >/dev/null || { echo "profile-cuda: ncu (Nsight Compute) is not on the PATH" >&2; exit 1; }

model="$out/qwen35-$preset-bf16-text"
if [[ ! -f "$model/model.safetensors" ]]; then
  "$dt" init-model --preset "$preset" --out "$model" --seed 1 --dtype bf16 --layout text --force 2>"$out/profile-$preset.err" \
      || { echo "profile-cuda: init-model --preset $preset failed: $(head -n 1 "$out/profile-$preset.err")" >&2; exit 1; }
fi
vocab=$(python3 -c 'import json,sys; c=json.load(open(sys.argv[1])); print(c.get("text_config", c)["vocab_size"])' \
        "$model/config.json")
data="$out/tokens-2-x-2048.jsonl"
python3 "$here/random_tokens.py" "$data" 2 2048 "$vocab"
train=("$dt" train --device cuda --model "$model" --data "$data" --out "$out/profile-train-$preset" --batch-size 2
       --grad-accum 1 --steps 1 --max-seq-len 2048 --no-shuffle)

csv="$out/profile-$preset.csv"
ncu --clock-control none --metrics gpu__time_duration.sum --csv --page raw "${train[@]}" >"$csv" 2>"$out/profile-$preset.err" \
    && grep -q '"Kernel Name"' "$csv" \
    || { echo "profile-cuda: the profiled step failed or recorded no kernels; see $out/profile-$preset.err" >&2; exit 1; }
python3 - "$csv" "$preset" <<'PY'
import collections, csv, sys
rows = list(csv.reader(open(sys.argv[1])))
rows = rows[next(i for i, r in enumerate(rows) if "Kernel Name" in r):]  # after the program's own output
head = rows[0]
name, dur = head.index("Kernel Name"), head.index("gpu__time_duration.sum")
unit = rows[1][dur]  # the units row
scale = {"nsecond": 1e-6, "ns": 1e-6, "usecond": 1e-3, "us": 1e-3, "msecond": 1.0, "ms": 1.0}[unit]
tot, cnt = collections.Counter(), collections.Counter()
for r in rows[2:]:
    k = r[name].removeprefix("void ").removeprefix("<unnamed>::")
    k = k.split("(")[0].split("<")[0].strip() or r[name]  # templates' instances summed
    tot[k] += float(r[dur].replace(",", "")) * scale
    cnt[k] += 1
step = sum(tot.values())
print(f"{sys.argv[2]}: {sum(cnt.values())} kernels, {step:.2f} ms summed (one step, each kernel alone)")
for k, t in tot.most_common():
    print(f"{t:9.3f} ms {100 * t / step:5.1f}% {cnt[k]:6d}x  {k}")
PY

if [[ -n "${PROFILE_DETAIL:-}" ]]; then
  ncu --clock-control none -k "regex:$PROFILE_DETAIL" --launch-skip "${PROFILE_DETAIL_SKIP:-0}" \
      --launch-count "${PROFILE_DETAIL_COUNT:-8}" \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
      --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
      "${train[@]}" >"$out/profile-detail-$preset.txt" 2>&1
  echo "profile-cuda: details in $out/profile-detail-$preset.txt"
fi
