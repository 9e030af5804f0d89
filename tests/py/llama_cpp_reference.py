#!/usr/bin/env python3
"""Real llama.cpp as the reference for the GGUF exporter (src/gguf/export.rs, src/gguf/write.rs).

Two llama.cpp pieces, both from PyPI (scripts/setup.sh installs them):
  converter  llama.cpp's own convert_hf_to_gguf.py / convert_lora_to_gguf.py with their gguf-py,
             extracted from the llama-cpp-python 0.3.36 sdist (ggml-org/llama.cpp@0c1e57098) into
             .venv/llama.cpp-convert (override: LLAMA_CPP_CONVERT=DIR)
  runtime    libllama build b11739 (commit 0ce8cd114) of llama-cpp-py-sync, driven through its
             low-level CFFI functions (CPU only, llama.cpp's logging silenced)

usage: llama_cpp_reference.py convert HF_DIR OUT.gguf [--outtype f16|f32|q8_0|bf16]
       llama_cpp_reference.py convert-lora ADAPTER_DIR BASE_HF_DIR OUT.gguf [--outtype f16|f32|q8_0|bf16]
       llama_cpp_reference.py quantize IN.gguf OUT.gguf FTYPE [--allow-requantize]   (q4_k_m, q5_k_m, q6_k, q8_0, q4_0, ...)
       llama_cpp_reference.py dump GGUF [--hash] [--out PATH]
       llama_cpp_reference.py logits GGUF IDS_JSON [--lora ADAPTER.gguf [--scale S]] [--kv-type f16|f32] [--out PATH]
       llama_cpp_reference.py greedy GGUF IDS_JSON N [--lora ADAPTER.gguf [--scale S]] [--kv-type f16|f32]
                              [--stop-at-eog] [--out PATH]
       llama_cpp_reference.py tokenize GGUF TEXT_JSON [--no-add-special] [--no-parse-special] [--out PATH]
       llama_cpp_reference.py detokenize GGUF IDS_JSON [--remove-special] [--no-unparse-special] [--out PATH]
       llama_cpp_reference.py chat GGUF CHATS_JSON [--no-add-ass] [--out PATH]
       llama_cpp_reference.py hf-logits HF_DIR IDS_JSON [--out PATH]

IDS_JSON, TEXT_JSON and CHATS_JSON are either a path to a JSON file or the JSON text itself.
Every command prints one JSON document to stdout, or writes it to --out PATH (with --out *.npy,
`logits` and `hf-logits` write the float32 array [n_tokens, n_vocab] instead).

  convert     runs the converter (subprocess, its own gguf-py first on PYTHONPATH);
              prints {"out", "outtype"}
  convert-lora  runs convert_lora_to_gguf.py on a PEFT adapter dir (adapter_config.json +
              adapter_model.safetensors) with --base BASE_HF_DIR; prints {"out", "outtype"}
  quantize    llama_model_quantize (llama-quantize's library call) with the ftype; prints
              {"out", "ftype", "ftype_id"}
  dump        gguf.GGUFReader: {"version", "alignment", "data_offset",
              "kv": {key: {"type": "UINT32", "value": 30}}       (arrays: {"type": "ARRAY",
                     "item_type": "STRING", "value": [...]}, full lists, strings decoded),
              "kv_order": [...], "tensors": [{"name", "shape" (GGUF ne order), "type", "offset"
              (relative to the data section), "n_bytes", "sha256" (with --hash)}]}
  logits      one llama_decode of all the ids (one sequence, positions 0..n-1, logits for every
              position, 1 thread, flash attention off, KV cache f16 unless --kv-type f32):
              {"logits": [[...], ...]} (float32)
  greedy      decodes the prompt ids then N tokens by argmax of the logits (no sampler);
              {"tokens": [new ids], "text": detokenized new ids}; --stop-at-eog stops at the first
              end-of-generation token (llama_vocab_is_eog; SmolLM2: ids 0, 2 and 4) and leaves it
              out, as generate_ids does; --lora applies a GGUF LoRA adapter
              (llama_adapter_lora_init + llama_set_adapters_lora) at --scale (default 1.0)
  tokenize    llama_tokenize (add_special and parse_special on unless turned off); a TEXT_JSON
              string gives {"ids": [...]}, a list of strings {"ids": [[...], ...]}
  detokenize  llama_detokenize (remove_special off, unparse_special on unless changed); ids or a
              list of id lists -> {"text": ...}
  chat        for each conversation ([{"role", "content"}, ...]) the prompt llama.cpp renders
              from the GGUF's own tokenizer.chat_template (llama_model_chat_template +
              llama_chat_apply_template, add_ass on): a JSON list of strings. Note that
              llama_chat_apply_template does not run Jinja: it recognises the template by
              its markers (ChatML for "<|im_start|>") and renders its own built-in format
  hf-logits   transformers' F32 logits of the ids on an HF directory (the same shape as logits)

Needs: gguf, numpy, cffi + llama-cpp-py-sync (runtime commands); torch, transformers,
sentencepiece, safetensors (convert, convert-lora, hf-logits). On glibc < 2.38 (Debian 12) the
llama-cpp-py-sync libraries load only after scripts/setup.sh has rebound their four glibc-2.38
symbols (__isoc23_strtol & co.) to the classic ones.
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
CONVERT_DIR = os.environ.get("LLAMA_CPP_CONVERT", os.path.join(ROOT, ".venv", "llama.cpp-convert"))
OUTTYPES = ("f16", "f32", "q8_0", "bf16")


def load_json_arg(arg):
    """A path to a JSON file, or JSON text."""
    if os.path.isfile(arg):
        with open(arg, encoding="utf-8") as f:
            return json.load(f)
    return json.loads(arg)


def emit(obj, out=None):
    text = json.dumps(obj, ensure_ascii=False)
    if out:
        with open(out, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text + "\n")


# ---------------------------------------------------------------- converter

def run_converter(script, args):
    if not os.path.isfile(os.path.join(CONVERT_DIR, script)):
        sys.exit(f"{script} not found under {CONVERT_DIR}: run scripts/setup.sh")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.join(CONVERT_DIR, "gguf-py"), CONVERT_DIR] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    p = subprocess.run([sys.executable, os.path.join(CONVERT_DIR, script)] + args, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if p.returncode != 0:
        sys.stderr.write(p.stdout[-20000:])
        sys.exit(f"{script} failed with exit code {p.returncode}")


def cmd_convert(a):
    run_converter("convert_hf_to_gguf.py", [a.hf_dir, "--outtype", a.outtype, "--outfile", a.out_gguf])
    emit({"out": a.out_gguf, "outtype": a.outtype})


def cmd_convert_lora(a):
    run_converter("convert_lora_to_gguf.py",
                  ["--base", a.base_hf_dir, "--outtype", a.outtype, "--outfile", a.out_gguf, a.adapter_dir])
    emit({"out": a.out_gguf, "outtype": a.outtype})


# ---------------------------------------------------------------- GGUFReader dump

def field_value(field):
    from gguf import GGUFValueType

    def scalar(vtype, part):
        if vtype == GGUFValueType.STRING:
            return bytes(part).decode("utf-8", errors="replace")
        v = part.tolist()[0]
        if vtype == GGUFValueType.BOOL:
            return bool(v)
        return v

    vtype = field.types[0]
    if vtype == GGUFValueType.ARRAY:
        item = field.types[1] if len(field.types) > 1 else None
        values = [scalar(item, field.parts[i]) for i in field.data] if item is not None else []
        return {"type": "ARRAY", "item_type": item.name if item is not None else None, "value": values}
    return {"type": vtype.name, "value": scalar(vtype, field.parts[field.data[0]])}


def cmd_dump(a):
    from gguf import GGUFReader

    r = GGUFReader(a.gguf, "r")
    kv, order = {}, []
    for name, field in r.fields.items():
        if name.startswith("GGUF."):
            continue
        kv[name] = field_value(field)
        order.append(name)
    tensors = []
    for t in r.tensors:
        d = {"name": t.name, "shape": [int(x) for x in t.shape], "type": t.tensor_type.name,
             "offset": int(t.data_offset - r.data_offset), "n_bytes": int(t.n_bytes)}
        if a.hash:
            d["sha256"] = hashlib.sha256(np.ascontiguousarray(t.data).view(np.uint8).tobytes()).hexdigest()
        tensors.append(d)
    version = int(r.fields["GGUF.version"].parts[-1][0])
    emit({"version": version, "alignment": int(r.alignment), "data_offset": int(r.data_offset),
          "kv": kv, "kv_order": order, "tensors": tensors}, a.out)


# ---------------------------------------------------------------- libllama through CFFI

_LIB = None
_KEEP = []  # CFFI callbacks that must outlive their registration


def llama():
    """(lib, ffi) of llama-cpp-py-sync's libllama, backend initialised, logging silenced."""
    global _LIB
    if _LIB is None:
        from llama_cpp_py_sync._cffi_bindings import get_ffi, get_lib
        try:
            lib, ffi = get_lib(), get_ffi()
        except RuntimeError as e:
            sys.exit(f"{e}\n(on glibc < 2.38 run scripts/setup.sh: it rebinds the libraries' glibc 2.38 symbols)")
        if not os.environ.get("LLAMA_CPP_REFERENCE_VERBOSE"):
            @ffi.callback("void(enum ggml_log_level, const char *, void *)")
            def quiet(level, text, user_data):
                pass
            _KEEP.append(quiet)
            lib.llama_log_set(quiet, ffi.NULL)
        lib.llama_backend_init()
        _LIB = (lib, ffi)
    return _LIB


