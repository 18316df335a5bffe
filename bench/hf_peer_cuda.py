#!/usr/bin/env python3
"""The Hugging Face side of bench/bench_cuda.sh: transformers + PEFT doing the training step that
`deltatune train --device cuda` does, on the same checkpoint and the same rows, plus the helpers
the bench needs (the card's measured bf16 matmul rate, the model FLOPs per token, the table).

    python3 bench/hf_peer_cuda.py env
    python3 bench/hf_peer_cuda.py matmul
    python3 bench/hf_peer_cuda.py peer --model DIR --data FILE.jsonl [--steps 8] [--batch-size 2] [--liger]
    python3 bench/hf_peer_cuda.py generate --model DIR --prompt-ids LIST [--new 128]
    python3 bench/hf_peer_cuda.py table --card NAME --matmul FILE --command CMD [--results FILE.md]
                                        --case PRESET MODEL_DIR DT_LOG DT_ERR HF_JSON ...

The step: LoRA r16 alpha 16, dropout 0, on the 10 default modules; gradient checkpointing
(non-reentrant); torch.optim.AdamW (lr 2e-4, weight decay 0.01) on the LoRA parameters; the global
gradient norm clipped to 1 (deltatune's default, so both do the same work); bf16 weights and
activations; loss as transformers computes it (labels = the row's labels, shifted inside).
Each step is timed between two torch.cuda.synchronize(); the medians skip the warm-up steps.
"""
import argparse
import datetime
import json
import statistics
import sys
import time

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
           "in_proj_qkv", "in_proj_z", "out_proj"]
WARMUP = 2


def text_config(model_dir):
    cfg = json.load(open(f"{model_dir}/config.json"))
    return cfg.get("text_config", cfg)


def have(module):
    try:
        __import__(module)
        return True
    except Exception:  # an installed package that fails to import counts as missing
        return False


def cmd_env(_a):
    import torch
    import transformers
    import peft
    print(f"torch {torch.__version__} (cuda {torch.version.cuda}), transformers {transformers.__version__}, "
          f"peft {peft.__version__}, device {torch.cuda.get_device_name(0)}")
    for mod in ("triton", "fla", "causal_conv1d", "liger_kernel", "flash_attn"):
        ver = "missing"
        if have(mod):
            ver = getattr(sys.modules[mod], "__version__", "present")
        print(f"  {mod}: {ver}")
    try:
        from transformers.models.qwen3_5 import modeling_qwen3_5 as m
        print("  transformers.models.qwen3_5:", ", ".join(n for n in dir(m) if n.startswith("Qwen3_5For")))
    except Exception as e:
        print(f"  transformers.models.qwen3_5: not importable ({e})")


def cmd_matmul(_a):
    """The card's bf16 rate as it runs here: one 8192^3 product, 3 warm-ups, the mean of 10."""
    import torch
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    s = start.elapsed_time(end) / 1e3 / 10
    print(json.dumps({"n": n, "seconds": s, "tflops": 2 * n ** 3 / s / 1e12,
                      "device": torch.cuda.get_device_name(0)}))


class FallbackLog:
    """Collects transformers' warnings that a kernel fell back to its reference PyTorch code
    (it says so once, when the model is built, for chunk_gated_delta_rule and causal_conv1d_fn)."""

    def __init__(self):
        import logging
        import warnings
        self.messages = []
        outer = self

        class Handler(logging.Handler):
            def emit(self, record):
                outer.add(record.getMessage())
        logging.getLogger("transformers").addHandler(Handler(level=logging.WARNING))
        shown = warnings.showwarning

        def show(message, *rest, **kw):
            outer.add(str(message))
            shown(message, *rest, **kw)
        warnings.showwarning = show

    def add(self, msg):
        if "is falling back" in msg:
            self.messages.append(msg.split(" is falling back")[0].strip("` "))
        elif "fast path" in msg:
            self.messages.append(msg[:160])


