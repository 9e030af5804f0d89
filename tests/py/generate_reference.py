"""The transformers side of the generation tests (tests/generate.rs).

  generate_reference.py generate MODEL PROMPTS_JSON MAX_NEW OUT_JSON
      greedy `generate` of the prompts (token id lists) in one left-padded batch; writes each
      row's new tokens up to (not including) the first EOS
  generate_reference.py score MODEL ROWS_JSON OUT_JSON
      each row's (`{ids, labels}`, labels -100 where not scored) summed next-token cross-entropy,
      the row alone through the model; writes the list of sums
  generate_reference.py process OUT_SAFETENSORS
      a fixed logits tensor [4, 50], the ids each row has seen [4, 6], and the logits after
      transformers' processors for several settings (repetition penalty, temperature, top-k, top-p)
"""
import json
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

# (name, repetition_penalty, temperature, top_k, top_p): the settings tests/generate.rs replays
SETTINGS = [("penalty", 1.3, 0.0, 0, 1.0), ("temperature", 1.0, 0.7, 0, 1.0), ("top_k", 1.0, 1.0, 5, 1.0),
            ("top_p", 1.0, 1.0, 0, 0.8), ("all", 1.2, 0.8, 10, 0.9)]


def generate(model_dir, prompts_json, max_new, out_json):
    prompts = json.load(open(prompts_json))
    cfg = json.load(open(f"{model_dir}/config.json"))
    eager = cfg.get("model_type") == "gemma2"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager" if eager else "sdpa").eval()
    # transformers 5.17's MoE forward computes the load-balancing loss when the config asks for
    # router logits, and its mask there fails at a decoding step (8 rows against the prompts' 328):
    # generation needs no auxiliary loss
    if getattr(model.config, "output_router_logits", False):
        model.config.output_router_logits = False
    width = max(len(p) for p in prompts)
    pad = 2
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=int(max_new), do_sample=False,
                             pad_token_id=pad, eos_token_id=cfg["eos_token_id"])
    eos = cfg["eos_token_id"]
    eos = set(eos if isinstance(eos, list) else [eos])
    rows = []
    for r in out[:, width:].tolist():
        new = []
        for t in r:
            if t in eos:
                break
            new.append(t)
        rows.append(new)
    json.dump(rows, open(out_json, "w"))


def score(model_dir, rows_json, out_json):
    cfg = json.load(open(f"{model_dir}/config.json"))
    eager = cfg.get("model_type") == "gemma2"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager" if eager else "sdpa").eval()
    sums = []
    with torch.no_grad():
        for row in json.load(open(rows_json)):
            logits = model(input_ids=torch.tensor([row["ids"]])).logits[0].float()
            sums.append(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(row["labels"][1:]), ignore_index=-100, reduction="sum").item())
    json.dump(sums, open(out_json, "w"))


def process(out_file):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 50, generator=gen) * 3
    seen = torch.randint(0, 50, (4, 6), generator=gen)
    tensors = {"logits": logits, "seen": seen}
    for name, penalty, temperature, top_k, top_p in SETTINGS:
        z = logits.clone()
        if penalty != 1.0:
            z = RepetitionPenaltyLogitsProcessor(penalty)(seen, z)
        if temperature > 0:
            z = TemperatureLogitsWarper(temperature)(seen, z)
        if top_k > 0:
            z = TopKLogitsWarper(top_k)(seen, z)
        if top_p < 1.0:
            z = TopPLogitsWarper(top_p)(seen, z)
        tensors[name] = z.contiguous()
    save_file(tensors, out_file)


if __name__ == "__main__":
    cmd, *rest = sys.argv[1:]
    {"generate": generate, "score": score, "process": process}[cmd](*rest)
