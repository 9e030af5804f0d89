"""Side-by-side LoRA training throughput: ftscript vs HF transformers + peft on the same GPU.

Both sides train the same random-init Llama-, Qwen3- or Gemma-shaped model (bf16, SDPA) on full-length random
token batches with the seed recipe (LoRA r=8, alpha=32, dropout 0.05, q_proj+v_proj, AdamW,
clip 1.0), timing the median step after warm-up. The model is made once by transformers
(save_pretrained) and loaded by ftscript; hf_baseline.py (the Python peer) builds the same
shapes with the same seed.

usage: python3 bench/bench.py SHAPE [--seq 2048] [--bs 4] [--steps 12] [--no-ckpt] [--peer lora|liger|qlora|unsloth|none]
       [--auto] [--offload] [--memory-budget 14.35GiB] [--profile]
  needs target/release/ftscript (LD_LIBRARY_PATH to torch/lib on the GPU machine); --peer unsloth
  runs bench/unsloth_baseline.py (its wheels: bench/unsloth-wheels.txt), QLoRA with --quantize
"""
import argparse, json, os, subprocess, sys, tempfile, time

# the benches keep models, data and runs under /tmp: their recipes may read and write there
SANDBOX = ["--allow-read", "/tmp", "--allow-write", "/tmp"]

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from hf_baseline import SHAPES, family  # noqa: E402


