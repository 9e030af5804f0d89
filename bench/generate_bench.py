"""Generation throughput: ftscript vs transformers + peft `generate`, side by side on one GPU.

Both sides load one random-init model (bench.py's shapes), attach a LoRA adapter (r=16 on
q/k/v/o, B drawn at random so it is not a no-op) unmerged, and decode greedily `--new` tokens
after each of `--prompts` prompts of `--prompt-len` tokens, `--batch` prompts at a time.
transformers is held to `--new` tokens a row (`min_new_tokens`); ftscript's rows stop at EOS, and
the tokens it did generate are counted. Tokens/s is generated tokens over the wall time of the
generation calls (after one warm-up call on each side).

usage: python3 bench/generate_bench.py [SHAPE] [--batch 1] [--prompts 8] [--prompt-len 128] [--new 128] [--no-peer]
                                        [--profile DIR]
  --profile: after the timed calls, ftscript generates one batch again with `profile: DIR` and the
  summary of where the GPU's time went is printed (bench/trace_gaps.py reads DIR/trace.json)
  needs target/release/ftscript (FTSCRIPT=path; LD_LIBRARY_PATH to torch/lib on the GPU machine)
"""
import argparse, json, os, random, sys, tempfile, time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench import make_model, run_recipe  # noqa: E402
from dpo_bench import peer_json, words_tokenizer  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def prompts(a):
    rng = random.Random(2)
    return [" ".join(f"t{rng.randrange(3, 32000)}" for _ in range(a.prompt_len)) for _ in range(a.prompts)]


def adapter(model_dir, out):
    """A peft adapter with random B, saved for both sides."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    model.save_pretrained(out)


def ftscript_run(model_dir, adapter_dir, a, work):
    recipe = os.path.join(work, "gen.rhai")
    with open(recipe, "w") as f:
        f.write(f"""
let m = load_model("{model_dir}", #{{ dtype: "bf16", device: "cuda" }});
m.load_adapter("{adapter_dir}");
let prompts = {json.dumps(prompts(a))};
let opts = #{{ max_new_tokens: {a.new}, batch_size: {a.batch} }};
m.generate(prompts.extract(0, {a.batch}), opts);
let t0 = timestamp();
let out = m.generate(prompts, opts);
let secs = t0.elapsed;
let tokens = 0;
for o in out {{ tokens += o.split(" ").len(); }}
print(`RESULT ${{secs}} ${{tokens}}`);
""")
        if a.profile:
            f.write(f'm.generate(prompts.extract(0, {a.batch}), opts + #{{ profile: "{a.profile}" }});\n')
    stdout = run_recipe(recipe, [a.profile] if a.profile else [])
    _, secs, tokens = [l for l in stdout.splitlines() if l.startswith("RESULT")][-1].split()
    secs, tokens = float(secs), int(tokens)
    # a row that met EOS early would make the number look better than it is: say so
    return dict(peer="ftscript", batch=a.batch, seconds=round(secs, 3), tokens=tokens, tokens_per_s=round(tokens / secs, 1))


def hf_run(model_dir, adapter_dir, a):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
    model = PeftModel.from_pretrained(model, adapter_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    texts = prompts(a)

    def run(batch_texts):
        enc = tok(batch_texts, return_tensors="pt", padding=True).to("cuda")
        with torch.no_grad():
            return model.generate(**enc, max_new_tokens=a.new, min_new_tokens=a.new, do_sample=False, pad_token_id=tok.pad_token_id)

    run(texts[:a.batch])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(0, len(texts), a.batch):
        run(texts[i:i + a.batch])
    torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    tokens = a.prompts * a.new
    return dict(peer="transformers+peft", batch=a.batch, seconds=round(secs, 3), tokens=tokens, tokens_per_s=round(tokens / secs, 1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shape", nargs="?", default="1b")
    ap.add_argument("--batch", type=int, default=1); ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128); ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--no-peer", action="store_true", help="ftscript alone (to compare two builds: FTSCRIPT=path)")
    ap.add_argument("--peer-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--profile", help="a directory for a profile of one more batch on ftscript's side")
    a = ap.parse_args()
    if a.profile:
        a.profile = os.path.abspath(a.profile)
    model_dir = f"/tmp/gen-model-{a.shape}"
    adapter_dir = os.path.join(model_dir, "adapter")
    if a.peer_only:
        print(json.dumps(hf_run(model_dir, adapter_dir, a)), flush=True)
        return
    make_model(a.shape, model_dir)
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    words_tokenizer(model_dir, cfg["vocab_size"])
    if not os.path.exists(adapter_dir):
        adapter(model_dir, adapter_dir)
    work = tempfile.mkdtemp(prefix="gen-bench-", dir="/tmp")
    ours = ftscript_run(model_dir, adapter_dir, a, work)
    print(json.dumps(ours), flush=True)
    if a.profile:
        print(open(os.path.join(a.profile, "summary.txt")).read(), flush=True)
    peer = None if a.no_peer else peer_json(__file__, [a.shape, "--batch", str(a.batch), "--prompts", str(a.prompts), "--prompt-len", str(a.prompt_len), "--new", str(a.new)],
                     "transformers")
    if peer:
        print(json.dumps(peer), flush=True)
        print(f"RATIO generate {a.shape} batch {a.batch}: ftscript {ours['tokens_per_s']} tok/s vs transformers+peft {peer['tokens_per_s']} = "
              f"{ours['tokens_per_s'] / peer['tokens_per_s']:.2f}x", flush=True)
    if a.batch == 1:
        # batch-1 decoding reads every weight once a token: the memory-bandwidth limit
        import torch
        weights = sum(os.path.getsize(os.path.join(model_dir, f)) for f in os.listdir(model_dir) if f.endswith(".safetensors"))
        name = torch.cuda.get_device_name()
        bandwidth = 4.8e12 if "H200" in name else 3.35e12 if "H100" in name else None
        if bandwidth:
            limit = bandwidth / weights
            theirs = f", transformers+peft at {100 * peer['tokens_per_s'] / limit:.1f}%" if peer else ""
            print(f"BANDWIDTH {a.shape} on {name}: {weights / 1e9:.2f} GB of weights a token at {bandwidth / 1e12:.2f} TB/s: limit {limit:.0f} tok/s; "
                  f"ftscript at {100 * ours['tokens_per_s'] / limit:.1f}%{theirs}", flush=True)


if __name__ == "__main__":
    main()
