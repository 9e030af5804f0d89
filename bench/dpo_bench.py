"""DPO throughput: ftscript vs TRL's DPOTrainer (+ peft) on the same GPU, side by side.

Both sides train DPO (sigmoid loss, beta 0.1) with LoRA r=8 alpha=32 dropout 0.05 on q_proj+v_proj
of one random-init model (bench.py's shapes, made once by transformers), bf16, the reference being
the model with its adapters disabled, on the same records: a prompt of `--prompt` tokens and
chosen and rejected completions of `--response` tokens each (the last one EOS), `--pairs` pairs a
step. Words `t<id>` make a whitespace word-level tokenizer give the same ids on both sides.
Pairs/s is `pairs / median step time` after the warm-up steps; peak memory is the CUDA caching
allocator's `max_memory_allocated`, reset when training starts.

usage: python3 bench/dpo_bench.py [SHAPE] [--prompt 512] [--response 512] [--pairs 4] [--steps 8]
       [--warmup 3] [--no-ckpt] [--precompute] [--peer trl|none] [--profile]
  needs target/release/ftscript (FTSCRIPT=path; LD_LIBRARY_PATH to torch/lib on the GPU machine)
  and trl (with datasets) importable
"""
import argparse, json, os, random, subprocess, sys, tempfile, time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench import make_model, run_recipe  # noqa: E402

LORA = dict(r=8, alpha=32, dropout=0.05, targets=["q_proj", "v_proj"])