def gdn_path(model, fallbacks):
    """Which Gated DeltaNet kernels transformers picked: its torch reference code (with a warning)
    when flash-linear-attention / causal-conv1d are missing, else theirs."""
    info = {"torch_fallbacks": fallbacks}
    for m in model.modules():
        if type(m).__name__.endswith("GatedDeltaNet"):
            for attr in ("chunk_gated_delta_rule", "causal_conv1d_fn"):
                fn = getattr(m, attr, None)
                if fn is None:
                    info[attr] = None
                elif hasattr(fn, "__name__"):
                    info[attr] = f"{getattr(fn, '__module__', '?')}.{fn.__name__}"
                else:
                    info[attr] = repr(fn)[:120]
            break
    fell_back = any("delta_rule" in f for f in fallbacks)
    info["path"] = "torch" if fell_back or not have("fla") else "fla"
    return info


def cmd_peer(a):
    try:
        res = run_peer(a)
    except Exception as e:  # the bench still prints a row, with the reason
        import traceback
        traceback.print_exc()
        res = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
    print(json.dumps(res))


def run_peer(a):
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    fallbacks = FallbackLog()
    t_load = time.time()
    # the same safetensors deltatune trains (text layout: Qwen3_5ForCausalLM), read offline
    model = transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16, device_map="cuda",
                                                              local_files_only=True)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    liger = "not asked"
    if a.liger:
        try:
            from liger_kernel.transformers import _apply_liger_kernel_to_instance
            _apply_liger_kernel_to_instance(model=model, fused_linear_cross_entropy=True, cross_entropy=False)
            liger = "fused linear cross-entropy applied"
        except Exception as e:
            liger = f"not applied ({type(e).__name__}: {e})"[:200]
    cfg = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, bias="none",
                     task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_lora = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.01)
    load_s = time.time() - t_load

    rows = [json.loads(l) for l in open(a.data)]
    need = a.steps * a.batch_size
    rows = [rows[i % len(rows)] for i in range(need)]  # wraps as deltatune's --steps does
    seconds, losses = [], []
    for step in range(a.steps):
        batch = rows[step * a.batch_size:(step + 1) * a.batch_size]
        ids = torch.tensor([r["input_ids"] for r in batch], device="cuda")
        labels = torch.tensor([r["labels"] for r in batch], device="cuda")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
        losses.append(loss.item())
        print(f"hf step {step + 1}: loss {losses[-1]:.6f}  {seconds[-1]:.3f} s", file=sys.stderr)
    timed = seconds[WARMUP:] if len(seconds) > WARMUP else seconds
    med = statistics.median(timed)
    tokens = a.batch_size * len(rows[0]["input_ids"])
    return {
        "class": type(model.get_base_model()).__name__,
        "transformers": transformers.__version__, "torch": torch.__version__,
        "attn_implementation": model.get_base_model().config._attn_implementation,
        "gdn": gdn_path(model, fallbacks.messages), "liger": liger if a.liger else ("installed, not used" if have("liger_kernel")
                                                              else "not installed"),
        "lora_params": n_lora, "load_s": round(load_s, 2),
        "steps": a.steps, "tokens_per_step": tokens, "seconds": seconds, "median_s": med,
        "tok_per_s": tokens / med, "loss_first": losses[0], "losses": losses,
        "peak_alloc_mib": torch.cuda.max_memory_allocated() / 2 ** 20,
        "peak_reserved_mib": torch.cuda.max_memory_reserved() / 2 ** 20,
    }


