"""Evaluation's share of a LoRA training run's wall time, with generation-based evaluation.

One random-init model (bench.py's shapes), LoRA r=8 α=32 on q_proj+v_proj, bf16, alpaca-format
records cut to `--seq` tokens (2,048), batch 4, `gradient_checkpointing: "auto"`; every `--every` steps the
eval set of `--prompts` records is scored: its loss, and `eval_generate` (greedy answers of
`--new` tokens, `--gen-batch` prompts at a time, BLEU and ROUGE-L against the references). Prints each
evaluation's `eval_seconds` (the loss pass and the generation), and their sum as a share of
`train`'s wall time.

usage: python3 bench/eval_share.py [SHAPE] [--steps 100] [--every 50] [--prompts 256] [--new 64] [--gen-batch 64] [--eval-batch 16] [--profile]
  `--profile` profiles step `--every` and the evaluation after it (`train`'s `profile`) and prints
  the summary: GPU time by kind of kernel;
  needs target/release/ftscript (FTSCRIPT=path; LD_LIBRARY_PATH to torch/lib on the GPU machine);
  `--device cpu` with the `tiny` shape tries the script on a machine without a GPU
"""
import argparse, json, os, random, sys, tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench import make_model, run_recipe  # noqa: E402
from dpo_bench import words_tokenizer  # noqa: E402


def words(rng, n, vocab):
    return " ".join(f"t{rng.randrange(3, min(vocab, 32000))}" for _ in range(n))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shape", nargs="?", default="7b")
    ap.add_argument("--steps", type=int, default=100); ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--prompts", type=int, default=256); ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--seq", type=int, default=2048); ap.add_argument("--device", default="cuda")
    ap.add_argument("--gen-batch", type=int, default=64, help="eval_generate's batch_size (prompts decoded together)")
    ap.add_argument("--eval-batch", type=int, default=16, help="eval_batch_size (records a loss pass scores together)")
    ap.add_argument("--profile", action="store_true", help="profile step --every and its evaluation")
    a = ap.parse_args()
    model_dir = f"/tmp/gen-model-{a.shape}"
    make_model(a.shape, model_dir, a.device)
    vocab = json.load(open(os.path.join(model_dir, "config.json")))["vocab_size"]
    words_tokenizer(model_dir, vocab)
    work = tempfile.mkdtemp(prefix="eval-share-", dir="/tmp")
    rng = random.Random(3)
    with open(os.path.join(work, "train.jsonl"), "w") as f:
        for _ in range(4 * a.steps):
            # longer than max_length: every row is cut to it (one sequence length for the whole
            # run, and no EOS for greedy decoding to learn to answer with at once)
            f.write(json.dumps({"instruction": words(rng, 128, vocab), "output": words(rng, a.seq, vocab)}) + "\n")
    with open(os.path.join(work, "eval.jsonl"), "w") as f:
        for _ in range(a.prompts):
            f.write(json.dumps({"instruction": words(rng, 128, vocab), "output": words(rng, a.new, vocab)}) + "\n")
    out = os.path.join(work, "run")
    dtype = "bf16" if a.device == "cuda" else "fp32"
    recipe = os.path.join(work, "eval_share.rhai")
    profile = f" profile: #{{ start: {a.every}, steps: 1 }}," if a.profile else ""
    with open(recipe, "w") as f:
        f.write(f"""
let m = load_model("{model_dir}", #{{ dtype: "{dtype}", device: "{a.device}" }});
m.add_lora(#{{ r: 8, alpha: 32, dropout: 0.05, targets: ["q_proj", "v_proj"] }});
let t0 = timestamp();
let r = train(m, #{{ train: load_dataset("{work}/train.jsonl"), eval: load_dataset("{work}/eval.jsonl"), format: "alpaca",
    max_length: {a.seq}, batch_size: 4, eval_batch_size: {a.eval_batch}, max_steps: {a.steps}, lr: 2e-4, log_every: 10,
    eval_every: {a.every}, gradient_checkpointing: "auto", output_dir: "{out}", save_every: 100000,{profile}
    eval_generate: #{{ metrics: ["bleu", "rouge_l"], max_new_tokens: {a.new}, batch_size: {a.gen_batch} }} }});
print(`RESULT ${{t0.elapsed}} ${{r.steps}}`);
""")
    stdout = run_recipe(recipe)
    wall = float([l for l in stdout.splitlines() if l.startswith("RESULT")][-1].split()[1])
    evals = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if '"eval_seconds"' in l]
    steps = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if '"tokens_per_sec"' in l]
    for e in evals:
        row = {k: e[k] for k in ["step", "eval_loss", "eval_bleu", "eval_rouge_l", "eval_seconds", "eval_generate_seconds"]}
        row["loss_pass_seconds"] = round(e["eval_seconds"] - e["eval_generate_seconds"], 3)
        print(json.dumps(row))
    if a.profile:
        print(open(os.path.join(out, "profile", "summary.txt")).read())
    # each log window's training rate (tokens over the window's wall time, evaluations left out):
    # whether training slows after an evaluation shows here
    rates, last = [], (0, 0.0)
    for r in steps:
        # an evaluation after step s runs after that step's log line: in the next window
        evaluated = sum(e["eval_seconds"] for e in evals if last[0] <= e["step"] < r["step"])
        window = r["elapsed_sec"] - last[1] - evaluated
        if window > 0:
            rates.append(f"{last[0] + 1}-{r['step']}: {(r['step'] - last[0]) * 4 * a.seq / window:.0f}")
        last = (r["step"], r["elapsed_sec"])
    print("training tok/s by log window (steps):", ", ".join(rates))
    spent = sum(e["eval_seconds"] for e in evals)
    before_last = sum(e["eval_seconds"] for e in evals if e["step"] < steps[-1]["step"])
    print(f"EVAL SHARE {a.shape}: {len(evals)} evaluations of {a.prompts} records ({a.new} new tokens each) took {spent:.1f} s "
          f"of train's {wall:.1f} s = {100 * spent / wall:.1f}%; training at {steps[-1]['step'] * 4 * a.seq / (steps[-1]['elapsed_sec'] - before_last):.0f} tok/s "
          "(evaluations left out)", flush=True)


if __name__ == "__main__":
    main()
