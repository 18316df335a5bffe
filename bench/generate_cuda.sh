#!/usr/bin/env bash
# Generation on the GPU: `deltatune generate --device cuda` against transformers' model.generate on
# the same random checkpoints and prompt (200 random token ids, 128 new tokens, greedy).
#   bench/generate_cuda.sh [build-dir] [presets...]      (default: build, 0.8b 4b)
set -euo pipefail
build=${1:-build}
shift || true
presets=${*:-0.8b 4b}
here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
ids=$(python3 -c "import random; random.seed(3); print(','.join(str(random.randrange(100, 30000)) for _ in range(200)))")
echo "| preset | deltatune prefill tok/s | deltatune decode tok/s | transformers prefill tok/s | transformers decode tok/s |"
echo "|---|---|---|---|---|"
for p in $presets; do
    "$build/deltatune" init-model --preset "$p" --out "$tmp/$p" --seed 1 --dtype bf16 --layout text --force >/dev/null
    # a failed run still gets its row ("failed"), the error in dt.err
    "$build/deltatune" generate --model "$tmp/$p" --prompt-ids "$ids" --max-new-tokens 128 --device cuda \
        >/dev/null 2>"$tmp/dt.err" || tail -1 "$tmp/dt.err" >&2
    # "generate: prefill 200 tokens at X tok/s, decode 128 tokens at Y tok/s"
    dp= dd=
    read -r dp dd < <(sed -n 's/^generate: prefill [0-9]* tokens at \([0-9.]*\) tok\/s, decode [0-9]* tokens at \([0-9.]*\) tok\/s.*/\1 \2/p' "$tmp/dt.err") || true
    hf=$(python3 "$here/hf_peer_cuda.py" generate --model "$tmp/$p" --prompt-ids "$ids" --new 128 2>/dev/null | tail -1)
    hp=$(python3 -c "import json,sys; print('%.1f' % json.loads(sys.argv[1])['prefill_tok_s'])" "$hf" 2>/dev/null || echo "failed")
    hd=$(python3 -c "import json,sys; d=json.loads(sys.argv[1]); print('%.1f (%s DeltaNet)' % (d['decode_tok_s'], d['gdn']))" "$hf" 2>/dev/null || echo "failed")
    echo "| $p | ${dp:-failed} | ${dd:-failed} | $hp | $hd |"
done