def make_model(shape, out, device="cuda"):
    import torch
    if os.path.exists(os.path.join(out, "config.json")):
        return
    Config, Model, _, fields = family(shape)
    cfg = Config(**fields, max_position_embeddings=4096, torch_dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device(device):
        model = Model(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    write_tokenizer(out, cfg.vocab_size)
    # the caching allocator would keep the init's memory from the ftscript and peer processes
    del model
    if device == "cuda":
        torch.cuda.empty_cache()


def write_tokenizer(out, vocab_size):
    """A word-level tokenizer `t0 … t{V-1}` (the benches feed token ids; ftscript needs one)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                  bos_token="t1", eos_token="t2")
    tok.save_pretrained(out)


def run_recipe(recipe, writes=()):
    """`ftscript run RECIPE` (the release binary, or `FTSCRIPT`), free to read and write /tmp
    and to write the directories `writes`; exits with its output if it fails. Returns its stdout."""
    env = dict(os.environ, FTSCRIPT_LOG=os.environ.get("FTSCRIPT_LOG", "info"))
    binary = os.environ.get("FTSCRIPT", os.path.join(ROOT, "target/release/ftscript"))
    extra = [arg for d in writes for arg in ("--allow-write", d)]
    p = subprocess.run([binary, "run", *SANDBOX, *extra, recipe], env=env, capture_output=True, text=True)
    if p.returncode != 0:
        print(p.stdout[-3000:], p.stderr[-3000:], file=sys.stderr)
        raise SystemExit("ftscript failed")
    # warnings (a kernel falling back to libtorch ops, say) and the memory plan explain a number
    for line in (p.stdout + p.stderr).splitlines():
        if "WARN" in line or "ERROR" in line or "memory_budget" in line or "gradient_checkpointing auto" in line:
            print("ftscript:", line[-600:], file=sys.stderr)
    return p.stdout


def ftscript_run(model_dir, a, work):
    import random
    rng = random.Random(1)
    steps = a.warmup + a.steps
    data = os.path.join(work, "tokens.jsonl")
    with open(data, "w") as f:
        for _ in range(a.bs * steps):
            f.write(json.dumps({"input_ids": [rng.randrange(32000) for _ in range(a.seq)]}) + "\n")
    out = os.path.join(work, "run")
    # with --profile, two more steps run under libtorch's profiler, after the timed ones
    profile = f", profile: #{{ start: {steps + 1}, steps: 2 }}" if a.profile else ""
    total = steps + 2 if a.profile else steps
    ckpt = '"auto"' if a.auto or a.memory_budget else '"offload"' if a.offload else str(a.ckpt_layers) if a.ckpt_layers is not None else "false" if a.no_ckpt else "true"
    budget = f', memory_budget: "{a.memory_budget}"' if a.memory_budget else ""
    recipe = os.path.join(work, "bench.rhai")
    targets = json.dumps(a.targets.split(","))
    quant = f', quantize: "{a.quantize}", double_quant: true, compute_dtype: "bf16"' if a.quantize else ""
    with open(recipe, "w") as f:
        f.write(f"""
let m = load_model("{model_dir}", #{{ dtype: "bf16", device: "cuda"{quant} }});
m.add_lora(#{{ r: {a.r}, alpha: {a.alpha}, dropout: 0.05, targets: {targets}, use_dora: {str(a.dora).lower()} }});
let r = train(m, #{{ train: load_dataset("{data}"), format: "tokens", shuffle: false, max_length: {a.seq},
    batch_size: {a.bs}, max_steps: {total}, lr: 2e-4, scheduler: "constant", max_grad_norm: 1.0,
    precision: "bf16", gradient_checkpointing: {ckpt}, log_every: 1,
    output_dir: "{out}", save_every: 100000{budget}{profile} }});
""")
    t0 = time.time()
    run_recipe(recipe)
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in l][:steps]
    if a.profile:
        print(open(os.path.join(out, "profile", "summary.txt")).read(), file=sys.stderr, flush=True)
    elapsed = [r["elapsed_sec"] for r in rows]
    dts = sorted(b - a_ for a_, b in zip(elapsed[a.warmup:], elapsed[a.warmup + 1:]))
    med = dts[len(dts) // 2]
    peak = round(max(r.get("peak_gib", 0.0) for r in rows), 2)
    return dict(peer="ftscript", step_s_median=round(med, 4), tokens_per_s=round(a.bs * a.seq / med),
                peak_gib=peak, loss=round(rows[0]["loss"], 3), wall_s=round(time.time() - t0, 1))


H200_BF16_FLOPS = 989.4e12  # dense bf16 tensor-core peak of the H200 SXM


def base_params(shape):
    """Weights of the shape (the output head counted apart from the embeddings), dense whatever
    the storage (4-bit included)."""
    h, i, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    head_dim = shape.get("head_dim", h // shape["num_attention_heads"])
    q, kv = shape["num_attention_heads"] * head_dim, shape["num_key_value_heads"] * head_dim
    per_layer = 2 * h * q + 2 * h * kv + 3 * h * i + 2 * h
    return 2 * shape["vocab_size"] * h + layers * per_layer + h


def useful_flops_per_token(nparams, shape, seq):
    """The work a LoRA step must do per token, whatever the implementation: forward 2N and the
    activation gradients 2N through the frozen weights (no recomputation counted), plus causal
    attention's QKᵀ and AV forward and backward (2.5× the forward)."""
    attn_fwd = 2 * 2 * shape["num_hidden_layers"] * seq * shape["hidden_size"] / 2
    return 2 * 2 * nparams + 3.5 * attn_fwd


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shape")
    ap.add_argument("--seq", type=int, default=2048); ap.add_argument("--bs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12); ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-ckpt", action="store_true"); ap.add_argument("--targets", default="q_proj,v_proj")
    ap.add_argument("--r", type=int, default=8); ap.add_argument("--alpha", type=int, default=32)
    ap.add_argument("--peer", default="lora")
    ap.add_argument("--dora", action="store_true", help="DoRA adapters on both sides")
    ap.add_argument("--quantize", default=None, help="nf4 | fp4: QLoRA on a 4-bit base (use with --peer qlora)")
    ap.add_argument("--auto", action="store_true", help='ftscript decides (gradient_checkpointing: "auto")')
    ap.add_argument("--profile", action="store_true", help="profile two more ftscript steps; print the summary")
    ap.add_argument("--offload", action="store_true", help='ftscript keeps checkpoints in host memory (gradient_checkpointing: "offload")')
    ap.add_argument("--ckpt-layers", type=int, default=None, help="ftscript checkpoints only the first N layers (gradient_checkpointing: N)")
    ap.add_argument("--memory-budget", default=None, help='ftscript fits this budget (memory_budget: "14.35GiB"; checkpointing chosen to fit)')
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix=f"bench-{a.shape}-", dir="/tmp")
    model_dir = f"/tmp/bench-model-{a.shape}"
    make_model(a.shape, model_dir)
    ours = ftscript_run(model_dir, a, work)
    ckpt = f"budget {a.memory_budget}" if a.memory_budget else "auto" if a.auto else "offload" if a.offload else f"first {a.ckpt_layers}" if a.ckpt_layers is not None else not a.no_ckpt
    print(json.dumps(dict(ours, shape=a.shape, ckpt=ckpt, targets=a.targets, r=a.r, dora=a.dora)), flush=True)
    if a.peer != "none":
        if a.peer == "unsloth":
            mode = "qlora" if a.quantize else "lora"
            args = [sys.executable, os.path.join(HERE, "unsloth_baseline.py"), a.shape, mode, "--model-dir", f"/tmp/unsloth-model-{a.shape}"]
        else:
            args = [sys.executable, os.path.join(HERE, "hf_baseline.py"), a.shape, a.peer]
        args += ["--seq", str(a.seq), "--bs", str(a.bs), "--steps", str(a.steps), "--targets", a.targets, "--r", str(a.r), "--alpha", str(a.alpha)]
        if a.no_ckpt:
            args.append("--no-ckpt")
        if a.dora:
            args.append("--dora")
        p = subprocess.run(args, capture_output=True, text=True)
        peer = json.loads([l for l in p.stdout.splitlines() if l.startswith("{")][-1]) if p.returncode == 0 else None
        if peer is None:
            print(p.stderr[-2000:], file=sys.stderr)
        else:
            print(json.dumps(peer), flush=True)
            mfu = lambda tok_s: tok_s * useful_flops_per_token(base_params(SHAPES[a.shape]), SHAPES[a.shape], a.seq) / H200_BF16_FLOPS
            print(f"RATIO {a.shape} ckpt={ckpt} {a.targets} r={a.r}{' DoRA' if a.dora else ''}: ftscript {ours['tokens_per_s']} tok/s "
                  f"vs {peer['peer']} {peer['tokens_per_s']} tok/s = {ours['tokens_per_s'] / peer['tokens_per_s']:.2f}x; "
                  f"MFU {mfu(ours['tokens_per_s']):.1%} vs {mfu(peer['tokens_per_s']):.1%}; "
                  f"loss {ours['loss']} vs {peer['loss']}; peak GiB {ours['peak_gib']} vs {peer['peak_gib']}", flush=True)


if __name__ == "__main__":
    main()
