"""Side-by-side encoder-decoder LoRA training throughput: ftscript vs transformers + peft on one GPU.

Both sides train one random-init Flan-T5-shaped model (gated-GELU, bf16, dropout 0.1 as Flan-T5
ships) made here by transformers, with LoRA r=8 alpha=32 dropout 0.05 on q and v (every
self- and cross-attention), AdamW lr 2e-4, clip 1.0, on batches of random sources (512 tokens,
EOS last) and targets (128 tokens), no gradient checkpointing on either side. Tokens/s counts
source and target tokens, `batch × (source + target) / median step time` after 3 warm-up steps;
peak memory is the CUDA caching allocator's `max_memory_allocated` on both sides.

usage: python3 bench/t5_bench.py large|xl [--bs 16] [--steps 10] [--ckpt] [--device cpu (with shape tiny)]
  needs target/release/ftscript (FTSCRIPT=path; LD_LIBRARY_PATH to torch/lib on the GPU machine)
"""
import argparse, json, os, random, subprocess, sys, tempfile, time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench import run_recipe  # noqa: E402

# Flan-T5's published shapes (vocabulary 32,128; 64-wide heads)
SHAPES = {
    "large": dict(d_model=1024, d_ff=2816, num_layers=24, num_heads=16),
    "xl": dict(d_model=2048, d_ff=5120, num_layers=24, num_heads=32),
    # for trying the script on a CPU (--device cpu)
    "tiny": dict(d_model=64, d_ff=96, num_layers=2, num_heads=4),
}


def make_model(shape, out, device):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration
    if os.path.exists(os.path.join(out, "config.json")):
        return
    cfg = T5Config(vocab_size=32128, d_kv=64, feed_forward_proj="gated-gelu", dropout_rate=0.1, decoder_start_token_id=0,
                   pad_token_id=0, eos_token_id=1, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(device):
        model = T5ForConditionalGeneration(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    # T5's special ids (<pad> 0, </s> 1, <unk> 2), then words `t3 … t32127` split on spaces, `</s>`
    # appended as T5's tokenizer appends it
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"t{i}": i for i in range(3, cfg.vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>").save_pretrained(out)


def batches(a, n):
    """`n` batches of (sources, targets), token ids with EOS (1) last."""
    rng = random.Random(1)
    row = lambda k: [rng.randrange(3, 32128) for _ in range(k - 1)] + [1]
    return [([row(a.src) for _ in range(a.bs)], [row(a.tgt) for _ in range(a.bs)]) for _ in range(n)]


def ftscript_run(model_dir, a, work):
    steps = a.warmup + a.steps
    data = os.path.join(work, "pairs.jsonl")
    with open(data, "w") as f:
        for src, tgt in batches(a, steps):
            for s, t in zip(src, tgt):
                f.write(json.dumps({"input": " ".join(f"t{i}" for i in s[:-1]), "target": " ".join(f"t{i}" for i in t[:-1])}) + "\n")
    out = os.path.join(work, "run")
    recipe = os.path.join(work, "bench.rhai")
    with open(recipe, "w") as f:
        f.write(f"""
let m = load_model("{model_dir}", #{{ dtype: "bf16", device: "{a.device}" }});
m.add_lora(#{{ r: 8, alpha: 32, dropout: 0.05, targets: ["q", "v"] }});
train(m, #{{ train: load_dataset("{data}"), format: "seq2seq", shuffle: false, max_length: {a.src},
    batch_size: {a.bs}, max_steps: {steps}, lr: 2e-4, scheduler: "constant", max_grad_norm: 1.0,
    precision: "bf16", gradient_checkpointing: {str(a.ckpt).lower()}, log_every: 1, output_dir: "{out}", save_every: 100000 }});
""")
    t0 = time.time()
    run_recipe(recipe)
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in l][:steps]
    elapsed = [r["elapsed_sec"] for r in rows]
    dts = sorted(b - a_ for a_, b in zip(elapsed[a.warmup:], elapsed[a.warmup + 1:]))
    med = dts[len(dts) // 2]
    return dict(peer="ftscript", step_s_median=round(med, 4), tokens_per_s=round(a.bs * (a.src + a.tgt) / med),
                peak_gib=round(max(r.get("peak_gib", 0.0) for r in rows), 2), loss=round(rows[0]["loss"], 3), wall_s=round(time.time() - t0, 1))


def peer_run(model_dir, a):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import T5ForConditionalGeneration
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    model = T5ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.bfloat16).to(dev)
    if a.ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, fused=True)
    model.train()
    times, first = [], None
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step, (src, tgt) in enumerate(batches(a, a.warmup + a.steps)):
        ids, labels = torch.tensor(src, device=dev), torch.tensor(tgt, device=dev)
        sync(); t = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(); opt.zero_grad(set_to_none=True)
        sync(); dt = time.perf_counter() - t
        first = first if first is not None else loss.item()
        if step >= a.warmup:
            times.append(dt)
    times.sort(); med = times[len(times) // 2]
    return dict(peer="hf-peft", step_s_median=round(med, 4), tokens_per_s=round(a.bs * (a.src + a.tgt) / med),
                peak_gib=round(torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else 0.0, 2), loss=round(first, 3))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("--bs", type=int, default=16); ap.add_argument("--src", type=int, default=512); ap.add_argument("--tgt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10); ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--ckpt", action="store_true", help="gradient checkpointing on both sides")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--peer-only", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    model_dir = f"/tmp/bench-t5-{a.shape}"
    if a.peer_only:
        print(json.dumps(peer_run(model_dir, a)), flush=True)
        return
    make_model(a.shape, model_dir, a.device)
    ours = ftscript_run(model_dir, a, tempfile.mkdtemp(prefix=f"bench-t5-{a.shape}-", dir="/tmp"))
    print(json.dumps(dict(ours, shape=a.shape, ckpt=a.ckpt)), flush=True)
    # the peer in its own process, so neither side's allocator sees the other's memory
    p = subprocess.run([sys.executable, __file__, a.shape, "--peer-only", "--bs", str(a.bs), "--src", str(a.src), "--tgt", str(a.tgt),
                        "--steps", str(a.steps), "--warmup", str(a.warmup), "--device", a.device] + (["--ckpt"] if a.ckpt else []), capture_output=True, text=True)
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    if p.returncode != 0 or not lines:
        print(p.stderr[-3000:], file=sys.stderr)
        raise SystemExit("the peer failed")
    peer = json.loads(lines[-1])
    print(json.dumps(peer), flush=True)
    print(f"RATIO t5-{a.shape} ckpt={a.ckpt} q+v r=8: ftscript {ours['tokens_per_s']} tok/s vs {peer['peer']} {peer['tokens_per_s']} tok/s = "
          f"{ours['tokens_per_s'] / peer['tokens_per_s']:.2f}x; loss {ours['loss']} vs {peer['loss']}; peak GiB {ours['peak_gib']} vs {peer['peak_gib']}", flush=True)


if __name__ == "__main__":
    main()
