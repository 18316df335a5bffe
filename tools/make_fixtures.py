#!/usr/bin/env python3
"""Reference fixtures for deltatune's golden tests.

    python3 tools/make_fixtures.py --out tests/fixtures     # needs torch, transformers >= 5.2, peft
    python3 tools/make_fixtures.py --verify tests/fixtures  # plain Python: checks the files only

Builds tiny random Qwen3.5 checkpoints with transformers, moves every weight away from its
initial value, saves them with save_pretrained, and writes the expected logits and losses of a
few pre-tokenized rows. The reference runs on the CPU (pure-torch Gated DeltaNet path) in
float64, each row alone (batch of 1, no padding). An independent float64 implementation of the
forward, written from qwen35.md (the shared docs) and reading only the saved files, is checked against
transformers for every row.

More cases: train_tied (a LoRA training run on text_tied with an explicit float64 loop, the
specification of deltatune's trainer: steps, losses, lrs, gradient norms, the trained adapter),
optim (learning-rate schedules, AdamW and clip_grad_norm_ reference values) and generate
(transformers' greedy continuations on text_tied, base and + adapter, with margin-checked
choices). --only builds a subset. See tools/README.md for the cases and the file formats.
"""

import argparse
import json
import math
import os
import shutil
import struct
import sys
import traceback

CASES = ("text_tied", "mm_untied_sharded", "text_bf16")  # checkpoints with expected logits
ALL_CASES = CASES + ("train_tied", "optim", "generate")  # + a training run on text_tied,
# optimiser pieces, greedy generation on text_tied (base and adapter)
DEFAULT_FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                "fixtures")
ROW_LENGTHS = (1, 7, 63, 64, 65, 130)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                "in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj"]
LORA_R, LORA_ALPHA = 4, 8
# HF computes some parts in fp32 even in a float64 model (RMSNorm, GDN kernel, RoPE angles, loss),
# so transformers and the float64 spec implementation agree to about 1e-6, not 1e-12.
SPEC_TOL = 1e-4
LOSS_TOL = 1e-5

problems = []


def problem(msg):
    print("PROBLEM: " + msg, flush=True)
    problems.append(msg)


# --------------------------------------------------------------------------------------------
# case definitions
# --------------------------------------------------------------------------------------------

def text_fields(vocab, tie, layer_types, hk, hv, intermediate):
    return dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=intermediate,
        num_hidden_layers=len(layer_types), layer_types=list(layer_types),
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        linear_num_key_heads=hk, linear_num_value_heads=hv,
        linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
        hidden_act="silu", rms_norm_eps=1e-6, max_position_embeddings=4096,
        attention_bias=False, attention_dropout=0.0, tie_word_embeddings=tie,
        rope_parameters={"rope_type": "default", "rope_theta": 10000000,
                         "partial_rotary_factor": 0.25, "mrope_interleaved": True,
                         "mrope_section": [2, 1, 1]},
    )


L, F = "linear_attention", "full_attention"
CASE_DEFS = {
    "text_tied": dict(seed=1001, layout="text", dtype="f32",
                      text=text_fields(384, True, [L, L, L, F], 2, 4, 128), adapter=True),
    "mm_untied_sharded": dict(seed=2002, layout="mm", dtype="f32",
                              text=text_fields(384, False, [L, L, L, F, L, L, L, F], 2, 2, 96),
                              adapter=False),
    "text_bf16": dict(seed=3003, layout="text", dtype="bf16",
                      text=text_fields(320, False, [L, L, L, F], 2, 4, 128), adapter=False),
}
VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3,
              patch_size=4, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
              num_position_embeddings=16)


def make_rows(vocab, seed):
    """Six rows around the 64-token chunk boundary; masks: none, leading prompt, sparse, hole."""
    import torch
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i, n in enumerate(ROW_LENGTHS):
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        if i == 5:
            ids[0], ids[-1] = 0, vocab - 1  # extreme ids
        labels = list(ids)
        if i == 2:
            labels[:20] = [-100] * 20  # masked prompt
        elif i == 4:
            keep = {10, 40, n - 1}  # all -100 except three targets
            labels = [ids[t] if t in keep else -100 for t in range(n)]
        elif i == 5:
            labels[:50] = [-100] * 50  # masked prompt ...
            labels[90:100] = [-100] * 10  # ... and a masked hole (a second user turn)
        rows.append({"input_ids": ids, "labels": labels})
    return rows


# --------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------

def new_value(name, shape, g):
    import torch
    f64 = torch.float64

    def normal(std, mean=0.0):
        return torch.randn(shape, generator=g, dtype=f64) * std + mean

    if ".visual." in name or name.startswith("model.visual"):
        return normal(0.05)
    if name.endswith("linear_attn.norm.weight"):  # plain-w gated RMSNorm, init 1
        return normal(0.1, 1.0)
    if name.endswith("A_log"):  # A = exp(A_log) log-uniform in [0.05, 2]
        lo, hi = math.log(0.05), math.log(2.0)
        return torch.rand(shape, generator=g, dtype=f64) * (hi - lo) + lo
    if name.endswith("dt_bias"):
        return normal(0.5, -1.0)
    if name.endswith("conv1d.weight"):
        return normal(0.4)
    if name.endswith("norm.weight"):  # (1 + w) RMSNorms, init 0
        return normal(0.1)
    if "embed_tokens" in name or name.startswith("lm_head"):
        return normal(0.2)
    if len(shape) == 2:
        return normal(0.08)
    raise ValueError("no rule for parameter %s %s" % (name, tuple(shape)))


def perturb(model, seed):
    import torch
    g = torch.Generator().manual_seed(seed)
    names = []
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            p.copy_(new_value(name, p.shape, g).to(p.dtype))
            names.append(name)
    return names


# --------------------------------------------------------------------------------------------
# independent float64 forward, from qwen35.md (the shared docs), reading only the saved files
# --------------------------------------------------------------------------------------------

def load_tensors(case_dir):
    from safetensors.torch import load_file
    idx = os.path.join(case_dir, "model.safetensors.index.json")
    if os.path.exists(idx):
        with open(idx) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    else:
        shards = ["model.safetensors"]
    out = {}
    for s in shards:
        out.update(load_file(os.path.join(case_dir, s)))
    return out


def spec_forward(T, cfg, ids, lora=None, dtype=None):
    """T: name -> tensor (any dtype, converted here); cfg: text config dict; ids: list of ints.
    lora: module name -> (A, B, scale). Returns logits [len, vocab] computed in `dtype`
    (float64 by default; float32 emulates a plain fp32 implementation)."""
    import torch
    import torch.nn.functional as Fn
    f64 = dtype or torch.float64
    pre = "model.language_model." if "model.language_model.embed_tokens.weight" in T else "model."
    eps = cfg["rms_norm_eps"]

    def W(name):
        return T[name].to(f64)

    def lin(x, mod):
        y = x @ W(mod + ".weight").T
        if lora and mod in lora:
            A, B, s = lora[mod]
            y = y + s * ((x @ A.to(f64).T) @ B.to(f64).T)
        return y

    def rms1p(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * (1.0 + w)

    n = len(ids)
    E = W(pre + "embed_tokens.weight")
    h = E[torch.tensor(ids)]
    H = cfg["hidden_size"]
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    Hk, Hv = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
    Dk, Dv = cfg["linear_key_head_dim"], cfg["linear_value_head_dim"]
    K = cfg["linear_conv_kernel_dim"]
    rp = cfg.get("rope_parameters") or {}
    rot = int(hd * rp.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.25)))
    half = rot // 2
    theta = float(rp.get("rope_theta", cfg.get("rope_theta", 10000000)))
    inv = theta ** (-torch.arange(0, rot, 2, dtype=f64) / rot)
    ang = torch.arange(n, dtype=f64)[:, None] * inv[None, :]  # [n, half]
    cos, sin = torch.cos(ang)[:, None, :], torch.sin(ang)[:, None, :]

    def rope(x):  # x [n, heads, hd], NeoX half split on the first `rot` dims
        x1, x2 = x[..., :half], x[..., half:rot]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., rot:]], -1)

    for l, typ in enumerate(cfg["layer_types"]):
        p = "%slayers.%d." % (pre, l)
        x = rms1p(h, W(p + "input_layernorm.weight"))
        if typ == "linear_attention":
            m = p + "linear_attn."
            kd, vd = Hk * Dk, Hv * Dv
            mixed = lin(x, m + "in_proj_qkv")  # [n, 2kd+vd]
            z = lin(x, m + "in_proj_z").view(n, Hv, Dv)
            b = lin(x, m + "in_proj_b")
            a = lin(x, m + "in_proj_a")
            cw = W(m + "conv1d.weight")[:, 0, :]  # [C, K]
            padded = torch.cat([torch.zeros(K - 1, mixed.shape[1], dtype=f64), mixed], 0)
            u = sum(cw[:, j][None, :] * padded[j:j + n] for j in range(K))
            y = u * torch.sigmoid(u)
            q = y[:, :kd].reshape(n, Hk, Dk)
            k = y[:, kd:2 * kd].reshape(n, Hk, Dk)
            v = y[:, 2 * kd:].reshape(n, Hv, Dv)
            q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6) * Dk ** -0.5
            k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
            rep = Hv // Hk
            q, k = q.repeat_interleave(rep, 1), k.repeat_interleave(rep, 1)  # value head j -> key head j // rep
            beta = torch.sigmoid(b)
            gdecay = -torch.exp(W(m + "A_log")) * Fn.softplus(a + W(m + "dt_bias"))
            S = torch.zeros(Hv, Dk, Dv, dtype=f64)
            o = torch.zeros(n, Hv, Dv, dtype=f64)
            for t in range(n):
                S = S * torch.exp(gdecay[t])[:, None, None]
                kv = torch.einsum("hkv,hk->hv", S, k[t])
                delta = beta[t][:, None] * (v[t] - kv)
                S = S + k[t][:, :, None] * delta[:, None, :]
                o[t] = torch.einsum("hkv,hk->hv", S, q[t])
            o = o / torch.sqrt((o * o).mean(-1, keepdim=True) + eps) * W(m + "norm.weight")
            o = o * (z * torch.sigmoid(z))
            h = h + lin(o.reshape(n, Hv * Dv), m + "out_proj")
        else:
            m = p + "self_attn."
            qg = lin(x, m + "q_proj").view(n, nh, 2 * hd)
            q, gate = qg[..., :hd], qg[..., hd:].reshape(n, nh * hd)
            k = lin(x, m + "k_proj").view(n, nkv, hd)
            v = lin(x, m + "v_proj").view(n, nkv, hd)
            q = rope(rms1p(q, W(m + "q_norm.weight")))
            k = rope(rms1p(k, W(m + "k_norm.weight")))
            mask = torch.triu(torch.ones(n, n, dtype=torch.bool), 1)
            outs = []
            for hh in range(nh):
                kvh = hh // (nh // nkv)
                sc = (q[:, hh] @ k[:, kvh].T) * hd ** -0.5
                sc = sc.masked_fill(mask, float("-inf"))
                outs.append(torch.softmax(sc, -1) @ v[:, kvh])
            att = torch.stack(outs, 1).reshape(n, nh * hd) * torch.sigmoid(gate)
            h = h + lin(att, m + "o_proj")
        x = rms1p(h, W(p + "post_attention_layernorm.weight"))
        gp = lin(x, p + "mlp.gate_proj")
        h = h + lin(gp * torch.sigmoid(gp) * lin(x, p + "mlp.up_proj"), p + "mlp.down_proj")
    h = rms1p(h, W(pre + "norm.weight"))
    out = W("lm_head.weight") if "lm_head.weight" in T else E
    return h @ out.T