def flops_per_token(tc, seq, rank=16):
    """Model FLOPs of one training token (what MFU counts; recomputation for checkpointing
    included since both systems must do it, anything an implementation adds beyond that not):

      6 * P_layers       the layers' linear weights (frozen, so no weight gradient):
                         2 (forward) + 2 (checkpointing's recompute) + 2 (input gradient)
      4 * V * H          the LM head: forward + input gradient (outside the checkpointed layers)
      8 * r * (in+out)   each LoRA pair: forward, recompute, input gradient, weight gradient
      4 * 2*nh*hd*T      each full-attention layer, causal (T/2 keys on average, 2*hd each for
                         QK^T and PV): forward, recompute, backward (2x)
      4 * 6*Hv*dk*dv     each Gated DeltaNet layer, the recurrent state's arithmetic per token
                         (read S^T k, rank-1 update, read S^T q): forward, recompute, backward (2x)
    The embedding lookup, norms, conv1d (2*K per channel), activations and the loss are left out
    (under 1%)."""
    H, I, V = tc["hidden_size"], tc["intermediate_size"], tc["vocab_size"]
    nh, nkv, hd = tc["num_attention_heads"], tc["num_key_value_heads"], tc["head_dim"]
    hk, dk = tc["linear_num_key_heads"], tc["linear_key_head_dim"]
    hv, dv = tc["linear_num_value_heads"], tc["linear_value_head_dim"]
    gate = 2 if tc.get("attn_output_gate", True) else 1
    mlp = {"gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}
    full = {"q_proj": (H, nh * hd * gate), "k_proj": (H, nkv * hd), "v_proj": (H, nkv * hd), "o_proj": (nh * hd, H)}
    lin = {"in_proj_qkv": (H, 2 * hk * dk + hv * dv), "in_proj_z": (H, hv * dv), "in_proj_b": (H, hv),
           "in_proj_a": (H, hv), "out_proj": (hv * dv, H)}
    types = tc.get("layer_types") or ["linear_attention"] * tc["num_hidden_layers"]
    p_layers = lora = mixer = 0
    for t in types:
        mods = dict(mlp, **(full if t == "full_attention" else lin))
        p_layers += sum(i * o for i, o in mods.values())
        lora += sum(8 * rank * (i + o) for n, (i, o) in mods.items() if n in TARGETS)
        mixer += 4 * (2 * nh * hd * seq if t == "full_attention" else 6 * hv * dk * dv)
    return 6 * p_layers + 4 * V * H + lora + mixer


def dt_result(log_path, err_path):
    """deltatune's median step over the steps after the warm-up, or why there is none."""
    try:
        steps = [json.loads(l) for l in open(log_path) if '"step"' in l]
    except OSError:
        steps = []
    if not steps:
        msg = ""
        try:
            lines = [l.strip() for l in open(err_path) if l.strip()]
            msg = lines[-1] if lines else ""
        except OSError:
            pass
        return {"error": msg or "no train_log.jsonl"}
    timed = steps[WARMUP:] if len(steps) > WARMUP else steps
    med = statistics.median(s["seconds"] for s in timed)
    return {"median_s": med, "tok_per_s": timed[0]["input_tokens"] / med, "loss_first": steps[0]["loss"],
            "peak_mib": max(s["peak_mem_mb"] for s in steps), "steps": len(steps)}


def cmd_table(a):
    mm = json.load(open(a.matmul))
    rate = mm["tflops"] * 1e12
    lines = ["| model | system | tokens/s | s/step | peak GiB | deltatune/HF | MFU | step-1 loss |",
             "|---|---|---|---|---|---|---|---|"]
    notes = []
    for preset, model_dir, dt_log, dt_err, hf_json in a.case:
        tc = text_config(model_dir)
        dt = dt_result(dt_log, dt_err)
        try:
            hf = json.loads([l for l in open(hf_json) if l.startswith("{")][-1])
        except (OSError, IndexError, ValueError) as e:
            hf = {"error": f"no result ({e})"}
        fpt = flops_per_token(tc, a.seq)

        def row(name, r, other=None):
            if "error" in r:
                return f"| {preset} | {name} | failed | | | | | |"
            peak = r.get("peak_mib", r.get("peak_alloc_mib"))
            ratio = f"{r['tok_per_s'] / other['tok_per_s']:.2f}x" if other and "error" not in other else ""
            mfu = r["tok_per_s"] * fpt / rate
            return (f"| {preset} | {name} | {r['tok_per_s']:,.0f} | {r['median_s']:.3f} | {peak / 1024:.2f} | "
                    f"{ratio} | {100 * mfu:.1f}% | {r['loss_first']:.4f} |")
        lines.append(row("deltatune --device cuda", dt, hf))
        hf_name = "transformers + PEFT"
        if "error" not in hf:
            g = hf["gdn"]
            hf_name += f" ({g.get('path', '?')} GDN" + \
                       (", Liger FLCE" if hf["liger"].startswith("fused") else "") + ")"
            notes.append(f"- {preset}: transformers {hf['transformers']}, torch {hf['torch']}, {hf['class']}, "
                         f"attention {hf['attn_implementation']}, Gated DeltaNet path: {g.get('path')} (reference "
                         f"PyTorch code for: {', '.join(g.get('torch_fallbacks') or ['nothing'])}), "
                         f"Liger: {hf['liger']}; {hf['lora_params']:,} LoRA "
                         f"parameters; HF peak reserved {hf['peak_reserved_mib'] / 1024:.2f} GiB.")
        else:
            notes.append(f"- {preset}: the transformers run failed: {hf['error']}")
        if "error" in dt:
            notes.append(f"- {preset}: deltatune's run failed: {dt['error']}")
        lines.append(row(hf_name, hf))
        notes.append(f"- {preset}: {fpt / 1e9:.2f} GFLOP per trained token (formula in bench/hf_peer_cuda.py).")
    card = a.card
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    section = [f"## CUDA LoRA training against transformers + PEFT, {date}", "",
               f"`{a.command}` on {card} (bf16 matmul measured at {mm['tflops']:.0f} TFLOP/s: one 8192^3 "
               f"product, the MFU denominator). Random BF16 checkpoints from `deltatune init-model --layout text`, "
               f"both systems load the same safetensors; batch 2 x {a.seq} random tokens; LoRA r16 alpha 16 on the "
               f"10 default modules, gradient checkpointing, AdamW lr 2e-4, grad-accum 1, gradient norm clipped to 1. "
               f"Median step over the steps after {WARMUP} warm-ups; peak is deltatune's GPU peak and torch's "
               f"max_memory_allocated (weights included). Step-1 losses should agree (LoRA B starts at zero).",
               "", *lines, "", *notes, ""]
    text = "\n".join(section)
    print(text)
    if a.results:
        with open(a.results, "a") as f:
            f.write("\n" + text)


def cmd_generate(a):
    """transformers' model.generate on the same checkpoint and prompt ids (bench/generate_cuda.sh):
    greedy, exactly a.new tokens, after a warm-up run; the prefill timed alone as one forward."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16, device_map="cuda",
                                                              local_files_only=True)
    ids = torch.tensor([[int(x) for x in a.prompt_ids.split(",")]], device="cuda")
    kw = dict(max_new_tokens=a.new, min_new_tokens=a.new, do_sample=False)
    with torch.no_grad():
        model.generate(ids, **kw)
        torch.cuda.synchronize()
        t0 = time.time()
        model(ids)
        torch.cuda.synchronize()
        t1 = time.time()
        model.generate(ids, **kw)
        torch.cuda.synchronize()
        t2 = time.time()
    prefill, total = t1 - t0, t2 - t1
    print(json.dumps({"prefill_tok_s": ids.shape[1] / prefill, "decode_tok_s": a.new / max(total - prefill, 1e-9),
                      "gdn": "fla" if have("fla") else "torch"}))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("env")
    sub.add_parser("matmul")
    p = sub.add_parser("peer")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--liger", action="store_true", help="Liger's fused linear cross-entropy, if installed")
    p = sub.add_parser("generate")
    p.add_argument("--model", required=True)
    p.add_argument("--prompt-ids", required=True)
    p.add_argument("--new", type=int, default=128)
    t = sub.add_parser("table")
    t.add_argument("--card", required=True)
    t.add_argument("--matmul", required=True)
    t.add_argument("--command", required=True)
    t.add_argument("--seq", type=int, default=2048)
    t.add_argument("--results", help="append the section to this Markdown file")
    t.add_argument("--case", nargs=5, action="append", required=True,
                   metavar=("PRESET", "MODEL_DIR", "DT_LOG", "DT_ERR", "HF_JSON"))
    a = ap.parse_args()
    {"env": cmd_env, "matmul": cmd_matmul, "peer": cmd_peer, "generate": cmd_generate, "table": cmd_table}[a.cmd](a)


if __name__ == "__main__":
    main()