class Model:
    def __init__(self, path, vocab_only=False):
        lib, ffi = llama()
        self.lib, self.ffi = lib, ffi
        mp = lib.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.vocab_only = vocab_only
        self.model = lib.llama_model_load_from_file(os.fsencode(path), mp)
        if self.model == ffi.NULL:
            sys.exit(f"llama.cpp could not load {path} (LLAMA_CPP_REFERENCE_VERBOSE=1 shows its log)")
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.ctx = None
        self.adapters = []

    def context(self, n_ctx, n_batch, threads=1, lora=None, scale=1.0, kv_type="f16"):
        lib, ffi = self.lib, self.ffi
        cp = lib.llama_context_default_params()
        cp.type_k = cp.type_v = getattr(lib, "GGML_TYPE_" + kv_type.upper())
        cp.n_ctx = n_ctx
        cp.n_batch = n_batch
        cp.n_ubatch = n_batch
        cp.n_seq_max = 1
        cp.n_threads = threads
        cp.n_threads_batch = threads
        cp.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.no_perf = True
        self.ctx = lib.llama_init_from_model(self.model, cp)
        if self.ctx == ffi.NULL:
            sys.exit("llama_init_from_model failed")
        if lora:
            adapter = lib.llama_adapter_lora_init(self.model, os.fsencode(lora))
            if adapter == ffi.NULL:
                sys.exit(f"llama_adapter_lora_init could not load {lora}")
            self.adapters.append(adapter)
            arr = ffi.new("struct llama_adapter_lora *[1]", [adapter])
            scales = ffi.new("float[1]", [scale])
            if lib.llama_set_adapters_lora(self.ctx, arr, 1, scales) != 0:
                sys.exit("llama_set_adapters_lora failed")
        return self.ctx

    def decode(self, ids, pos0, all_logits):
        """Decodes ids at positions pos0.. in one batch; returns the float32 logits [n_out, n_vocab]."""
        lib, ffi = self.lib, self.ffi
        n = len(ids)
        batch = lib.llama_batch_init(n, 0, 1)
        try:
            for i, t in enumerate(ids):
                batch.token[i] = int(t)
                batch.pos[i] = pos0 + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1 if (all_logits or i == n - 1) else 0
            batch.n_tokens = n
            rc = lib.llama_decode(self.ctx, batch)
            if rc != 0:
                sys.exit(f"llama_decode failed: {rc}")
            rows = range(n) if all_logits else [n - 1]
            out = np.empty((len(rows), self.n_vocab), dtype=np.float32)
            for k, i in enumerate(rows):
                p = lib.llama_get_logits_ith(self.ctx, i)
                out[k] = np.frombuffer(ffi.buffer(p, self.n_vocab * 4), dtype=np.float32)
            return out
        finally:
            lib.llama_batch_free(batch)

    def is_eog(self, t):
        return bool(self.lib.llama_vocab_is_eog(self.vocab, int(t)))

    def tokenize(self, text, add_special, parse_special):
        lib, ffi = self.lib, self.ffi
        b = text.encode("utf-8")
        cap = len(b) + 16
        buf = ffi.new("llama_token[]", cap)
        n = lib.llama_tokenize(self.vocab, b, len(b), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = ffi.new("llama_token[]", cap)
            n = lib.llama_tokenize(self.vocab, b, len(b), buf, cap, add_special, parse_special)
        if n < 0:
            sys.exit(f"llama_tokenize failed: {n}")
        return [int(buf[i]) for i in range(n)]

    def detokenize(self, ids, remove_special=False, unparse_special=True):
        lib, ffi = self.lib, self.ffi
        toks = ffi.new("llama_token[]", [int(t) for t in ids] or [0])
        cap = 64 + 32 * len(ids)
        buf = ffi.new("char[]", cap)
        n = lib.llama_detokenize(self.vocab, toks, len(ids), buf, cap, remove_special, unparse_special)
        if n < 0:
            cap = -n + 1
            buf = ffi.new("char[]", cap)
            n = lib.llama_detokenize(self.vocab, toks, len(ids), buf, cap, remove_special, unparse_special)
        if n < 0:
            sys.exit(f"llama_detokenize failed: {n}")
        return ffi.buffer(buf, n)[:].decode("utf-8", errors="replace")

    def chat_template(self):
        p = self.lib.llama_model_chat_template(self.model, self.ffi.NULL)
        return None if p == self.ffi.NULL else self.ffi.string(p).decode("utf-8")

    def close(self):
        if self.ctx is not None:
            self.lib.llama_free(self.ctx)
            self.ctx = None
        for adapter in self.adapters:
            self.lib.llama_adapter_lora_free(adapter)
        self.adapters = []
        self.lib.llama_model_free(self.model)


def write_logits(arr, out):
    if out and out.endswith(".npy"):
        np.save(out, arr.astype(np.float32))
    else:
        emit({"logits": arr.astype(np.float32).tolist()}, out)


def cmd_logits(a):
    ids = [int(t) for t in load_json_arg(a.ids_json)]
    m = Model(a.gguf)
    m.context(n_ctx=max(len(ids), 64), n_batch=max(len(ids), 1), threads=a.threads, lora=a.lora, scale=a.scale,
              kv_type=a.kv_type)
    out = m.decode(ids, 0, all_logits=True)
    m.close()
    write_logits(out, a.out)


def cmd_greedy(a):
    ids = [int(t) for t in load_json_arg(a.ids_json)]
    n_new = int(a.n)
    m = Model(a.gguf)
    m.context(n_ctx=len(ids) + n_new + 8, n_batch=max(len(ids), 1), threads=a.threads, lora=a.lora, scale=a.scale,
              kv_type=a.kv_type)
    new = []
    logits = m.decode(ids, 0, all_logits=False)[-1]
    pos = len(ids)
    while len(new) < n_new:
        t = int(np.argmax(logits))
        if a.stop_at_eog and m.is_eog(t):
            break
        new.append(t)
        if len(new) == n_new:
            break
        logits = m.decode([t], pos, all_logits=False)[-1]
        pos += 1
    text = m.detokenize(new, remove_special=False, unparse_special=True)
    m.close()
    emit({"tokens": new, "text": text}, a.out)


def cmd_tokenize(a):
    texts = load_json_arg(a.text_json)
    m = Model(a.gguf, vocab_only=True)
    tok = lambda s: m.tokenize(s, not a.no_add_special, not a.no_parse_special)
    ids = tok(texts) if isinstance(texts, str) else [tok(s) for s in texts]
    m.close()
    emit({"ids": ids}, a.out)


def cmd_detokenize(a):
    ids = load_json_arg(a.ids_json)
    m = Model(a.gguf, vocab_only=True)
    detok = lambda row: m.detokenize(row, a.remove_special, not a.no_unparse_special)
    text = detok(ids) if not ids or not isinstance(ids[0], list) else [detok(r) for r in ids]
    m.close()
    emit({"text": text}, a.out)


def cmd_chat(a):
    chats = load_json_arg(a.chats_json)
    m = Model(a.gguf, vocab_only=True)
    lib, ffi = m.lib, m.ffi
    tmpl = m.chat_template()
    if tmpl is None:
        sys.exit(f"{a.gguf} has no tokenizer.chat_template")
    tmpl_c = ffi.new("char[]", tmpl.encode("utf-8"))
    prompts = []
    for chat in chats:
        keep = []
        msgs = ffi.new("llama_chat_message[]", max(len(chat), 1))
        for i, msg in enumerate(chat):
            role = ffi.new("char[]", msg["role"].encode("utf-8"))
            content = ffi.new("char[]", msg["content"].encode("utf-8"))
            keep += [role, content]
            msgs[i].role = role
            msgs[i].content = content
        cap = 1024 + 2 * sum(len(x["content"].encode("utf-8")) + len(x["role"]) for x in chat)
        buf = ffi.new("char[]", cap)
        n = lib.llama_chat_apply_template(tmpl_c, msgs, len(chat), not a.no_add_ass, buf, cap)
        if n > cap:
            cap = n + 1
            buf = ffi.new("char[]", cap)
            n = lib.llama_chat_apply_template(tmpl_c, msgs, len(chat), not a.no_add_ass, buf, cap)
        if n < 0:
            sys.exit(f"llama_chat_apply_template does not support this template ({n})")
        prompts.append(ffi.buffer(buf, n)[:].decode("utf-8"))
    m.close()
    emit(prompts, a.out)


def ftype_id(name):
    lib, _ = llama()
    key = name.upper()
    for cand in ("LLAMA_FTYPE_MOSTLY_" + key, "LLAMA_FTYPE_ALL_" + key, "LLAMA_FTYPE_" + key):
        if hasattr(lib, cand):
            return int(getattr(lib, cand))
    sys.exit(f"unknown ftype {name}")


def cmd_quantize(a):
    lib, ffi = llama()
    ft = ftype_id(a.ftype)
    qp = ffi.new("llama_model_quantize_params *", lib.llama_model_quantize_default_params())
    qp.ftype = ft
    qp.nthread = a.threads
    qp.allow_requantize = a.allow_requantize
    rc = lib.llama_model_quantize(os.fsencode(a.in_gguf), os.fsencode(a.out_gguf), qp)
    if rc != 0:
        sys.exit(f"llama_model_quantize failed: {rc} (LLAMA_CPP_REFERENCE_VERBOSE=1 shows its log)")
    emit({"out": a.out_gguf, "ftype": a.ftype, "ftype_id": ft})


def cmd_hf_logits(a):
    import torch
    from transformers import AutoModelForCausalLM

    ids = [int(t) for t in load_json_arg(a.ids_json)]
    model = AutoModelForCausalLM.from_pretrained(a.hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    write_logits(out, a.out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("convert")
    p.add_argument("hf_dir")
    p.add_argument("out_gguf")
    p.add_argument("--outtype", default="f16", choices=OUTTYPES)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("convert-lora")
    p.add_argument("adapter_dir")
    p.add_argument("base_hf_dir")
    p.add_argument("out_gguf")
    p.add_argument("--outtype", default="f16", choices=OUTTYPES)
    p.set_defaults(func=cmd_convert_lora)

    p = sub.add_parser("quantize")
    p.add_argument("in_gguf")
    p.add_argument("out_gguf")
    p.add_argument("ftype")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--allow-requantize", action="store_true", help="accept an already quantized input")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("dump")
    p.add_argument("gguf")
    p.add_argument("--hash", action="store_true", help="sha256 of each tensor's bytes")
    p.add_argument("--out")
    p.set_defaults(func=cmd_dump)

    for name, func in (("logits", cmd_logits), ("greedy", cmd_greedy)):
        p = sub.add_parser(name)
        p.add_argument("gguf")
        p.add_argument("ids_json")
        if name == "greedy":
            p.add_argument("n")
            p.add_argument("--stop-at-eog", action="store_true")
        p.add_argument("--lora")
        p.add_argument("--scale", type=float, default=1.0)
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--kv-type", default="f16", choices=("f16", "f32"),
                       help="KV cache type (llama.cpp's default f16; f32 for tighter comparisons)")
        p.add_argument("--out")
        p.set_defaults(func=func)

    p = sub.add_parser("tokenize")
    p.add_argument("gguf")
    p.add_argument("text_json")
    p.add_argument("--no-add-special", action="store_true")
    p.add_argument("--no-parse-special", action="store_true")
    p.add_argument("--out")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("detokenize")
    p.add_argument("gguf")
    p.add_argument("ids_json")
    p.add_argument("--remove-special", action="store_true")
    p.add_argument("--no-unparse-special", action="store_true")
    p.add_argument("--out")
    p.set_defaults(func=cmd_detokenize)

    p = sub.add_parser("chat")
    p.add_argument("gguf")
    p.add_argument("chats_json")
    p.add_argument("--no-add-ass", action="store_true")
    p.add_argument("--out")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("hf-logits")
    p.add_argument("hf_dir")
    p.add_argument("ids_json")
    p.add_argument("--out")
    p.set_defaults(func=cmd_hf_logits)

    a = ap.parse_args()
    a.func(a)


if __name__ == "__main__":
    main()