# --------------------------------------------------------------------------------------------
# reference evaluation
# --------------------------------------------------------------------------------------------

def row_losses(logits, labels):
    import torch
    lp = torch.log_softmax(logits.to(torch.float64), -1)
    s, c = 0.0, 0
    for t in range(len(labels) - 1):
        y = labels[t + 1]
        if y != -100:
            s += -lp[t, y].item()
            c += 1
    return s, c


def evaluate(tag, model, rows, tensors, cfg, lora=None):
    """HF logits of each row alone, checked against HF's own loss and the spec forward."""
    import torch
    logits_all, sums, counts = [], [], []
    hf_checked = 0
    max_spec = 0.0
    for i, r in enumerate(rows):
        ids = torch.tensor([r["input_ids"]])
        with torch.no_grad():
            out = model(input_ids=ids, labels=torch.tensor([r["labels"]]), use_cache=False)
        lg = out.logits[0].to(torch.float64)
        if lg.shape != (len(r["input_ids"]), cfg["vocab_size"]):
            problem("%s row %d: logits shape %s" % (tag, i, tuple(lg.shape)))
        s, c = row_losses(lg, r["labels"])
        if c:
            hf = out.loss.item()
            mine = s / c
            if abs(hf - mine) > LOSS_TOL * max(1.0, abs(mine)):
                problem("%s row %d: HF loss %.10f != %.10f" % (tag, i, hf, mine))
            hf_checked += 1
        ref = spec_forward(tensors, cfg, r["input_ids"], lora)
        d = (ref - lg).abs().max().item()
        max_spec = max(max_spec, d)
        if d > SPEC_TOL:
            problem("%s row %d: spec forward differs from transformers by %.3g" % (tag, i, d))
        logits_all.append(lg)
        sums.append(s)
        counts.append(c)
    tokens = sum(counts)
    loss = sum(sums) / tokens
    print("  %s: loss %.6f over %d tokens (ln V = %.4f); HF loss agrees on %d rows; "
          "spec forward max |diff| %.3g" % (tag, loss, tokens, math.log(cfg["vocab_size"]),
                                           hf_checked, max_spec), flush=True)
    return logits_all, sums, counts, max_spec


def write_expected(case_dir, stem, logits_all, sums, counts, extra=None):
    import torch
    import transformers
    from safetensors.torch import save_file
    tokens = sum(counts)
    exp = {"loss": sum(sums) / tokens, "tokens": tokens, "row_loss_sum": sums,
           "row_tokens": counts, "transformers_version": transformers.__version__,
           "torch_version": torch.__version__}
    if extra:
        exp.update(extra)
    with open(os.path.join(case_dir, "expected%s.json" % stem), "w") as f:
        json.dump(exp, f, indent=1)
        f.write("\n")
    save_file({"logits.%d" % i: t.to(torch.float32).contiguous() for i, t in enumerate(logits_all)},
              os.path.join(case_dir, "expected%s_logits.safetensors" % stem),
              metadata={"format": "pt"})
    return exp


def check_loaded_equals_files(tag, model, tensors, skip_prefixes=("mtp.",)):
    """Every tensor of the files is what the model holds, upcast exactly."""
    import torch
    sd = model.state_dict()
    for name, t in tensors.items():
        if name.startswith(skip_prefixes):
            if name in sd:
                problem("%s: %s was loaded" % (tag, name))
            continue
        if name not in sd:
            problem("%s: file tensor %s not in the model" % (tag, name))
            continue
        if not torch.equal(sd[name].to(torch.float64), t.to(torch.float64)):
            problem("%s: %s differs after loading" % (tag, name))


# --------------------------------------------------------------------------------------------
# building one case
# --------------------------------------------------------------------------------------------

def build_case(name, out_root, manifest):
    import torch
    from transformers import (Qwen3_5Config, Qwen3_5ForCausalLM, Qwen3_5ForConditionalGeneration,
                              Qwen3_5TextConfig)
    d = CASE_DEFS[name]
    case_dir = os.path.join(out_root, name)
    shutil.rmtree(case_dir, ignore_errors=True)
    os.makedirs(case_dir)
    torch.manual_seed(d["seed"])
    print("== %s" % name, flush=True)

    if d["layout"] == "text":
        cls = Qwen3_5ForCausalLM
        config = Qwen3_5TextConfig(**d["text"])
    else:
        cls = Qwen3_5ForConditionalGeneration
        config = Qwen3_5Config(text_config=dict(d["text"]), vision_config=dict(VISION),
                               tie_word_embeddings=d["text"]["tie_word_embeddings"])
    model = cls(config).to(torch.float32)
    names = perturb(model, d["seed"])
    tie = d["text"]["tie_word_embeddings"]
    if tie and model.get_output_embeddings().weight.data_ptr() != \
            model.get_input_embeddings().weight.data_ptr():
        problem("%s: lm_head is not tied to embed_tokens in memory" % name)
    print("  %d parameters perturbed" % len(names), flush=True)

    if d["dtype"] == "bf16":
        a_logs = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("A_log")}
        model = model.to(torch.bfloat16)
        for n, p in model.named_parameters():
            if n in a_logs:
                p.data = a_logs[n]  # official files keep A_log in F32
    if d["layout"] == "mm":
        model.save_pretrained(case_dir, max_shard_size="500KB")
    else:
        model.save_pretrained(case_dir)

    # config.json: make the bf16 case say bfloat16 like the official files
    cfg_path = os.path.join(case_dir, "config.json")
    with open(cfg_path) as f:
        cfg_json = json.load(f)
    if d["dtype"] == "bf16":
        if cfg_json.get("dtype") != "bfloat16":
            print("  config.json dtype was %r; set to bfloat16" % cfg_json.get("dtype"))
            cfg_json["dtype"] = "bfloat16"
            with open(cfg_path, "w") as f:
                json.dump(cfg_json, f, indent=2, sort_keys=True)
                f.write("\n")

    # MTP tensors, as official checkpoints carry them, into the last shard and the index
    idx_path = os.path.join(case_dir, "model.safetensors.index.json")
    if d["layout"] == "mm":
        from safetensors.torch import load_file, save_file
        with open(idx_path) as f:
            index = json.load(f)
        shards = sorted(set(index["weight_map"].values()))
        if len(shards) < 2:
            problem("%s: only %d shard(s)" % (name, len(shards)))
        last = os.path.join(case_dir, shards[-1])
        content = load_file(last)
        H = d["text"]["hidden_size"]
        g = torch.Generator().manual_seed(d["seed"] + 7)
        mtp = {"mtp.fc.weight": (H, 2 * H), "mtp.norm.weight": (H,),
               "mtp.pre_fc_norm_embedding.weight": (H,), "mtp.pre_fc_norm_hidden.weight": (H,),
               "mtp.layers.0.input_layernorm.weight": (H,)}
        for k, shp in mtp.items():
            content[k] = (torch.randn(shp, generator=g) * 0.05).to(torch.float32)
            index["weight_map"][k] = shards[-1]
            index["metadata"]["total_size"] = index["metadata"].get("total_size", 0) + \
                content[k].numel() * 4
            if "total_parameters" in index["metadata"]:
                index["metadata"]["total_parameters"] += content[k].numel()
        save_file(content, last, metadata={"format": "pt"})
        index["weight_map"] = dict(sorted(index["weight_map"].items()))
        with open(idx_path, "w") as f:
            json.dump(index, f, indent=2)
            f.write("\n")

    # the saved files, as a loader sees them
    tensors = load_tensors(case_dir)
    dtypes = {}
    for k, t in tensors.items():
        dtypes.setdefault(str(t.dtype).replace("torch.", ""), []).append(k)
    print("  saved: %d tensors, dtypes %s" % (len(tensors), {k: len(v) for k, v in dtypes.items()}))
    if tie and "lm_head.weight" in tensors:
        problem("%s: tied checkpoint holds lm_head.weight" % name)
    if not tie and "lm_head.weight" not in tensors:
        problem("%s: untied checkpoint lacks lm_head.weight" % name)
    if d["dtype"] == "bf16":
        for k, t in tensors.items():
            want = torch.float32 if k.endswith("A_log") else torch.bfloat16
            if t.dtype != want:
                problem("%s: %s saved as %s" % (name, k, t.dtype))
    else:
        for k, t in tensors.items():
            if t.dtype != torch.float32:
                problem("%s: %s saved as %s" % (name, k, t.dtype))
    if d["layout"] == "mm" and not any(k.startswith("model.visual.") for k in tensors):
        problem("%s: no model.visual.* tensors" % name)
    want_prefix = "model.language_model." if d["layout"] == "mm" else "model.layers."
    if not any(k.startswith(want_prefix) for k in tensors):
        problem("%s: no tensor starts with %s" % (name, want_prefix))

    # reload in float64 from the files: the reference uses exactly what was saved
    ref, info = cls.from_pretrained(case_dir, dtype=torch.float64, output_loading_info=True)
    ref.eval()
    print("  loading info: %s" % str(info)[:400], flush=True)
    if info.get("missing_keys"):
        problem("%s: missing keys on reload %s" % (name, sorted(info["missing_keys"])[:5]))
    check_loaded_equals_files(name, ref, tensors)
    print("  attn implementation: %s" % getattr(ref.config, "_attn_implementation", None))

    text_cfg = cfg_json.get("text_config", cfg_json)
    rows = make_rows(d["text"]["vocab_size"], d["seed"] + 1)
    with open(os.path.join(case_dir, "data.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r, separators=(",", ":")) + "\n")
    logits, sums, counts, spec_diff = evaluate(name, ref, rows, tensors, text_cfg)
    exp = write_expected(case_dir, "", logits, sums, counts)
    if abs(exp["loss"] - math.log(text_cfg["vocab_size"])) < 0.25:
        problem("%s: loss %.4f too close to ln(vocab)" % (name, exp["loss"]))

    entry = {
        "class": cls.__name__, "seed": d["seed"], "weights_dtype": d["dtype"],
        "tie_word_embeddings": tie, "text_config": {k: v for k, v in d["text"].items()},
        "files": sorted(os.listdir(case_dir)), "row_lengths": [len(r["input_ids"]) for r in rows],
        "loss": exp["loss"], "tokens": exp["tokens"], "spec_forward_max_abs_diff": spec_diff,
        "n_tensors": len(tensors),
    }
    if d["layout"] == "mm":
        entry["vision_config"] = dict(VISION)
        entry["mtp_tensors_added"] = sorted(k for k in tensors if k.startswith("mtp."))

    if d["adapter"]:
        entry["adapter"] = build_adapter(name, model, case_dir, cls, rows, text_cfg, tensors, exp)
        entry["files"] = sorted(os.listdir(case_dir))
    manifest["cases"][name] = entry


def canonical_adapter_config(path):
    """PEFT writes target_modules from a set (order varies with the string hash seed): sort it."""
    with open(path) as f:
        cfg = json.load(f)
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def build_adapter(name, model, case_dir, cls, rows, text_cfg, tensors, base_exp):
    import peft
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file
    d = CASE_DEFS[name]
    ad_dir = os.path.join(case_dir, "adapter")
    lcfg = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                      target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM", bias="none")
    pm = get_peft_model(model, lcfg)
    g = torch.Generator().manual_seed(d["seed"] + 100)
    n_lora = 0
    with torch.no_grad():
        for n, p in sorted(pm.named_parameters(), key=lambda kv: kv[0]):
            if ".lora_A." in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.1)
                n_lora += 1
            elif ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.05)
                n_lora += 1
    pm.peft_config["default"].base_model_name_or_path = ".."
    pm.save_pretrained(ad_dir)
    for extra in os.listdir(ad_dir):
        if extra not in ("adapter_config.json", "adapter_model.safetensors"):
            os.remove(os.path.join(ad_dir, extra))  # PEFT's README.md model card
    canonical_adapter_config(os.path.join(ad_dir, "adapter_config.json"))
    ad = load_file(os.path.join(ad_dir, "adapter_model.safetensors"))
    print("  adapter: %d lora tensors in memory, %d in the file (%s)" % (
        n_lora, len(ad), sorted({str(t.dtype) for t in ad.values()})), flush=True)
    if len(ad) != n_lora or any(t.dtype != torch.float32 for t in ad.values()):
        problem("%s adapter: %d tensors saved, %d expected, dtypes %s" % (
            name, len(ad), n_lora, sorted({str(t.dtype) for t in ad.values()})))
    for k in ad:
        if not k.startswith("base_model.model.model.layers."):
            problem("%s adapter: unexpected key %s" % (name, k))

    base = cls.from_pretrained(case_dir, dtype=torch.float64)
    pref = PeftModel.from_pretrained(base, ad_dir)
    pref = pref.double().eval()
    scale = LORA_ALPHA / LORA_R
    lora = {}
    for k, t in ad.items():
        if k.endswith(".lora_A.weight"):
            mod = k[len("base_model.model."):-len(".lora_A.weight")]
            lora[mod] = (t, ad[k.replace(".lora_A.", ".lora_B.")], scale)
    logits, sums, counts, spec_diff = evaluate(name + "+adapter", pref, rows, tensors, text_cfg, lora)
    exp = write_expected(case_dir, "_adapter", logits, sums, counts,
                         {"peft_version": peft.__version__})
    if abs(exp["loss"] - base_exp["loss"]) < 0.02:
        problem("%s: the adapter barely changes the loss (%.5f vs %.5f)" % (
            name, exp["loss"], base_exp["loss"]))
    with open(os.path.join(ad_dir, "adapter_config.json")) as f:
        acfg = json.load(f)
    return {"r": LORA_R, "lora_alpha": LORA_ALPHA, "scaling": scale,
            "target_modules": acfg.get("target_modules"), "n_modules": len(lora),
            "loss": exp["loss"], "tokens": exp["tokens"], "peft_version": peft.__version__,
            "spec_forward_max_abs_diff": spec_diff}


