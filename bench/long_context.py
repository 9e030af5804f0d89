"""Longest context on one GPU: ftscript vs a Python peer, LoRA q+v r=8 on one random-init model,
batch 1, bf16, sequence lengths from `--lengths`, each side on its own until its first failure.

ftscript keeps the least it can on the GPU (`gradient_checkpointing: "offload"`, the chunked loss
head); the peer runs with its own checkpointing (Unsloth's "unsloth" mode, which offloads to host
memory; or HF + peft + Liger). Each (side, length) is one process: `--warmup` untimed steps, then
the median of `--steps` timed ones. A side stops at the first length it cannot complete (out of
memory, or past `--timeout` seconds). Prints a JSON line per run, then a table: tokens/s at each
length, "OOM"/"failed" where it stopped, and the ratio where both completed.

usage: python3 bench/long_context.py [SHAPE] [--lengths 16384,32768,65536,131072] [--peer unsloth|liger|none]
       [--steps 3] [--warmup 1] [--timeout 300]
  needs target/release/ftscript (FTSCRIPT=path; LD_LIBRARY_PATH to torch/lib on the GPU machine), and
  for --peer unsloth the wheels of bench/unsloth-wheels.txt on PYTHONPATH
"""
import argparse, json, os, subprocess, sys, tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402


def ours(a, seq, model_dir):
    """One ftscript run at `seq` tokens; its JSON row, or {"error": ...}."""
    run = argparse.Namespace(seq=seq, bs=1, steps=a.steps, warmup=a.warmup, no_ckpt=False, targets="q_proj,v_proj",
                             r=8, alpha=32, peer="none", dora=False, quantize=None, auto=False, profile=False,
                             offload=True, memory_budget=None)
    work = tempfile.mkdtemp(prefix=f"long-{seq}-", dir="/tmp")
    try:
        return bench.ftscript_run(model_dir, run, work)
    except SystemExit as e:
        return {"error": str(e)}


def peer(a, seq):
    """One run of the peer at `seq` tokens, in its own process; its JSON row, or {"error": ...}."""
    if a.peer == "unsloth":
        cmd = [sys.executable, os.path.join(HERE, "unsloth_baseline.py"), a.shape, "lora", "--model-dir", f"/tmp/unsloth-model-{a.shape}"]
    else:
        cmd = [sys.executable, os.path.join(HERE, "hf_baseline.py"), a.shape, a.peer]
    cmd += ["--seq", str(seq), "--bs", "1", "--steps", str(a.steps), "--warmup", str(a.warmup), "--targets", "q_proj,v_proj", "--r", "8", "--alpha", "32"]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"past {a.timeout} s"}
    rows = [l for l in p.stdout.splitlines() if l.startswith("{")]
    if p.returncode != 0 or not rows:
        oom = "out of memory" in (p.stdout + p.stderr).lower()
        return {"error": "OOM" if oom else (p.stderr.strip().splitlines() or ["failed"])[-1][-300:]}
    return json.loads(rows[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shape", nargs="?", default="7b")
    ap.add_argument("--lengths", default="16384,32768,65536,131072")
    ap.add_argument("--peer", default="unsloth")
    ap.add_argument("--steps", type=int, default=3); ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=300)
    a = ap.parse_args()
    lengths = [int(x) for x in a.lengths.split(",")]
    model_dir = f"/tmp/bench-model-{a.shape}"
    bench.make_model(a.shape, model_dir)
    if a.peer == "unsloth" and not os.path.isdir(f"/tmp/unsloth-model-{a.shape}"):
        # Unsloth's own copy of the model, written before its timed runs (a 7B's takes a minute)
        subprocess.run([sys.executable, os.path.join(HERE, "unsloth_baseline.py"), "--_make", a.shape, f"/tmp/unsloth-model-{a.shape}"], check=True)
    results = {"ftscript": {}, a.peer: {}}
    sides = [("ftscript", lambda s: ours(a, s, model_dir))] + ([(a.peer, lambda s: peer(a, s))] if a.peer != "none" else [])
    for name, run in sides:
        for seq in lengths:
            row = run(seq)
            print(json.dumps(dict(row, side=name, seq=seq)), flush=True)
            results[name][seq] = row
            if "error" in row:
                break
    cell = lambda r: "—" if r is None else ("OOM" if "out of memory" in r["error"].lower() or r["error"] == "OOM" else "failed") if "error" in r else f"{r['tokens_per_s']:,} tok/s, {r['peak_gib']} GiB"
    print(f"\n| {a.shape}, LoRA q+v r=8, batch 1 | ftscript (offload) | {a.peer} | ratio |\n|---|---|---|---|")
    for seq in lengths:
        o, p = results["ftscript"].get(seq), results[a.peer].get(seq)
        both = o and p and "error" not in o and "error" not in p
        ratio = f"{o['tokens_per_s'] / p['tokens_per_s']:.2f}×" if both else ""
        print(f"| {seq:,} | {cell(o)} | {cell(p)} | {ratio} |")


if __name__ == "__main__":
    main()
