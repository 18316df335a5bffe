#!/usr/bin/env bash
# Runs the unit tests, the gradient checks and the command-line tests of one build folder and prints
# one total line, "N passed, N failed".
set -uo pipefail
build=${1:-build}
here=$(cd "$(dirname "$0")" && pwd)
log=$(mktemp)
trap 'rm -f "$log"' EXIT

status=0
# the golden tests hold the CPU path to the reference; the GPU path has tests/cuda/
export DELTATUNE_DEVICE=cpu
"$build/deltatune_tests" | tee -a "$log" || status=1
"$build/deltatune_gradcheck" | tee -a "$log" || status=1
# built where nvcc is; it says "skipped" without a GPU
if [[ -x "$build/deltatune_test_cuda" ]]; then "$build/deltatune_test_cuda" | tee -a "$log" || status=1; fi
DT=$(cd "$build" && pwd)/deltatune "$here/cli.sh" | tee -a "$log" || status=1

passed=$(grep -Eo '^[a-z]+: [0-9]+ passed' "$log" | awk '{s+=$2} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed$' "$log" | awk '{s+=$1} END {print s+0}')
echo "$passed passed, $failed failed"
[[ $status -eq 0 && $failed -eq 0 ]]