# --------------------------------------------------------------------------------------------
# train_tied: a LoRA training run on text_tied, the specification of the C trainer
# --------------------------------------------------------------------------------------------

TRAIN_SEED = 4004
TRAIN_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                 "in_proj_qkv", "in_proj_z", "out_proj"]  # deltatune's ten default targets
TRAIN_CFG = dict(r=4, lora_alpha=8, lora_dropout=0.0, batch_size=2, grad_accum=2, epochs=2,
                 lr=1e-3, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.01, schedule="linear",
                 warmup_steps=1, max_grad_norm=None, init_A_std=0.1, init_B_std=0.05)


def train_plan(n_rows, batch_size, grad_accum, epochs):
    """Rows in file order, the same order every epoch. A micro-batch is batch_size consecutive
    rows, an optimiser step is grad_accum consecutive micro-batches; the last micro-batch and the
    last step of an epoch take what is left. Returns [(epoch, [micro-batch row lists])]."""
    mbs = [list(range(i, min(i + batch_size, n_rows))) for i in range(0, n_rows, batch_size)]
    per_epoch = [mbs[i:i + grad_accum] for i in range(0, len(mbs), grad_accum)]
    return [(e, s) for e in range(epochs) for s in per_epoch]


def row_targets(labels):
    return sum(1 for t in range(len(labels) - 1) if labels[t + 1] != -100)