def words_tokenizer(out, vocab_size):
    """`t0 … t{V-1}`, one word one token, split on whitespace; BOS t1, EOS t2, pad t0, each matched
    only as a whole word (else `t12546` would be read as BOS and an unknown `2546`)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    word = lambda s: AddedToken(s, single_word=True, special=True)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=word("t1"), eos_token=word("t2"), pad_token=word("t0")).save_pretrained(out)


def records(a, n, path):
    rng = random.Random(1)
    text = lambda k: " ".join(f"t{rng.randrange(3, 32000)}" for _ in range(k))
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": text(a.prompt), "chosen": " " + text(a.response - 1) + " t2",
                                "rejected": " " + text(a.response - 1) + " t2"}) + "\n")


def peer_json(script, args, what):
    """Runs the Python peer, `script ARGS --peer-only`, in its own process (so neither side's
    allocator state touches the other's); returns the JSON line it prints last."""
    p = subprocess.run([sys.executable, os.path.abspath(script)] + args + ["--peer-only"], capture_output=True, text=True)
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    if p.returncode != 0 or not lines:
        print(p.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"the {what} peer failed")
    return json.loads(lines[-1])


def median_step(elapsed, warmup):
    steps = sorted(b - a for a, b in zip(elapsed[warmup:], elapsed[warmup + 1:]))
    return steps[len(steps) // 2]


def ftscript_run(model_dir, data, a, work):
    out = os.path.join(work, "run")
    recipe = os.path.join(work, "dpo.rhai")
    steps = a.warmup + a.steps
    # with --profile, two more steps run under libtorch's profiler, after the timed ones
    profile = f", profile: #{{ start: {steps + 1}, steps: 2 }}" if a.profile else ""
    with open(recipe, "w") as f:
        f.write(f"""
let m = load_model("{model_dir}", #{{ dtype: "bf16", device: "cuda" }});
m.add_lora(#{{ r: {LORA['r']}, alpha: {LORA['alpha']}, dropout: {LORA['dropout']}, targets: {json.dumps(LORA['targets'])} }});
train(m, #{{ train: load_dataset("{data}"), objective: "dpo", beta: 0.1, shuffle: false,
    max_length: {a.prompt + a.response}, batch_size: {a.pairs}, max_steps: {steps + 2 if a.profile else steps}, lr: 2e-4,
    scheduler: "constant", max_grad_norm: 1.0, precision: "bf16", gradient_checkpointing: {"false" if a.no_ckpt else "true"},
    precompute_ref_log_probs: {"true" if a.precompute else "false"}, log_every: 1, output_dir: "{out}", save_every: 100000{profile} }});
""")
    t0 = time.time()
    run_recipe(recipe)
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in l][:steps]
    if a.profile:
        print(open(os.path.join(out, "profile", "summary.txt")).read(), file=sys.stderr, flush=True)
    med = median_step([r["elapsed_sec"] for r in rows], a.warmup)
    return dict(peer="ftscript", step_s_median=round(med, 4), pairs_per_s=round(a.pairs / med, 3),
                peak_gib=round(max(r.get("peak_gib", 0.0) for r in rows), 2), loss=round(rows[0]["loss"], 4),
                wall_s=round(time.time() - t0, 1))


def trl_run(model_dir, data, a, work):
    """TRL's DPOTrainer with peft, in this process."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_train_begin(self, *args, **kwargs):
            torch.cuda.reset_peak_memory_stats()

        def on_step_end(self, *args, **kwargs):
            torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
    tok = AutoTokenizer.from_pretrained(model_dir)
    args = DPOConfig(output_dir=os.path.join(work, "trl"), per_device_train_batch_size=a.pairs, gradient_accumulation_steps=1,
                     max_steps=a.warmup + a.steps, learning_rate=2e-4, lr_scheduler_type="constant", max_grad_norm=1.0,
                     bf16=True, gradient_checkpointing=not a.no_ckpt, max_length=a.prompt + a.response, beta=0.1,
                     loss_type=["sigmoid"], precompute_ref_log_probs=a.precompute, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
                     dataloader_num_workers=0)
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules=LORA["targets"],
                      task_type="CAUSAL_LM")
    clock = Clock()
    rows = [json.loads(l) for l in open(data)]
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=lora, callbacks=[clock])
    trainer.train()
    med = median_step(clock.ends, a.warmup - 1)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return dict(peer="trl", step_s_median=round(med, 4), pairs_per_s=round(a.pairs / med, 3),
                peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2), loss=round(losses[0], 4),
                wall_s=round(time.time() - t0, 1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shape", nargs="?", default="7b")
    ap.add_argument("--prompt", type=int, default=512); ap.add_argument("--response", type=int, default=512)
    ap.add_argument("--pairs", type=int, default=4); ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3); ap.add_argument("--no-ckpt", action="store_true")
    ap.add_argument("--precompute", action="store_true", help="both sides compute the reference log-probabilities before training")
    ap.add_argument("--profile", action="store_true", help="profile two more ftscript steps; print the summary")
    ap.add_argument("--peer", default="trl", choices=["trl", "none"])
    ap.add_argument("--peer-only", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    model_dir = f"/tmp/dpo-model-{a.shape}"
    work = tempfile.mkdtemp(prefix=f"dpo-bench-{a.shape}-", dir="/tmp")
    data = os.path.join(model_dir, "pairs.jsonl")
    if a.peer_only:
        print(json.dumps(trl_run(model_dir, data, a, work)), flush=True)
        return
    make_model(a.shape, model_dir)
    words_tokenizer(model_dir, json.load(open(os.path.join(model_dir, "config.json")))["vocab_size"])
    records(a, a.pairs * (a.warmup + a.steps), data)
    ours = ftscript_run(model_dir, data, a, work)
    print(json.dumps(dict(ours, shape=a.shape, ckpt=not a.no_ckpt)), flush=True)
    if a.peer == "none":
        return
    peer = peer_json(__file__, [a.shape, "--prompt", str(a.prompt), "--response", str(a.response), "--pairs", str(a.pairs), "--steps", str(a.steps),
                                "--warmup", str(a.warmup)] + (["--no-ckpt"] if a.no_ckpt else []) + (["--precompute"] if a.precompute else []), "TRL")
    print(json.dumps(peer), flush=True)
    print(f"RATIO dpo {a.shape} ckpt={not a.no_ckpt} precompute={a.precompute} prompt {a.prompt} + response {a.response}, {a.pairs} pairs: "
          f"ftscript {ours['pairs_per_s']} pairs/s vs TRL {peer['pairs_per_s']} = {ours['pairs_per_s'] / peer['pairs_per_s']:.2f}x; "
          f"peak GiB {ours['peak_gib']} vs {peer['peak_gib']}; first loss {ours['loss']} vs {peer['loss']}", flush=True)


if __name__ == "__main__":
    main()
