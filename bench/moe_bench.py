"""One Qwen3-MoE sparse block's forward + backward on one GPU: ftscript against transformers'
own block, in one call.

usage: python3 bench/moe_bench.py [--tokens 16384] [--steps 10]

Qwen3-30B-A3B's shape (hidden 2048, 128 experts, top-8, expert width 768), 8 × 2048 tokens,
bf16, random weights; the experts frozen, the input's gradient taken, and each side's LoRA
(r = 8 on both expert stacks: ftscript's `target_parameters`, peft's ParamWrapper) when the row
has it. transformers runs with its default experts implementation (`grouped_mm`, the same
`torch._grouped_mm` ftscript calls) and with `eager` (a loop over the experts). ftscript's side
is `examples/moe_layer.rs` (built by `cargo build --release --example moe_layer`; set
MOE_LAYER to its path). Prints a JSON line per row and a table with the ratios.
"""
import argparse
import json
import os
import subprocess
import time

import torch

SHAPE = dict(hidden=2048, experts=128, top_k=8, width=768)


def hf(tokens, rank, steps, impl):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    c = Qwen3MoeConfig(hidden_size=SHAPE["hidden"], moe_intermediate_size=SHAPE["width"], num_experts=SHAPE["experts"],
                       num_experts_per_tok=SHAPE["top_k"], norm_topk_prob=True)
    c._experts_implementation = impl
    torch.manual_seed(0)
    block = Qwen3MoeSparseMoeBlock(c)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
            p.requires_grad_(False)
    if rank:
        from peft import LoraConfig, inject_adapter_in_model
        block = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=[],
                                                   target_parameters=["experts.gate_up_proj", "experts.down_proj"]), block)
    block = block.to("cuda", torch.bfloat16)
    x = torch.randn(1, tokens, SHAPE["hidden"], device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x) * 1e-3

    def step():
        block(x).backward(dy)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - start) * 1e3 / steps
    return {"side": f"transformers ({impl})", "lora_rank": rank, "ms": ms,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def ours(tokens, rank, steps):
    binary = os.environ.get("MOE_LAYER", "target/release/examples/moe_layer")
    args = [binary, str(tokens), str(SHAPE["hidden"]), str(SHAPE["experts"]), str(SHAPE["top_k"]), str(SHAPE["width"]), str(rank), str(steps)]
    out = subprocess.run(args, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{binary} failed:\n{out.stdout}\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8 * 2048)
    ap.add_argument("--steps", type=int, default=10)
    a = ap.parse_args()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, tokens {a.tokens}, {SHAPE}")
    table = []
    for rank in (0, 8):
        rows = [ours(a.tokens, rank, a.steps)]
        for impl in ("grouped_mm", "eager"):
            try:
                rows.append(hf(a.tokens, rank, a.steps, impl))
            except Exception as e:  # a peer that cannot run this row says why
                rows.append({"side": f"transformers ({impl})", "lora_rank": rank, "error": f"{type(e).__name__}: {e}"[:300]})
            torch.cuda.empty_cache()
        for r in rows:
            print(json.dumps(r), flush=True)
        table.append(rows)
    print("\n| LoRA on the experts | ftscript ms (peak GiB) | transformers grouped_mm | transformers eager | ratio vs grouped_mm | ratio vs eager |")
    print("|---|---|---|---|---|---|")
    for rows in table:
        o = rows[0]
        cell = lambda r: f"{r['ms']:.1f} ({r['peak_gib']:.2f})" if "ms" in r else "failed"
        ratio = lambda r: f"{r['ms'] / o['ms']:.2f}×" if "ms" in r else "—"
        rank = f"r={o['lora_rank']}" if o["lora_rank"] else "none"
        print(f"| {rank} | {cell(o)} | {cell(rows[1])} | {cell(rows[2])} | {ratio(rows[1])} | {ratio(rows[2])} |")


if __name__ == "__main__":
    main()
