"""Many-GPU runs of ftscript (bench/ddp.rhai) on random-init Llama shapes, one table per call.

  python3 bench/scaling.py ddp SHAPE [--gpus 1,2,4,8] [--quantize nf4]
      data parallel (`ftscript launch`, NCCL): tokens/s for each GPU count, scaling efficiency
      against 1 GPU, peak memory per GPU, and whether every rank's adapter is identical
  python3 bench/scaling.py split SHAPE [--gpus N] [--quantize nf4] [--bs 4]
      one process, `device: "auto"` splitting the decoder over the first N GPUs: tokens/s and
      peak memory of each GPU

The model is only a config.json + tokenizer (`random_init: true` draws the weights on the GPUs),
so even a 70B shape needs no checkpoint on disk. Seq 2048, LoRA r=8 α=32 on q_proj+v_proj, bf16,
`gradient_checkpointing: "auto"`. Needs the NCCL build of ftscript (`FTSCRIPT=path`) and
LD_LIBRARY_PATH to torch/lib on the GPU machine.
"""
import argparse, json, os, random, subprocess, sys, time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from hf_baseline import SHAPES  # noqa: E402

SHAPES = dict(SHAPES, **{"70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                                     num_key_value_heads=8, vocab_size=32000)})
BINARY = os.environ.get("FTSCRIPT", os.path.join(ROOT, "target/release/ftscript"))


def make_config(shape):
    """config.json and a word-level tokenizer, no weights."""
    from bench import write_tokenizer
    from transformers import LlamaConfig
    out = f"/tmp/bench-config-{shape}"
    if not os.path.exists(os.path.join(out, "config.json")):
        cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, torch_dtype="bfloat16")
        cfg.save_pretrained(out)
        write_tokenizer(out, cfg.vocab_size)
    return out


def make_data(n, seq):
    path = f"/tmp/scaling-tokens-{n}x{seq}.jsonl"
    if not os.path.exists(path):
        rng = random.Random(1)
        with open(path, "w") as f:
            for _ in range(n):
                f.write(json.dumps({"input_ids": [rng.randrange(32000) for _ in range(seq)]}) + "\n")
    return path


def run(cmd, out, env):
    t0 = time.time()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        print(p.stdout[-3000:], p.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"failed: {' '.join(cmd)}")
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in l]
    elapsed = [r["elapsed_sec"] for r in rows]
    dts = sorted(b - a for a, b in zip(elapsed[2:], elapsed[3:]))
    memory = [l.split("recipe: ")[-1] for l in (p.stdout + p.stderr).splitlines() if '"quantized"' in l]
    return dts[len(dts) // 2], rows, time.time() - t0, memory[-1] if memory else ""


def sets(a, model, data, out, steps):
    s = {"model_path": model, "data_path": data, "out": out, "max_steps": steps, "batch_size": a.bs,
         "random_init": "true", "quantize": a.quantize or ""}
    args = []
    for k, v in s.items():
        args += ["--set", f"{k}={json.dumps(v) if isinstance(v, str) and v != 'true' else v}"]
    return args


def adapters_identical(out, world):
    import torch
    from safetensors.torch import load_file
    ref = load_file(f"{out}/adapter-rank0/adapter_model.safetensors")
    worst = 0.0
    for r in range(1, world):
        other = load_file(f"{out}/adapter-rank{r}/adapter_model.safetensors")
        assert other.keys() == ref.keys()
        worst = max([worst] + [(ref[k].float() - other[k].float()).abs().max().item() for k in ref])
    return worst


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["ddp", "split"]); ap.add_argument("shape")
    ap.add_argument("--gpus", default="1,2"); ap.add_argument("--quantize", default=None)
    ap.add_argument("--bs", type=int, default=4); ap.add_argument("--steps", type=int, default=12)
    a = ap.parse_args()
    model = make_config(a.shape)
    env = dict(os.environ, FTSCRIPT_LOG=os.environ.get("FTSCRIPT_LOG", "info"))
    counts = [int(g) for g in a.gpus.split(",")]
    data = make_data(a.bs * a.steps * max(counts), 2048)
    tag = f"{a.shape}{' ' + a.quantize if a.quantize else ''}"
    if a.mode == "ddp":
        base = None
        for n in counts:
            out = f"/tmp/scaling-{a.shape}-{a.quantize}-{n}"
            dt, rows, wall, memory = run([BINARY, "launch", "--nproc-per-node", str(n), "--allow-read", "/tmp", "--allow-write", "/tmp", os.path.join(HERE, "ddp.rhai")]
                                         + sets(a, model, data, out, a.steps), out, env)
            tps = n * a.bs * 2048 / dt
            base = base or tps / n
            diff = adapters_identical(out, n)
            print(json.dumps(dict(mode="ddp", shape=tag, gpus=n, tokens_per_s=round(tps), efficiency=round(tps / (base * n), 3),
                                  peak_gib_rank0=round(max(r.get("peak_gib", 0) for r in rows), 2), first_loss=round(rows[0]["loss"], 3),
                                  adapters_max_diff=diff, wall_s=round(wall, 1))), flush=True)
    else:
        n = counts[-1]
        out = f"/tmp/scaling-split-{a.shape}-{a.quantize}-{n}"
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(n))
        dt, rows, wall, memory = run([BINARY, "run", "--allow-read", "/tmp", "--allow-write", "/tmp", os.path.join(HERE, "ddp.rhai")] + sets(a, model, data, out, a.steps), out, env)
        last = rows[-1]
        print(json.dumps(dict(mode="split", shape=tag, gpus=n, tokens_per_s=round(a.bs * 2048 / dt),
                              peak_gib_per_gpu=[round(x, 2) for x in last.get("peak_gib_per_device", [last.get("peak_gib", 0)])],
                              first_loss=round(rows[0]["loss"], 3), last_loss=round(last["loss"], 3), memory=memory,
                              wall_s=round(wall, 1))), flush=True)


if __name__ == "__main__":
    main()
