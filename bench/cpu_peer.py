#!/usr/bin/env python3
"""CPU forward against Hugging Face transformers on the same machine and the same checkpoint:
the loss (a full-size correctness check) and tokens/s. Needs torch and transformers (the GPU
machine has them; torch runs on its CPU here).

    python3 bench/cpu_peer.py --model DIR --data FILE.jsonl --deltatune build/deltatune
"""
import argparse
import json
import subprocess
import time

import torch
import transformers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--deltatune", required=True)
    a = ap.parse_args()
    rows = [json.loads(l) for l in open(a.data)]
    out = subprocess.run([a.deltatune, "eval", "--model", a.model, "--data", a.data, "--batch-size", str(len(rows))],
                         capture_output=True, text=True, check=True)
    dt = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"deltatune  fp32 compute, bf16 weights: loss {dt['loss']:.6f}  {dt['tok_per_s']:.1f} tok/s  "
          f"peak {dt['peak_mem_mb']:.0f} MiB")
    for dtype in (torch.float32, torch.bfloat16):
        model = transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype).eval()
        ids = torch.tensor([r["input_ids"] for r in rows])
        with torch.no_grad():
            model(ids[:1, :16])  # warm-up
            t0 = time.time()
            logits = model(ids).logits.float()
            dt_s = time.time() - t0
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        print(f"transformers {transformers.__version__} {str(dtype)[6:]}, {torch.get_num_threads()} threads: "
              f"loss {loss.item():.6f}  {ids.numel() / dt_s:.1f} tok/s")
        del model


if __name__ == "__main__":
    main()
