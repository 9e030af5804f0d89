#!/usr/bin/env python3
"""Reference data for the GGUF importer (src/models/gguf.rs).

usage: gguf_reference.py GGUF_PATH OUT_DIR [--ours HF_DIR] [--no-model]

Writes into OUT_DIR:
  reference_tokens.json          {"texts": [...], "ids": [[...]], "decoded": [...]}: ids from
                                 transformers' own GGUF tokenizer conversion (no special
                                 tokens added beyond what the tokenizer's post-processor adds)
  reference_model.safetensors    F32 state dict of AutoModelForCausalLM.from_pretrained(gguf_file=...)
                                 (HF names, q/k already un-permuted by transformers)
  reference_dequant.safetensors  every GGUF tensor dequantized by gguf.quants.dequantize,
                                 under its GGUF name, shape in PyTorch order (no un-permute)
With --ours HF_DIR (a directory written by write_hf_dir) it also compares HF_DIR's
tokenizer.json (loaded with tokenizers.Tokenizer.from_file) and model.safetensors with the
references, prints a summary and exits non-zero on any mismatch.

Needs: gguf, transformers, torch, safetensors, numpy, tokenizers.
"""
import argparse
import json
import os
import sys

import numpy as np

SAMPLE_TEXTS = [
    "Hello world",
    "Hello, world! How are you today?",
    "  leading spaces and trailing   ",
    "digits 12345 and 3.14159 and 1,000,000 and 2024-01-01",
    "whitespace    runs\t\ttabs\n\nnewlines\r\nwindows\n   \n",
    "unicode: café naïve Zürich Ελληνικά русский 中文 日本語 한국어 العربية हिन्दी",
    "emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️",
    "code:\ndef f(x):\n    return x ** 2  # square\n\nfor i in range(10):\n    print(f(i))\n",
    "fn main() { let v: Vec<u8> = vec![1, 2, 3]; println!(\"{:?}\", v); }",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>",
    "URLs https://example.com/a?b=c&d=e and emails foo.bar@example.org",
    "It's, don't, we'll, they've, I'm, she'd HELLO'S",
    "",
    " ",
    "\n",
    "a" * 50 + " " + "ab" * 20,
    "mixed\u00a0nbsp\u2009thin\u3000ideographic space",
    "control \x00 \x07 chars and byte ÿ",
]


def dump(gguf_path, out_dir, with_model=True):
    import torch
    from gguf import GGUFReader
    from gguf import quants
    from safetensors.numpy import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.makedirs(out_dir, exist_ok=True)
    d, f = os.path.dirname(os.path.abspath(gguf_path)), os.path.basename(gguf_path)

    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    ids = [tok(t)["input_ids"] for t in SAMPLE_TEXTS]
    decoded = [tok.decode(i) for i in ids]
    with open(os.path.join(out_dir, "reference_tokens.json"), "w") as fh:
        json.dump({"texts": SAMPLE_TEXTS, "ids": ids, "decoded": decoded}, fh, ensure_ascii=False, indent=1)

    reader = GGUFReader(gguf_path)
    deq = {}
    for t in reader.tensors:
        arr = quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = [int(x) for x in reversed(t.shape.tolist())]
        deq[t.name] = np.ascontiguousarray(arr.reshape(shape))
    save_file(deq, os.path.join(out_dir, "reference_dequant.safetensors"))

    if with_model:
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
        sd = {k: v.detach().to(torch.float32).contiguous().numpy() for k, v in model.state_dict().items()}
        if getattr(model.config, "tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)
        save_file(sd, os.path.join(out_dir, "reference_model.safetensors"))
        with open(os.path.join(out_dir, "reference_config.json"), "w") as fh:
            fh.write(model.config.to_json_string())
    return ids


def compare(out_dir, ours_dir):
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    ok = True
    ref = json.load(open(os.path.join(out_dir, "reference_tokens.json")))
    mine = Tokenizer.from_file(os.path.join(ours_dir, "tokenizer.json"))
    n_same = 0
    for text, ids, dec in zip(ref["texts"], ref["ids"], ref["decoded"]):
        got = mine.encode(text).ids
        got_dec = mine.decode(got, skip_special_tokens=False)
        if got == ids:
            n_same += 1
        else:
            ok = False
            print(f"TOKEN MISMATCH for {text!r}:\n  ref  {ids}\n  ours {got}")
        if got_dec != dec:
            print(f"decode differs for {text!r}: ref {dec!r} ours {got_dec!r}")
    print(f"tokenizer: {n_same}/{len(ref['texts'])} texts give identical ids "
          f"({sum(len(i) for i in ref['ids'])} tokens)")

    ours = load_file(os.path.join(ours_dir, "model.safetensors"))
    ref_path = os.path.join(out_dir, "reference_model.safetensors")
    if os.path.exists(ref_path):
        refm = load_file(ref_path)
        missing = sorted(set(refm) - set(ours))
        extra = sorted(set(ours) - set(refm))
        if missing or extra:
            ok = False
            print("tensor name mismatch: missing", missing[:10], "extra", extra[:10])
        worst = 0.0
        n_exact = 0
        for k in sorted(set(refm) & set(ours)):
            a, b = refm[k], ours[k]
            if a.shape != b.shape:
                ok = False
                print(f"SHAPE MISMATCH {k}: ref {a.shape} ours {b.shape}")
                continue
            diff = float(np.max(np.abs(a - b))) if a.size else 0.0
            worst = max(worst, diff)
            n_exact += int(np.array_equal(a, b))
        print(f"model: {len(set(refm) & set(ours))} tensors compared, {n_exact} bit-identical, max |diff| = {worst:g}")
        if worst > 0:
            ok = False
    return ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("out_dir")
    ap.add_argument("--ours", help="directory written by write_hf_dir to compare against")
    ap.add_argument("--no-model", action="store_true", help="skip loading the transformers model")
    a = ap.parse_args()
    dump(a.gguf, a.out_dir, with_model=not a.no_model)
    if a.ours:
        sys.exit(0 if compare(a.out_dir, a.ours) else 1)


if __name__ == "__main__":
    main()