def lora_params(pm):
    """name in the file (adapter name removed) -> Parameter, sorted by name."""
    out = {}
    for n, p in pm.named_parameters():
        if ".lora_A." in n or ".lora_B." in n:
            out[n.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")] = p
    return dict(sorted(out.items()))


def save_adapter_f32(pm, ad_dir, base_rel):
    """save_pretrained with the LoRA tensors as F32 (the training copy stays float64)."""
    import torch
    params = lora_params(pm)
    keep = {k: p.data for k, p in params.items()}
    for p in params.values():
        p.data = p.data.to(torch.float32)
    pm.peft_config["default"].base_model_name_or_path = base_rel
    try:
        pm.save_pretrained(ad_dir)
    finally:
        for k, p in params.items():
            p.data = keep[k]
    for extra in os.listdir(ad_dir):
        if extra not in ("adapter_config.json", "adapter_model.safetensors"):
            os.remove(os.path.join(ad_dir, extra))  # PEFT's README.md model card
    canonical_adapter_config(os.path.join(ad_dir, "adapter_config.json"))


def versions():
    import torch
    import transformers
    import peft
    return {"torch_version": torch.__version__, "transformers_version": transformers.__version__,
            "peft_version": peft.__version__, "python_version": sys.version.split()[0]}


def token_loss_sum(logits, labels):
    """Sum of -log_softmax(logits[t])[labels[t+1]] over counted targets (a differentiable
    float64 scalar) and their count."""
    import torch
    lab = torch.tensor(labels[1:], dtype=torch.long)
    keep = lab != -100
    lp = torch.log_softmax(logits[:-1].to(torch.float64), -1)
    picked = lp[keep].gather(1, lab[keep][:, None])
    return -picked.sum(), int(keep.sum().item())


def build_train_tied(out_root, base_dir, manifest):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import Qwen3_5ForCausalLM, get_linear_schedule_with_warmup
    c = TRAIN_CFG
    case_dir = os.path.join(out_root, "train_tied")
    shutil.rmtree(case_dir, ignore_errors=True)
    os.makedirs(case_dir)
    print("== train_tied (base %s)" % base_dir, flush=True)
    with open(os.path.join(base_dir, "data.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(base_dir, "config.json")) as f:
        text_cfg = json.load(f)
    tensors = load_tensors(base_dir)
    base_rel = "../../text_tied"  # from train_tied/<adapter>/ to the base checkpoint

    model = Qwen3_5ForCausalLM.from_pretrained(base_dir, dtype=torch.float64)
    lcfg = LoraConfig(r=c["r"], lora_alpha=c["lora_alpha"], lora_dropout=c["lora_dropout"],
                      target_modules=list(TRAIN_TARGETS), task_type="CAUSAL_LM", bias="none")
    pm = get_peft_model(model, lcfg).double()
    params = lora_params(pm)
    g = torch.Generator().manual_seed(TRAIN_SEED)
    with torch.no_grad():
        for k, p in params.items():  # sorted names: the draw order is fixed
            std = c["init_A_std"] if ".lora_A." in k else c["init_B_std"]
            # rounded to F32, so that training starts exactly from what init_adapter/ holds
            p.copy_((torch.randn(p.shape, generator=g, dtype=torch.float64) * std)
                    .to(torch.float32).to(torch.float64))
    for n, p in pm.named_parameters():
        if p.requires_grad != (".lora_" in n):
            problem("train_tied: %s requires_grad=%s" % (n, p.requires_grad))
    init = {k: p.detach().clone() for k, p in params.items()}
    init_dir = os.path.join(case_dir, "init_adapter")
    save_adapter_f32(pm, init_dir, base_rel)
    ad = load_file(os.path.join(init_dir, "adapter_model.safetensors"))
    if sorted(ad) != sorted(init) or any(t.dtype != torch.float32 for t in ad.values()):
        problem("train_tied: init_adapter holds %s" % sorted({str(t.dtype) for t in ad.values()}))
    elif any(not torch.equal(ad[k].double(), init[k]) for k in init):
        problem("train_tied: init_adapter differs from the training start")
    n_mod = len(init) // 2
    print("  init adapter: %d modules, %d parameters" % (
        n_mod, sum(t.numel() for t in init.values())), flush=True)

    def lora_of(sd):
        return {k[len("base_model.model."):-len(".lora_A.weight")]:
                (t, sd[k.replace(".lora_A.", ".lora_B.")], c["lora_alpha"] / c["r"])
                for k, t in sd.items() if k.endswith(".lora_A.weight")}

    # the init adapter through the usual evaluation (HF loss + spec forward checks)
    pm.eval()
    _, init_sums, init_counts, _ = evaluate("train_tied init", pm, rows, tensors, text_cfg,
                                            lora_of(ad))

    opt = torch.optim.AdamW(list(params.values()), lr=c["lr"], betas=tuple(c["betas"]),
                            eps=c["eps"], weight_decay=c["weight_decay"], foreach=False)
    plan = train_plan(len(rows), c["batch_size"], c["grad_accum"], c["epochs"])
    total = len(plan)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=c["warmup_steps"],
                                            num_training_steps=total)
    pm.train()
    steps = []
    grads1 = None
    for si, (epoch, mbs) in enumerate(plan):
        step_rows = [i for mb in mbs for i in mb]
        n_tok = sum(row_targets(rows[i]["labels"]) for i in step_rows)
        lr = opt.param_groups[0]["lr"]
        loss_sum, rsums, rtoks = 0.0, [], []
        for i in step_rows:
            r = rows[i]
            if row_targets(r["labels"]) == 0:
                rsums.append(0.0)
                rtoks.append(0)
                continue  # no target: contributes nothing (not even a forward)
            out = pm(input_ids=torch.tensor([r["input_ids"]]), use_cache=False)
            s, cnt = token_loss_sum(out.logits[0], r["labels"])
            (s / n_tok).backward()  # gradient = sum of token-loss gradients / step targets
            rsums.append(s.item())
            rtoks.append(cnt)
            loss_sum += s.item()
        gn = math.sqrt(sum((p.grad.double() ** 2).sum().item() for p in params.values()
                           if p.grad is not None))
        if si == 0:
            grads1 = {k: p.grad.detach().clone() for k, p in params.items()}
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        st = {"step": si + 1, "epoch": epoch + 1, "rows": step_rows, "micro_batches": mbs,
              "loss": loss_sum / n_tok, "tokens": n_tok, "lr": lr, "grad_norm": gn,
              "row_loss_sum": rsums, "row_tokens": rtoks}
        steps.append(st)
        print("  step %d (epoch %d) rows %s micro-batches %s: loss %.10f over %d tokens, "
              "lr %.6g, grad_norm %.10g" % (st["step"], st["epoch"], step_rows, mbs, st["loss"],
                                              n_tok, lr, gn), flush=True)

    # checks: step 1 against the init evaluation, the loss moves, the adapter moved
    s1 = steps[0]
    want1 = sum(init_sums[i] for i in s1["rows"]) / s1["tokens"]
    if abs(s1["loss"] - want1) > 1e-12 * abs(want1):
        problem("train_tied: step 1 loss %.15f != eval of the init adapter %.15f" % (
            s1["loss"], want1))
    for a, b in zip(steps, steps[1:]):
        if abs(a["loss"] - b["loss"]) < 1e-4:
            problem("train_tied: loss barely changes from step %d to %d" % (a["step"], b["step"]))
    same_rows = [(a, b) for a in steps for b in steps if a["step"] < b["step"] and a["rows"] == b["rows"]]
    for a, b in same_rows:
        print("  rows %s: loss %.8f at step %d, %.8f at step %d" % (
            a["rows"], a["loss"], a["step"], b["loss"], b["step"]))
        if abs(a["loss"] - b["loss"]) < 1e-4:
            problem("train_tied: training did not change the loss of rows %s" % a["rows"])
    moved = {k: (p.detach() - init[k]).abs().max().item() for k, p in params.items()}
    rel = math.sqrt(sum(((p.detach() - init[k]) ** 2).sum().item() for k, p in params.items()) /
                    sum((init[k] ** 2).sum().item() for k in init))
    print("  adapter moved: max |delta| %.3g, min over tensors of max |delta| %.3g, "
          "relative L2 %.3g" % (max(moved.values()), min(moved.values()), rel), flush=True)
    if min(moved.values()) < 1e-4 or rel < 1e-3:
        problem("train_tied: the adapter barely moved (min %.3g, rel %.3g)" % (
            min(moved.values()), rel))

    exp_dir = os.path.join(case_dir, "expected_adapter")
    save_adapter_f32(pm, exp_dir, base_rel)
    ad2 = load_file(os.path.join(exp_dir, "adapter_model.safetensors"))
    r32 = max((ad2[k].double() - p.detach()).abs().max().item() for k, p in params.items())
    print("  expected_adapter: F32 rounding of the float64 result max |diff| %.3g" % r32)
    if sorted(ad2) != sorted(params) or any(t.dtype != torch.float32 for t in ad2.values()) or \
            r32 > 1e-6:
        problem("train_tied: expected_adapter does not hold the trained values")
    save_file({k: t.to(torch.float32).contiguous() for k, t in grads1.items()},
              os.path.join(case_dir, "expected_grads_step1.safetensors"),
              metadata={"format": "pt"})

    # the trained adapter, as saved (F32), evaluated on the float64 base
    base = Qwen3_5ForCausalLM.from_pretrained(base_dir, dtype=torch.float64)
    pref = PeftModel.from_pretrained(base, exp_dir).double().eval()
    _, sums, counts, spec_diff = evaluate("train_tied trained", pref, rows, tensors, text_cfg,
                                          lora_of(ad2))
    tokens = sum(counts)
    v = versions()
    ev = {"loss": sum(sums) / tokens, "tokens": tokens, "row_loss_sum": sums, "row_tokens": counts}
    ev.update(v)
    with open(os.path.join(case_dir, "expected_adapter_eval.json"), "w") as f:
        json.dump(ev, f, indent=1)
        f.write("\n")
    init_loss = sum(init_sums) / sum(init_counts)
    print("  eval: init adapter %.10f, trained adapter %.10f over %d tokens" % (
        init_loss, ev["loss"], tokens), flush=True)
    if not ev["loss"] < init_loss - 1e-4:
        problem("train_tied: training did not lower the eval loss (%.6f -> %.6f)" % (
            init_loss, ev["loss"]))

    config = dict(c)
    config.update({
        "base": "text_tied", "data": "text_tied/data.jsonl", "n_rows": len(rows),
        "target_modules": sorted(TRAIN_TARGETS), "scaling": c["lora_alpha"] / c["r"],
        "use_rslora": False, "use_dora": False, "bias": "none", "seed": TRAIN_SEED,
        "optimizer": "torch.optim.AdamW(foreach=False), LoRA parameters only",
        "scheduler": "transformers.get_linear_schedule_with_warmup",
        "num_training_steps": total, "steps_per_epoch": total // c["epochs"],
        "shuffle": False, "row_order": "file order, the same every epoch",
        "loss": "sum of token cross-entropies of the step / counted targets of the step",
        "grad_norm": "L2 norm over all LoRA gradients before optimizer.step(), no clipping",
        "lr_of_step": "optimizer.param_groups[0]['lr'] before optimizer.step(); scheduler.step() after",
        "precision": "float64 on the CPU; transformers as shipped (with its internal fp32 casts)",
        "rows_without_targets": "skipped (no forward), they count in the step's rows only",
        "lora_init": "A ~ N(0, init_A_std), B ~ N(0, init_B_std), rounded to F32, "
                     "drawn in sorted key order from torch.Generator().manual_seed(seed)",
    })
    out = {"steps": steps, "config": config,
           "init_eval": {"loss": init_loss, "tokens": sum(init_counts), "row_loss_sum": init_sums,
                         "row_tokens": init_counts}}
    out.update(v)
    with open(os.path.join(case_dir, "expected_train.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    files = sorted(os.path.relpath(os.path.join(dp, fn), case_dir)
                   for dp, _, fns in os.walk(case_dir) for fn in fns)
    manifest["cases"]["train_tied"] = {
        "kind": "training", "base": "text_tied", "files": files, "config": config,
        "steps": [{k: s[k] for k in ("step", "rows", "loss", "tokens", "lr", "grad_norm")}
                  for s in steps],
        "n_modules": n_mod, "init_eval_loss": init_loss, "eval_loss": ev["loss"],
        "eval_tokens": tokens, "spec_forward_max_abs_diff": spec_diff,
        "expected_adapter_f32_rounding": r32, "versions": v}


# --------------------------------------------------------------------------------------------
# optim: learning-rate schedules, AdamW and gradient clipping
# --------------------------------------------------------------------------------------------

OPTIM_SEED = 5005
SCHEDULE_PAIRS = [(0, 10), (1, 4), (3, 10), (5, 7), (10, 10), (0, 1)]


def build_optim(out_root, manifest):
    import torch
    from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                              get_linear_schedule_with_warmup)
    case_dir = os.path.join(out_root, "optim")
    shutil.rmtree(case_dir, ignore_errors=True)
    os.makedirs(case_dir)
    print("== optim", flush=True)
    v = versions()
    f64 = torch.float64

    # schedules: the lr each optimiser step runs with
    base_lr = 2e-4
    cases = []
    for kind in ("linear", "cosine", "constant"):
        for warmup, total in SCHEDULE_PAIRS:
            p = torch.nn.Parameter(torch.zeros(1, dtype=f64))
            opt = torch.optim.SGD([p], lr=base_lr)
            if kind == "linear":
                sch = get_linear_schedule_with_warmup(opt, warmup, total)
            elif kind == "cosine":
                sch = get_cosine_schedule_with_warmup(opt, warmup, total)
            else:
                sch = get_constant_schedule_with_warmup(opt, warmup)
            lrs = []
            for _ in range(total):
                lrs.append(opt.param_groups[0]["lr"])
                p.grad = torch.zeros_like(p)
                opt.step()
                sch.step()
            cases.append({"schedule": kind, "warmup": warmup, "total": total, "lrs": lrs})
            print("  %-8s warmup %2d total %2d: %s" % (kind, warmup, total,
                                                     " ".join("%.4g" % x for x in lrs)))
    sj = {"base_lr": base_lr, "cosine_num_cycles": 0.5,
          "lr_of_step": "optimizer.param_groups[0]['lr'] before each optimizer.step(); "
                        "scheduler.step() after it; steps 0..total-1",
          "cases": cases}
    sj.update(v)
    with open(os.path.join(case_dir, "schedules.json"), "w") as f:
        json.dump(sj, f, indent=1)
        f.write("\n")

    # AdamW on 7 parameters, float64, given gradients
    g = torch.Generator().manual_seed(OPTIM_SEED)
    p0 = torch.randn(7, generator=g, dtype=f64)
    grads = [torch.randn(7, generator=g, dtype=f64) * 0.5 for _ in range(5)]
    hp = dict(lr=1e-2, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.1)
    runs = []
    for name, lrs in (("constant_lr", [1e-2] * 5),
                      ("changing_lr", [0.0, 1e-2, 2.0 / 3.0 * 1e-2, 1.0 / 3.0 * 1e-2, 0.0])):
        p = torch.nn.Parameter(p0.clone())
        opt = torch.optim.AdamW([p], lr=hp["lr"], betas=tuple(hp["betas"]), eps=hp["eps"],
                                weight_decay=hp["weight_decay"], foreach=False)
        steps = []
        for t, gr in enumerate(grads):
            opt.param_groups[0]["lr"] = lrs[t]
            p.grad = gr.clone()
            opt.step()
            st = opt.state[p]
            steps.append({"step": t + 1, "lr": lrs[t], "grad": gr.tolist(),
                          "params": p.detach().tolist(), "exp_avg": st["exp_avg"].tolist(),
                          "exp_avg_sq": st["exp_avg_sq"].tolist()})
        runs.append({"name": name, "params_init": p0.tolist(), "steps": steps})
        print("  adamw %s: params after 5 steps %s" % (name, ["%.6f" % x for x in p.tolist()]))
    aj = dict(hp)
    aj.update({"optimizer": "torch.optim.AdamW(foreach=False, amsgrad=False, maximize=False), "
                            "float64; m, v start at 0; step t is 1-based",
               "runs": runs})
    aj.update(v)
    with open(os.path.join(case_dir, "adamw.json"), "w") as f:
        json.dump(aj, f, indent=1)
        f.write("\n")

    # clip_grad_norm_: several gradient tensors, one global norm
    sets = [[torch.randn(3, generator=g, dtype=f64), torch.randn(5, generator=g, dtype=f64),
             torch.randn(2, 2, generator=g, dtype=f64)],
            [torch.randn(6, generator=g, dtype=f64) * 0.01, torch.randn(1, generator=g, dtype=f64)
             * 0.01]]
    clips = []
    for gi, gs in enumerate(sets):
        norm = math.sqrt(sum((t ** 2).sum().item() for t in gs))
        for mx in (0.5 * norm, 2.0 * norm, 1.0):
            ps = [torch.nn.Parameter(torch.zeros_like(t)) for t in gs]
            for pp, t in zip(ps, gs):
                pp.grad = t.clone()
            ret = torch.nn.utils.clip_grad_norm_(ps, max_norm=mx, norm_type=2.0, foreach=False)
            clips.append({"set": gi, "max_norm": mx, "grads": [t.flatten().tolist() for t in gs],
                          "norm": ret.item(), "clipped": [pp.grad.flatten().tolist() for pp in ps],
                          "clipped_expected": ret.item() > mx})
            print("  clip set %d max_norm %.6g: norm %.10g%s" % (
                gi, mx, ret.item(), " (clipped)" if ret.item() > mx else ""))
    cj = {"rule": "torch.nn.utils.clip_grad_norm_(norm_type=2, foreach=False): total = L2 norm of "
                  "all gradients together; every gradient *= min(1, max_norm / (total + 1e-6)); "
                  "returns total", "cases": clips}
    cj.update(v)
    with open(os.path.join(case_dir, "clip_grad_norm.json"), "w") as f:
        json.dump(cj, f, indent=1)
        f.write("\n")
    manifest["cases"]["optim"] = {
        "kind": "optimizer", "files": sorted(os.listdir(case_dir)), "seed": OPTIM_SEED,
        "schedules": {"base_lr": base_lr, "kinds": ["linear", "cosine", "constant"],
                      "warmup_total": [list(x) for x in SCHEDULE_PAIRS]},
        "adamw": dict(hp, n=7, steps=5, runs=[r["name"] for r in runs]),
        "clip_cases": len(clips), "versions": v}


# --------------------------------------------------------------------------------------------
# generate: transformers' greedy continuations on text_tied, base and + adapter
# --------------------------------------------------------------------------------------------

GEN_SEED = 5005
GEN_PROMPT_LENGTHS = (1, 9, 70)  # 70: the prompt (prefill) crosses the 64-token GDN chunk
GEN_NEW_TOKENS = 24
GEN_PAD = 0
GEN_MARGIN_MIN = 1e-3  # asserted: top-1 minus top-2 logit at every generated step
GEN_MARGIN_PREFER = 1e-2  # prompts are drawn until every step of base and adapter clears this
GEN_ATTEMPTS = 40


def gen_prompt(n, i, k, vocab):
    """Attempt k of prompt i: n ids uniform in [1, vocab) (no pad id 0) from seed
    GEN_SEED + 1000 i + k."""
    import torch
    g = torch.Generator().manual_seed(GEN_SEED + 1000 * i + k)
    return torch.randint(1, vocab, (n,), generator=g).tolist()


def top2_margins(logits):
    """logits [steps, V] -> (argmax list, top-1 minus top-2 list), in float64."""
    import torch
    top = torch.topk(logits.to(torch.float64), 2, dim=-1)
    return top.indices[:, 0].tolist(), (top.values[:, 0] - top.values[:, 1]).tolist()


def hf_greedy(model, prompt, use_cache):
    """model.generate as the fixture specifies it. Returns (new ids, per-step logits [n, V])."""
    import torch
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=GEN_NEW_TOKENS, do_sample=False, eos_token_id=None,
                             pad_token_id=GEN_PAD, use_cache=use_cache,
                             return_dict_in_generate=True, output_logits=True)
    seq = out.sequences[0].tolist()
    if seq[:len(prompt)] != prompt or len(seq) != len(prompt) + GEN_NEW_TOKENS:
        raise RuntimeError("generate returned %d ids for a %d-id prompt" % (len(seq), len(prompt)))
    steps = torch.stack([x[0] for x in out.logits]).to(torch.float64)
    return seq[len(prompt):], steps


def build_generate(out_root, base_dir, manifest):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    from transformers import Qwen3_5ForCausalLM
    case_dir = os.path.join(out_root, "generate")
    shutil.rmtree(case_dir, ignore_errors=True)
    os.makedirs(case_dir)
    print("== generate (base %s)" % base_dir, flush=True)
    with open(os.path.join(base_dir, "config.json")) as f:
        text_cfg = json.load(f)
    V = text_cfg["vocab_size"]
    ad_dir = os.path.join(base_dir, "adapter")
    tensors = load_tensors(base_dir)
    ad = load_file(os.path.join(ad_dir, "adapter_model.safetensors"))
    with open(os.path.join(ad_dir, "adapter_config.json")) as f:
        acfg = json.load(f)
    scale = acfg["lora_alpha"] / acfg["r"]
    lora = {k[len("base_model.model."):-len(".lora_A.weight")]:
            (t, ad[k.replace(".lora_A.", ".lora_B.")], scale)
            for k, t in ad.items() if k.endswith(".lora_A.weight")}

    base = Qwen3_5ForCausalLM.from_pretrained(base_dir, dtype=torch.float64).eval()
    pm = PeftModel.from_pretrained(Qwen3_5ForCausalLM.from_pretrained(base_dir, dtype=torch.float64),
                                   ad_dir).double().eval()
    models = ((False, base, None), (True, pm, lora))

    cases, logits_out = [], {}
    for i, n in enumerate(GEN_PROMPT_LENGTHS):
        best = None
        for k in range(GEN_ATTEMPTS):
            prompt = gen_prompt(n, i, k, V)
            got = []
            for with_ad, model, _ in models:
                new, steps = hf_greedy(model, prompt, True)
                am, mg = top2_margins(steps)
                if am != new:
                    problem("generate prompt %d attempt %d: generated ids are not the argmax" % (i, k))
                got.append((new, steps, min(mg)))
            worst = min(x[2] for x in got)
            print("  prompt %d (len %d) attempt %d: smallest top-2 margin %.4g" % (i, n, k, worst),
                  flush=True)
            if best is None or worst > best[0]:
                best = (worst, k, prompt, got)
            if worst >= GEN_MARGIN_PREFER:
                break
        worst, k, prompt, got = best
        if worst <= GEN_MARGIN_MIN:
            problem("generate prompt %d: best smallest margin %.3g after %d attempts" % (
                i, worst, GEN_ATTEMPTS))
        for (with_ad, model, lo), (new, steps, _) in zip(models, got):
            tag = "prompt %d%s" % (i, " + adapter" if with_ad else "")
            full = prompt + new
            with torch.no_grad():
                lg = model(input_ids=torch.tensor([full[:-1]]), use_cache=False).logits[0]
            lg = lg.to(torch.float64)[n - 1:]  # the positions that choose the generated ids
            am, mg = top2_margins(lg)
            if am != new:
                problem("generate %s: the full-sequence forward picks %s, generate %s" % (tag, am, new))
            d_cache = (lg - steps).abs().max().item()
            if d_cache > SPEC_TOL:  # both paths run HF's fp32 casts (chunked vs recurrent GDN)
                problem("generate %s: cached step logits differ from the full forward by %.3g" % (
                    tag, d_cache))
            try:
                new_nc, steps_nc = hf_greedy(model, prompt, False)
                d_nc = (steps_nc - steps).abs().max().item()
                if new_nc != new:
                    problem("generate %s: use_cache=False gives %s, use_cache=True %s" % (
                        tag, new_nc, new))
            except Exception:  # noqa: BLE001
                traceback.print_exc()
                problem("generate %s: use_cache=False failed" % tag)
                d_nc = None
            spec = {}
            for dt_name, dt in (("f64", torch.float64), ("f32", torch.float32)):
                ref = spec_forward(tensors, text_cfg, full[:-1], lo, dt).to(torch.float64)[n - 1:]
                sam, smg = top2_margins(ref)
                if sam != new:
                    problem("generate %s: the %s spec forward picks %s, HF %s" % (
                        tag, dt_name, sam, new))
                spec[dt_name] = {"max_abs_diff": (ref - lg).abs().max().item(),
                                 "min_margin": min(smg)}
            if spec["f64"]["max_abs_diff"] > SPEC_TOL:
                problem("generate %s: spec forward differs from transformers by %.3g" % (
                    tag, spec["f64"]["max_abs_diff"]))
            if min(mg) <= GEN_MARGIN_MIN:
                problem("generate %s: margin %.3g" % (tag, min(mg)))
            key = "logits.%d" % len(cases)
            logits_out[key] = lg.to(torch.float32).contiguous()
            cases.append({"prompt_ids": prompt, "adapter": with_ad, "generated_ids": new,
                          "margins": mg, "min_margin": min(mg), "logits_key": key,
                          "prompt_seed": GEN_SEED + 1000 * i + k,
                          "cache_vs_full_max_abs_diff": d_cache,
                          "use_cache_false_max_abs_diff": d_nc,
                          "spec_forward_f64_max_abs_diff": spec["f64"]["max_abs_diff"],
                          "spec_forward_f32_max_abs_diff": spec["f32"]["max_abs_diff"],
                          "spec_forward_f32_min_margin": spec["f32"]["min_margin"]})
            print("  %s (len %d, seed %d): %s; min margin %.4g; cache vs full %.2g, "
                  "use_cache=False %s, f32 spec %.2g (its min margin %.4g)" % (
                      tag, n, GEN_SEED + 1000 * i + k, new, min(mg), d_cache,
                      "%.2g" % d_nc if d_nc is not None else "n/a",
                      spec["f32"]["max_abs_diff"], spec["f32"]["min_margin"]), flush=True)

    v = versions()
    ej = {"base": "text_tied", "adapter_dir": "text_tied/adapter",
          "call": "model.generate(input_ids, attention_mask=ones, max_new_tokens=%d, "
                  "do_sample=False, eos_token_id=None, pad_token_id=%d, use_cache=True); "
                  "float64 on the CPU; the adapter model is PeftModel.from_pretrained(base, "
                  "adapter).double(); batch 1, no padding" % (GEN_NEW_TOKENS, GEN_PAD),
          "max_new_tokens": GEN_NEW_TOKENS, "eos_token_id": None, "pad_token_id": GEN_PAD,
          "margin_min": GEN_MARGIN_MIN, "margin_prefer": GEN_MARGIN_PREFER,
          "min_margin": min(c["min_margin"] for c in cases),
          "logits": "expected_logits.safetensors: logits.<case> F32 [max_new_tokens, vocab], the "
                    "logits of one use_cache=False forward over prompt + generated[:-1] at "
                    "positions len(prompt)-1 .. len(prompt)+max_new_tokens-2; row j chooses "
                    "generated_ids[j]",
          "cases": cases}
    ej.update(v)
    with open(os.path.join(case_dir, "expected.json"), "w") as f:
        json.dump(ej, f, indent=1)
        f.write("\n")
    save_file(logits_out, os.path.join(case_dir, "expected_logits.safetensors"),
              metadata={"format": "pt"})
    manifest["cases"]["generate"] = {
        "kind": "generation", "base": "text_tied", "adapter": "text_tied/adapter",
        "files": sorted(os.listdir(case_dir)), "seed": GEN_SEED,
        "max_new_tokens": GEN_NEW_TOKENS, "pad_token_id": GEN_PAD, "eos_token_id": None,
        "cases": [{"prompt_length": len(c["prompt_ids"]), "adapter": c["adapter"],
                   "generated_ids": c["generated_ids"], "min_margin": c["min_margin"]}
                  for c in cases],
        "min_margin": ej["min_margin"], "versions": v}


# --------------------------------------------------------------------------------------------
# --diagnose: transformers with its fp32 casts removed, against the spec forward
# --------------------------------------------------------------------------------------------

def strict_fp64_patches():
    """Remove the fp32 casts of transformers' Qwen3.5 code (RMSNorms, gated norm, GDN kernel,
    decay, RoPE angles) so that a float64 model computes everything in float64."""
    import inspect
    import textwrap
    import torch
    import transformers.models.qwen3_5.modeling_qwen3_5 as M

    def rms_forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)

    def gated_forward(self, x, gate):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x * (gate * torch.sigmoid(gate))

    def recurrent(query, key, value, g, beta, initial_state=None, output_final_state=False,
                  use_qk_l2norm_in_kernel=False, **kw):
        B, n, Hk, Dk = key.shape
        Hv, Dv = value.shape[-2:]
        if Hk != Hv:
            query, key = (x.repeat_interleave(Hv // Hk, dim=2) for x in (query, key))
        if use_qk_l2norm_in_kernel:
            query = query * torch.rsqrt((query * query).sum(-1, keepdim=True) + 1e-6)
            key = key * torch.rsqrt((key * key).sum(-1, keepdim=True) + 1e-6)
        query = query * Dk ** -0.5
        S = torch.zeros(B, Hv, Dk, Dv, dtype=value.dtype)
        out = torch.zeros(B, n, Hv, Dv, dtype=value.dtype)
        for t in range(n):
            S = S * g[:, t].exp()[..., None, None]
            kv = (S * key[:, t, :, :, None]).sum(-2)
            delta = (value[:, t] - kv) * beta[:, t, :, None]
            S = S + key[:, t, :, :, None] * delta[:, :, None, :]
            out[:, t] = (S * query[:, t, :, :, None]).sum(-2)
        return out, (S if output_final_state else None)

    def rotary_forward(self, x, position_ids):
        rp = self.config.rope_parameters
        dim = self.inv_freq.numel() * 2
        inv = 1.0 / (float(rp["rope_theta"]) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        freqs = position_ids[0].to(torch.float64)[..., None] * inv  # text: the 3 rows are equal
        emb = torch.cat([freqs, freqs], -1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    src = textwrap.dedent(inspect.getsource(M.Qwen3_5GatedDeltaNet.forward))
    src = "\n".join(l for l in src.split("\n") if not l.lstrip().startswith("@"))
    n1, n2 = src.count("self.A_log.float().exp()"), src.count("a.float()")
    assert n1 == 1 and n2 == 1, (n1, n2)
    src = src.replace("self.A_log.float().exp()", "self.A_log.exp()").replace("a.float()", "a")
    ns = {}
    exec(compile(src, M.__file__, "exec"), M.__dict__, ns)
    M.Qwen3_5GatedDeltaNet.forward = ns["forward"]
    M.Qwen3_5RMSNorm.forward = rms_forward
    M.Qwen3_5RMSNormGated.forward = gated_forward
    M.torch_chunk_gated_delta_rule = recurrent
    M.Qwen3_5TextRotaryEmbedding.forward = rotary_forward


def c_rel_err(a, b):
    """tests/test_main.c rel_err: max |a - b| / max |b|."""
    return ((a - b).abs().max() / b.abs().max()).item()


def diagnose(root):
    import torch
    from safetensors.torch import load_file
    from transformers import Qwen3_5ForCausalLM, Qwen3_5ForConditionalGeneration
    from peft import PeftModel
    strict_fp64_patches()
    for name in CASES:
        case_dir = os.path.join(root, name)
        with open(os.path.join(case_dir, "config.json")) as f:
            cfg_json = json.load(f)
        tcfg = cfg_json.get("text_config", cfg_json)
        cls = Qwen3_5ForConditionalGeneration if "text_config" in cfg_json else Qwen3_5ForCausalLM
        with open(os.path.join(case_dir, "data.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        tensors = load_tensors(case_dir)
        variants = [("", None)]
        if os.path.isdir(os.path.join(case_dir, "adapter")):
            ad = load_file(os.path.join(case_dir, "adapter", "adapter_model.safetensors"))
            lora = {k[len("base_model.model."):-len(".lora_A.weight")]:
                    (t, ad[k.replace(".lora_A.", ".lora_B.")], LORA_ALPHA / LORA_R)
                    for k, t in ad.items() if k.endswith(".lora_A.weight")}
            variants.append(("_adapter", lora))
        for stem, lora in variants:
            model = cls.from_pretrained(case_dir, dtype=torch.float64)
            if lora:
                model = PeftModel.from_pretrained(model, os.path.join(case_dir, "adapter")).double()
            model.eval()
            want = load_file(os.path.join(case_dir, "expected%s_logits.safetensors" % stem))
            with open(os.path.join(case_dir, "expected%s.json" % stem)) as f:
                exp = json.load(f)
            d_spec = d_exp = e32 = e32_strict = 0.0
            s_strict = 0.0
            for i, r in enumerate(rows):
                with torch.no_grad():
                    lg = model(input_ids=torch.tensor([r["input_ids"]]), use_cache=False).logits[0]
                ref = spec_forward(tensors, tcfg, r["input_ids"], lora)
                f32 = spec_forward(tensors, tcfg, r["input_ids"], lora, torch.float32).double()
                w = want["logits.%d" % i].double()
                d_spec = max(d_spec, (lg - ref).abs().max().item())
                d_exp = max(d_exp, c_rel_err(lg, w))
                e32 = max(e32, c_rel_err(f32, w))
                e32_strict = max(e32_strict, c_rel_err(f32, lg))
                s_strict += row_losses(lg, r["labels"])[0]
            print("%-18s%-9s strict-fp64 HF vs spec |diff| %.2e; expected (HF as shipped) vs strict "
                  "rel_err %.2e; fp32 spec forward vs expected rel_err %.2e (vs strict %.2e); "
                  "loss shipped %.9f strict %.9f" % (
                      name, stem, d_spec, d_exp, e32, e32_strict, exp["loss"],
                      s_strict / exp["tokens"]), flush=True)


def generate(out_root, only=None, fixtures=None):
    """Build the cases named in `only` (all of ALL_CASES by default) into out_root. With `only`,
    MANIFEST.json starts from the one in `fixtures` (the committed folder) and gains or replaces
    the entries built here; train_tied trains on out_root/text_tied when text_tied is built in
    this run, else on fixtures/text_tied."""
    import torch
    import transformers
    try:
        import peft
        peft_version = peft.__version__
    except Exception as e:  # noqa: BLE001
        peft_version = "missing: %s" % e
    torch.set_num_threads(min(8, os.cpu_count() or 1))
    print("torch %s, transformers %s, peft %s, python %s" % (
        torch.__version__, transformers.__version__, peft_version, sys.version.split()[0]))
    try:
        from transformers.utils import is_flash_linear_attention_available
        print("fla available: %s" % is_flash_linear_attention_available())
    except Exception as e:  # noqa: BLE001
        print("fla check: %s" % e)
    names = list(only) if only else list(ALL_CASES)
    fixtures = fixtures or DEFAULT_FIXTURES
    os.makedirs(out_root, exist_ok=True)
    old_manifest = os.path.join(fixtures, "MANIFEST.json")
    if only and os.path.exists(old_manifest):
        with open(old_manifest) as f:
            manifest = json.load(f)
        print("manifest: starting from %s" % old_manifest)
    else:
        manifest = {"generator": "tools/make_fixtures.py", "torch_version": torch.__version__,
                    "transformers_version": transformers.__version__, "peft_version": peft_version,
                    "row_lengths": list(ROW_LENGTHS), "cases": {}}
    for name in names:
        try:
            if name in CASES:
                build_case(name, out_root, manifest)
            elif name == "train_tied":
                base = os.path.join(out_root if "text_tied" in names else fixtures, "text_tied")
                build_train_tied(out_root, base, manifest)
            elif name == "optim":
                build_optim(out_root, manifest)
            elif name == "generate":
                base = os.path.join(out_root if "text_tied" in names else fixtures, "text_tied")
                build_generate(out_root, base, manifest)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            problem("%s: exception" % name)
    manifest["problems"] = problems
    with open(os.path.join(out_root, "MANIFEST.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    base_root = out_root if "text_tied" in names else fixtures
    if not verify(out_root, names, base_root):
        problem("verify failed")


# --------------------------------------------------------------------------------------------
# --verify: plain Python, no torch
# --------------------------------------------------------------------------------------------

DT_SIZE = {"F32": 4, "BF16": 2, "F16": 2, "F64": 8, "I64": 8, "I32": 4}


def st_header(path):
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        assert 8 + n <= size, path
        raw = f.read(n)
    h = json.loads(raw)
    meta = h.pop("__metadata__", None)
    spans = []
    for k, e in h.items():
        numel = 1
        for s in e["shape"]:
            numel *= s
        b, en = e["data_offsets"]
        assert en - b == numel * DT_SIZE[e["dtype"]], (path, k)
        spans.append((b, en))
    spans.sort()
    pos = 0
    for b, en in spans:
        assert b == pos, (path, "hole or overlap", b, pos)
        pos = en
    assert 8 + n + pos == size, (path, "buffer size", 8 + n + pos, size)
    return h, meta, 8 + n


def read_f32(path, off, e):
    import array
    b, en = e["data_offsets"]
    with open(path, "rb") as f:
        f.seek(off + b)
        a = array.array("f")
        a.frombytes(f.read(en - b))
    if sys.byteorder != "little":
        a.byteswap()
    return a


def verify_expected(case_dir, stem, rows, V):
    with open(os.path.join(case_dir, "expected%s.json" % stem)) as f:
        exp = json.load(f)
    for k in ("loss", "tokens", "row_loss_sum", "row_tokens", "transformers_version",
              "torch_version"):
        assert k in exp, (case_dir, stem, k)
    want_counts = [sum(1 for t in range(len(r["labels"]) - 1) if r["labels"][t + 1] != -100)
                   for r in rows]
    assert exp["row_tokens"] == want_counts, (case_dir, exp["row_tokens"], want_counts)
    assert exp["tokens"] == sum(want_counts)
    assert abs(exp["loss"] - sum(exp["row_loss_sum"]) / exp["tokens"]) < 1e-12
    path = os.path.join(case_dir, "expected%s_logits.safetensors" % stem)
    h, _, off = st_header(path)
    assert sorted(h) == sorted("logits.%d" % i for i in range(len(rows))), sorted(h)
    for i, r in enumerate(rows):
        e = h["logits.%d" % i]
        assert e["dtype"] == "F32" and e["shape"] == [len(r["input_ids"]), V], (i, e)
        lg = read_f32(path, off, e)
        s = 0.0
        for t in range(len(r["labels"]) - 1):
            y = r["labels"][t + 1]
            if y == -100:
                continue
            row = lg[t * V:(t + 1) * V]
            m = max(row)
            lse = m + math.log(sum(math.exp(x - m) for x in row))
            s += lse - row[y]
        # the logits file is F32, the sums came from float64 logits
        assert abs(s - exp["row_loss_sum"][i]) <= 1e-4 * max(1.0, abs(s)), (case_dir, stem, i, s)
    return exp


def close(a, b, rel, what):
    assert abs(a - b) <= rel * max(abs(a), abs(b), 1e-300), (what, a, b)


def hf_schedule_lr(kind, base_lr, step, warmup, total, num_cycles=0.5):
    """transformers' get_{linear,cosine,constant}_schedule_with_warmup lr_lambda, times base_lr."""
    if step < warmup:
        return base_lr * (float(step) / float(max(1, warmup)))
    if kind == "constant":
        return base_lr * 1.0
    if kind == "linear":
        return base_lr * max(0.0, float(total - step) / float(max(1, total - warmup)))
    progress = float(step - warmup) / float(max(1, total - warmup))
    return base_lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress)))


def adamw_reference(p, grads, lrs, beta1, beta2, eps, wd):
    """torch.optim.AdamW, single-tensor path, in plain Python. Returns [(p, m, v)] per step."""
    p = list(p)
    m = [0.0] * len(p)
    v = [0.0] * len(p)
    out = []
    for t, (g, lr) in enumerate(zip(grads, lrs), 1):
        bc1, bc2 = 1 - beta1 ** t, 1 - beta2 ** t
        for i in range(len(p)):
            p[i] *= 1 - lr * wd
            m[i] += (g[i] - m[i]) * (1 - beta1)
            v[i] = v[i] * beta2 + (1 - beta2) * g[i] * g[i]
            p[i] -= lr / bc1 * m[i] / (math.sqrt(v[i]) / math.sqrt(bc2) + eps)
        out.append((list(p), list(m), list(v)))
    return out


def verify_optim(case_dir):
    with open(os.path.join(case_dir, "schedules.json")) as f:
        sj = json.load(f)
    n = 0
    kinds = set()
    for c in sj["cases"]:
        assert len(c["lrs"]) == c["total"], c
        for s, lr in enumerate(c["lrs"]):
            want = hf_schedule_lr(c["schedule"], sj["base_lr"], s, c["warmup"], c["total"],
                                  sj["cosine_num_cycles"])
            assert abs(lr - want) <= 1e-15 * sj["base_lr"], (c["schedule"], c["warmup"],
                                                              c["total"], s, lr, want)
            n += 1
        kinds.add(c["schedule"])
    assert kinds == {"linear", "cosine", "constant"}, kinds
    with open(os.path.join(case_dir, "adamw.json")) as f:
        aj = json.load(f)
    worst = 0.0
    for run in aj["runs"]:
        ref = adamw_reference(run["params_init"], [s["grad"] for s in run["steps"]],
                              [s["lr"] for s in run["steps"]], aj["betas"][0], aj["betas"][1],
                              aj["eps"], aj["weight_decay"])
        for s, (p, m, v) in zip(run["steps"], ref):
            for key, want in (("params", p), ("exp_avg", m), ("exp_avg_sq", v)):
                for a, b in zip(s[key], want):
                    worst = max(worst, abs(a - b) / max(abs(b), 1e-12))
                    close(a, b, 1e-10, (run["name"], s["step"], key))
    with open(os.path.join(case_dir, "clip_grad_norm.json")) as f:
        cj = json.load(f)
    for c in cj["cases"]:
        norm = math.sqrt(sum(x * x for g in c["grads"] for x in g))
        close(c["norm"], norm, 1e-13, "clip norm")
        coef = min(1.0, c["max_norm"] / (norm + 1e-6))
        assert c["clipped_expected"] == (norm > c["max_norm"])
        for g, h in zip(c["grads"], c["clipped"]):
            for a, b in zip(g, h):
                close(b, a * coef, 1e-13, "clipped grad")
    print("  %-18s %d schedule lrs, %d AdamW runs (max rel diff to the plain-Python AdamW %.2g), "
          "%d clip cases" % ("optim", n, len(aj["runs"]), worst, len(cj["cases"])))


def verify_train(case_dir, base_dir):
    with open(os.path.join(case_dir, "expected_train.json")) as f:
        ej = json.load(f)
    c = ej["config"]
    with open(os.path.join(base_dir, "data.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    counts = [row_targets(r["labels"]) for r in rows]
    plan = train_plan(len(rows), c["batch_size"], c["grad_accum"], c["epochs"])
    assert len(ej["steps"]) == len(plan) == c["num_training_steps"]
    for s, (epoch, mbs) in zip(ej["steps"], plan):
        assert s["epoch"] == epoch + 1 and s["micro_batches"] == mbs, (s["step"], mbs)
        assert s["rows"] == [i for mb in mbs for i in mb]
        assert s["row_tokens"] == [counts[i] for i in s["rows"]]
        assert s["tokens"] == sum(s["row_tokens"])
        close(s["loss"], sum(s["row_loss_sum"]) / s["tokens"], 1e-13, "step loss")
        want = hf_schedule_lr(c["schedule"], c["lr"], s["step"] - 1, c["warmup_steps"],
                              c["num_training_steps"])
        assert abs(s["lr"] - want) <= 1e-15 * c["lr"], (s["step"], s["lr"], want)
        assert math.isfinite(s["grad_norm"]) and s["grad_norm"] > 0
    ie = ej["init_eval"]
    assert ie["row_tokens"] == counts and ie["tokens"] == sum(counts)
    s1 = ej["steps"][0]
    close(s1["loss"], sum(ie["row_loss_sum"][i] for i in s1["rows"]) / s1["tokens"], 1e-10,
          "step 1 vs init eval")
    with open(os.path.join(case_dir, "expected_adapter_eval.json")) as f:
        ev = json.load(f)
    assert ev["row_tokens"] == counts and ev["tokens"] == sum(counts)
    close(ev["loss"], sum(ev["row_loss_sum"]) / ev["tokens"], 1e-13, "eval loss")

    base, _, _ = st_header(os.path.join(base_dir, "model.safetensors"))
    want_mods = sorted("base_model.model." + k[:-len(".weight")] for k in base
                       if k.endswith(".weight") and k.split(".")[-2] in c["target_modules"])
    vals = {}
    for sub in ("init_adapter", "expected_adapter"):
        ad_dir = os.path.join(case_dir, sub)
        assert sorted(os.listdir(ad_dir)) == ["adapter_config.json", "adapter_model.safetensors"]
        with open(os.path.join(ad_dir, "adapter_config.json")) as f:
            acfg = json.load(f)
        assert acfg["peft_type"] == "LORA" and acfg["r"] == c["r"], sub
        assert acfg["lora_alpha"] == c["lora_alpha"] and acfg["lora_dropout"] == c["lora_dropout"]
        assert acfg["target_modules"] == sorted(c["target_modules"]), acfg["target_modules"]
        assert not acfg.get("use_rslora") and not acfg.get("use_dora")
        path = os.path.join(ad_dir, "adapter_model.safetensors")
        h, _, off = st_header(path)
        assert sorted({k.rsplit(".lora_", 1)[0] for k in h}) == want_mods, sub
        assert len(h) == 2 * len(want_mods)
        vals[sub] = {}
        for m in want_mods:
            a, b = h[m + ".lora_A.weight"], h[m + ".lora_B.weight"]
            w = base[m[len("base_model.model."):] + ".weight"]
            assert a["dtype"] == b["dtype"] == "F32", m
            assert a["shape"] == [c["r"], w["shape"][1]] and b["shape"] == [w["shape"][0], c["r"]], m
            for k, e in ((m + ".lora_A.weight", a), (m + ".lora_B.weight", b)):
                vals[sub][k] = read_f32(path, off, e)
    moved = []
    for k, x in vals["init_adapter"].items():
        assert max(abs(t) for t in x) > 0, ("zero init tensor", k)
        y = vals["expected_adapter"][k]
        moved.append(max(abs(p - q) for p, q in zip(x, y)))
    assert min(moved) > 1e-5, min(moved)
    path = os.path.join(case_dir, "expected_grads_step1.safetensors")
    h, _, off = st_header(path)
    assert sorted(h) == sorted(vals["init_adapter"])
    gn = math.sqrt(sum(x * x for k, e in h.items() for x in read_f32(path, off, e)))
    close(gn, s1["grad_norm"], 1e-6, "step-1 grad norm vs expected_grads_step1")
    print("  %-18s %d steps, rows %s, losses %s, lrs %s; %d modules, min tensor move %.2g; "
          "eval %.6f (init %.6f) over %d tokens" % (
              "train_tied", len(ej["steps"]), [s["rows"] for s in ej["steps"]],
              ["%.6f" % s["loss"] for s in ej["steps"]], ["%.3g" % s["lr"] for s in ej["steps"]],
              len(want_mods), min(moved), ev["loss"], ie["loss"], ev["tokens"]))


def verify_generate(case_dir, base_dir):
    with open(os.path.join(case_dir, "expected.json")) as f:
        ej = json.load(f)
    with open(os.path.join(base_dir, "config.json")) as f:
        V = json.load(f)["vocab_size"]
    n_new = ej["max_new_tokens"]
    path = os.path.join(case_dir, "expected_logits.safetensors")
    h, _, off = st_header(path)
    assert sorted(h) == sorted(c["logits_key"] for c in ej["cases"]), sorted(h)
    assert sorted((len(c["prompt_ids"]), c["adapter"]) for c in ej["cases"]) == \
        sorted((n, a) for n in GEN_PROMPT_LENGTHS for a in (False, True))
    worst = float("inf")
    for c in ej["cases"]:
        assert all(1 <= t < V for t in c["prompt_ids"]), c["prompt_ids"]
        assert len(c["generated_ids"]) == n_new and all(0 <= t < V for t in c["generated_ids"])
        e = h[c["logits_key"]]
        assert e["dtype"] == "F32" and e["shape"] == [n_new, V], e
        lg = read_f32(path, off, e)
        for j, y in enumerate(c["generated_ids"]):
            row = sorted(range(V), key=lambda t: -lg[j * V + t])[:2]
            assert row[0] == y, (c["logits_key"], j, row[0], y)
            m = lg[j * V + row[0]] - lg[j * V + row[1]]
            assert abs(m - c["margins"][j]) < 1e-5, (c["logits_key"], j, m, c["margins"][j])
            assert m > ej["margin_min"], (c["logits_key"], j, m)
            worst = min(worst, m)
    print("  %-18s %d cases (prompt lengths %s), %d new tokens each; smallest top-2 margin %.4g" % (
        "generate", len(ej["cases"]), [len(c["prompt_ids"]) for c in ej["cases"]], n_new, worst))


def verify(root, cases=None, base_root=None):
    """Check the cases named in `cases` (default: all) under root. train_tied reads the text_tied
    checkpoint and data from base_root (default root)."""
    cases = list(cases) if cases else list(ALL_CASES)
    base_root = base_root or root
    total = 0
    for dirpath, _, files in os.walk(root):
        for fn in files:
            total += os.path.getsize(os.path.join(dirpath, fn))
    print("verify %s (%.2f MB)" % (root, total / 1e6))
    ok = True
    for name in [n for n in cases if n in CASES]:
        case_dir = os.path.join(root, name)
        try:
            with open(os.path.join(case_dir, "config.json")) as f:
                cfg = json.load(f)
            tc = cfg.get("text_config", cfg)
            V = tc["vocab_size"]
            idx = os.path.join(case_dir, "model.safetensors.index.json")
            names = {}
            if os.path.exists(idx):
                with open(idx) as f:
                    index = json.load(f)
                shards = sorted(set(index["weight_map"].values()))
                total_size = 0
                for s in shards:
                    h, meta, _ = st_header(os.path.join(case_dir, s))
                    for k, e in h.items():
                        assert index["weight_map"].get(k) == s, (k, s)
                        names[k] = e
                        b, en = e["data_offsets"]
                        total_size += en - b
                assert set(index["weight_map"]) == set(names)
                assert index["metadata"]["total_size"] == total_size, (
                    index["metadata"]["total_size"], total_size)
            else:
                shards = ["model.safetensors"]
                names, meta, _ = st_header(os.path.join(case_dir, "model.safetensors"))
            dts = {}
            for k, e in names.items():
                dts[e["dtype"]] = dts.get(e["dtype"], 0) + 1
            with open(os.path.join(case_dir, "data.jsonl")) as f:
                rows = [json.loads(line) for line in f if line.strip()]
            for r in rows:
                assert len(r["input_ids"]) == len(r["labels"])
                assert all(0 <= t < V for t in r["input_ids"])
                assert all(t == -100 or 0 <= t < V for t in r["labels"])
            exp = verify_expected(case_dir, "", rows, V)
            line = "  %-18s %d shard(s), %d tensors %s, lm_head %s, mtp %d, visual %d; rows %s; " \
                   "loss %.6f over %d tokens" % (
                       name, len(shards), len(names), dts, "lm_head.weight" in names,
                       sum(k.startswith("mtp.") for k in names),
                       sum(k.startswith("model.visual.") for k in names),
                       [len(r["input_ids"]) for r in rows], exp["loss"], exp["tokens"])
            print(line)
            ad_dir = os.path.join(case_dir, "adapter")
            if os.path.isdir(ad_dir):
                with open(os.path.join(ad_dir, "adapter_config.json")) as f:
                    acfg = json.load(f)
                h, _, _ = st_header(os.path.join(ad_dir, "adapter_model.safetensors"))
                assert all(e["dtype"] == "F32" for e in h.values())
                mods = {k.rsplit(".lora_", 1)[0] for k in h}
                for m in mods:
                    a, b = h[m + ".lora_A.weight"], h[m + ".lora_B.weight"]
                    assert a["shape"][0] == acfg["r"] and b["shape"][1] == acfg["r"], m
                    w = names[m[len("base_model.model."):] + ".weight"]
                    assert [b["shape"][0], a["shape"][1]] == w["shape"], m
                exp_a = verify_expected(case_dir, "_adapter", rows, V)
                print("  %-18s adapter r=%d alpha=%s, %d modules; loss %.6f over %d tokens" % (
                    "", acfg["r"], acfg["lora_alpha"], len(mods), exp_a["loss"], exp_a["tokens"]))
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            ok = False
            print("  %s: FAILED" % name)
    for name in [n for n in cases if n not in CASES]:
        try:
            if name == "train_tied":
                verify_train(os.path.join(root, name), os.path.join(base_root, "text_tied"))
            elif name == "generate":
                verify_generate(os.path.join(root, name), os.path.join(base_root, "text_tied"))
            else:
                verify_optim(os.path.join(root, name))
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            ok = False
            print("  %s: FAILED" % name)
    print("verify: %s" % ("ok" if ok else "FAILED"))
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="folder to write the fixtures into (one subfolder per case)")
    ap.add_argument("--only", help="comma-separated cases to build (default: all of %s)" %
                    ",".join(ALL_CASES))
    ap.add_argument("--fixtures", default=DEFAULT_FIXTURES,
                    help="the committed fixtures folder: the text_tied checkpoint that train_tied "
                    "trains on (unless text_tied is built too) and the MANIFEST.json that --only "
                    "updates (default: tests/fixtures next to this script)")
    ap.add_argument("--verify", help="check an existing fixtures folder (no torch needed)")
    ap.add_argument("--diagnose", help="compare an existing fixtures folder with transformers run "
                    "strictly in float64 and with the spec forward in float64 and float32")
    a = ap.parse_args()
    if a.diagnose:
        diagnose(a.diagnose)
        return
    if a.verify:
        sys.exit(0 if verify(a.verify) else 1)
    if not a.out:
        ap.error("--out or --verify")
    only = None
    if a.only:
        only = [x.strip() for x in a.only.split(",") if x.strip()]
        bad = [x for x in only if x not in ALL_CASES]
        if bad:
            ap.error("unknown case(s) %s; known: %s" % (bad, ",".join(ALL_CASES)))
    generate(a.out, only, a.fixtures)
    if problems:
        print("%d problem(s):" % len(problems))
        for p in problems:
            print("  " + p)
        sys.exit(1)


if __name__ == "__main__":
    main()
