#!/usr/bin/env python3
"""Parameter counts of the Qwen3.5 text models as transformers builds them (on the meta device, no
memory), for the sizes of deltatune's presets; tests/test_checkpoint.c checks qwen35_param_count
against these. Run where transformers is installed: python3 tools/param_counts.py"""
import json

import torch
from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

SIZES = {  # hidden, layers, intermediate, heads, kv heads, linear key heads, linear value heads, tied
    "0.8b": (1024, 24, 3584, 8, 2, 16, 16, True),
    "2b": (2048, 24, 6144, 8, 2, 16, 16, True),
    "4b": (2560, 32, 9216, 16, 4, 16, 32, True),
    "9b": (4096, 32, 12288, 16, 4, 16, 32, False),
}

counts = {}
for name, (h, n, i, nh, nkv, lk, lv, tied) in SIZES.items():
    cfg = Qwen3_5TextConfig(vocab_size=248320, hidden_size=h, num_hidden_layers=n, intermediate_size=i,
                            num_attention_heads=nh, num_key_value_heads=nkv, head_dim=256,
                            linear_num_key_heads=lk, linear_num_value_heads=lv, linear_key_head_dim=128,
                            linear_value_head_dim=128, tie_word_embeddings=tied)
    with torch.device("meta"):
        model = Qwen3_5ForCausalLM(cfg)
    counts[name] = sum(p.numel() for p in model.parameters())  # parameters() yields tied tensors once
print(json.dumps(counts))
