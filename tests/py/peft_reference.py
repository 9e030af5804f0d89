"""The peft / HF Trainer side of the LoRA tests.

usage:
  peft_reference.py init MODEL OUT [dora]  peft LoRA adapters for MODEL: OUT/init (B = 0, as peft
                                          initialises; the training start point) and OUT/random
                                          (B random, for logit checks), OUT/train.jsonl (token
                                          records), OUT/ids.json, OUT/random_logits.safetensors;
                                          with `dora`, DoRA adapters (the random one's magnitudes
                                          moved off the weights' norms too); with `tokens`, the
                                          embedding rows of TOKENS train too (moved in the random one);
                                          with `modules`, embed_tokens and lm_head train whole
                                          (modules_to_save; moved in the random one); with
                                          `experts`, a mixture-of-experts model's expert stacks
                                          take LoRA too (target_parameters), and training runs
                                          without accumulation (TRAIN_EXPERTS: transformers adds
                                          each micro-batch's load-balancing loss in full)
  peft_reference.py train MODEL OUT       HF Trainer + peft from OUT/init on OUT/train.jsonl, in
                                          order; per-step losses → OUT/hf_losses.json
  peft_reference.py adapter-logits MODEL ADAPTER IDS_JSON OUT_FILE
                                          logits of PeftModel.from_pretrained(MODEL, ADAPTER)
  peft_reference.py added-tokens MODEL ADAPTER TOKENS_JSON TEXT OUT_FILE
                                          the tokenizer saved in ADAPTER: TEXT's ids (and those of
                                          MODEL's own tokenizer after transformers' add_tokens of
                                          TOKENS as special), and the logits of
                                          PeftModel.from_pretrained(MODEL resized to it, ADAPTER)
  peft_reference.py adalora MODEL OUT     AdaLoRA (ADALORA settings below) from peft's initial adapter
                                          (OUT/ada_init) through ADALORA["steps"] steps of a
                                          hand-written loop on OUT/train.jsonl (2 records a step,
                                          in order, cycling), update_and_allocate after each:
                                          OUT/ada_reference.json (losses, rank patterns after each
                                          allocation), OUT/ada_trained, its logits for OUT/ids.json
                                          in OUT/ada_trained_logits.safetensors
  peft_reference.py model-logits MODEL IDS_JSON OUT_FILE
                                          logits of a plain transformers model (e.g. a merged one)
  peft_reference.py patterned MODEL OUT [dora|tokens|dora+tokens]
                                          OUT/patterned: a peft adapter with a rank_pattern and an
                                          alpha_pattern (B random; DoRA with moved magnitudes,
                                          trainable token rows and a trained lm_head
                                          (modules_to_save), as named), its logits for OUT/ids.json in
                                          OUT/patterned_logits.safetensors
"""
import json
import os
import sys

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

# the settings ftscript's side uses too (tests/training.rs)
TRAIN = dict(batch_size=2, grad_accum=4, steps=20, lr=2e-3, warmup=2, weight_decay=0.01, max_grad_norm=0.5)
TRAIN_EXPERTS = dict(TRAIN, batch_size=8, grad_accum=1)
EXPERT_STACKS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def settings(out):
    """TRAIN, or TRAIN_EXPERTS when the initial adapter has expert stacks."""
    config = json.load(open(os.path.join(out, "init", "adapter_config.json")))
    return TRAIN_EXPERTS if config.get("target_parameters") else TRAIN


def load(model_dir):
    # Gemma 2's soft-capped attention scores exist only in transformers' eager attention
    gemma2 = json.load(open(os.path.join(model_dir, "config.json"))).get("model_type") == "gemma2"
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                attn_implementation="eager" if gemma2 else "sdpa").eval()


def logits_of(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().contiguous()


# the token ids whose embedding rows train in the `tokens` variant (all occur in train.jsonl)
TOKENS = [5, 17, 42, 99, 120]


def fresh_and_random_adapters(model, fresh_dir, random_dir, dora=False, tokens=None, modules=None, experts=False):
    """peft LoRA (r=4, alpha=8, q_proj and v_proj; DoRA if `dora`) on `model`, saved as peft
    initialises it (B = 0) in `fresh_dir` and with B drawn from N(0, 0.05²) (and DoRA's
    magnitudes scaled by 1 + N(0, 0.1²)) in `random_dir`; returns the latter."""
    torch.manual_seed(123)
    # Phi-3's q, k, v and gate, up are one module each
    targets = ["qkv_proj", "gate_up_proj"] if model.config.model_type == "phi3" else ["q_proj", "v_proj"]
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_dora=dora,
                                             trainable_token_indices=tokens, modules_to_save=modules,
                                             target_modules=targets, task_type="CAUSAL_LM",
                                             target_parameters=EXPERT_STACKS if experts else None))
    model.save_pretrained(fresh_dir)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
            if "lora_magnitude_vector" in name or "trainable_tokens_delta" in name or "modules_to_save" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
    model.save_pretrained(random_dir)
    return model


def init(model_dir, out, variant=None):
    model = fresh_and_random_adapters(load(model_dir), os.path.join(out, "init"), os.path.join(out, "random"),
                                      dora=variant == "dora", tokens=TOKENS if variant == "tokens" else None,
                                      modules=["embed_tokens", "lm_head"] if variant == "modules" else None,
                                      experts=variant == "experts")
    train_settings = settings(out)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 300, (2, 16), generator=gen).tolist()
    json.dump(ids, open(os.path.join(out, "ids.json"), "w"))
    save_file({"logits": logits_of(model, ids)}, os.path.join(out, "random_logits.safetensors"))
    # variable-length token records; the first label of each is masked (as a prompt token would be)
    with open(os.path.join(out, "train.jsonl"), "w") as f:
        for i in range(train_settings["batch_size"] * train_settings["grad_accum"] * train_settings["steps"] // 2):
            n = int(torch.randint(8, 24, (1,), generator=gen))
            ids = torch.randint(3, 300, (n,), generator=gen).tolist()
            labels = [-100] + ids[1:]
            f.write(json.dumps({"input_ids": ids, "labels": labels}) + "\n")


class Records(torch.utils.data.Dataset):
    def __init__(self, path):
        self.rows = [json.loads(line) for line in open(path)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def collate(rows):
    width = max(len(r["input_ids"]) for r in rows)
    pad = lambda xs, v: xs + [v] * (width - len(xs))
    return {
        "input_ids": torch.tensor([pad(r["input_ids"], 2) for r in rows]),
        "labels": torch.tensor([pad(r["labels"], -100) for r in rows]),
        "attention_mask": torch.tensor([pad([1] * len(r["input_ids"]), 0) for r in rows]),
    }


class InOrder(Trainer):
    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def train(model_dir, out):
    TRAIN = settings(out)
    model = PeftModel.from_pretrained(load(model_dir), os.path.join(out, "init"), is_trainable=True)
    args = TrainingArguments(
        output_dir=os.path.join(out, "hf"), per_device_train_batch_size=TRAIN["batch_size"],
        gradient_accumulation_steps=TRAIN["grad_accum"], max_steps=TRAIN["steps"], learning_rate=TRAIN["lr"],
        lr_scheduler_type="linear", warmup_steps=TRAIN["warmup"], weight_decay=TRAIN["weight_decay"],
        max_grad_norm=TRAIN["max_grad_norm"], logging_steps=1, save_strategy="no", report_to=[],
        dataloader_drop_last=False, seed=0, use_cpu=True, disable_tqdm=True, remove_unused_columns=False)
    trainer = InOrder(model=model, args=args, train_dataset=Records(os.path.join(out, "train.jsonl")),
                      data_collator=collate)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    json.dump({"losses": losses, "settings": TRAIN}, open(os.path.join(out, "hf_losses.json"), "w"))
    model.save_pretrained(os.path.join(out, "hf_trained"))


def adapter_logits(model_dir, adapter, ids_json, out_file):
    model = PeftModel.from_pretrained(load(model_dir), adapter).eval()
    save_file({"logits": logits_of(model, json.load(open(ids_json)))}, out_file)


def added_tokens(model_dir, adapter, tokens_json, text, out_file):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(adapter)
    theirs = AutoTokenizer.from_pretrained(model_dir)
    theirs.add_tokens(json.load(open(tokens_json)), special_tokens=True)
    base = load(model_dir)
    base.resize_token_embeddings(len(tok))
    model = PeftModel.from_pretrained(base, adapter).eval()
    ids = tok(text)["input_ids"]
    save_file({"logits": logits_of(model, [ids]), "ids": torch.tensor(ids),
               "ids_transformers_added": torch.tensor(theirs(text)["input_ids"]),
               "len": torch.tensor([len(tok), len(theirs)])}, out_file)


# the AdaLoRA run both sides make (tests/training.rs)
ADALORA = dict(init_r=6, target_r=2, tinit=5, tfinal=10, deltaT=3, steps=50, lr=1e-2, max_grad_norm=1.0,
               orth_reg_weight=0.5, alpha=8, targets=["q_proj", "v_proj", "down_proj"])


def adalora(model_dir, out):
    from peft import AdaLoraConfig
    a = ADALORA
    torch.manual_seed(11)
    config = AdaLoraConfig(init_r=a["init_r"], target_r=a["target_r"], tinit=a["tinit"], tfinal=a["tfinal"],
                           deltaT=a["deltaT"], total_step=a["steps"], lora_alpha=a["alpha"], lora_dropout=0.0,
                           orth_reg_weight=a["orth_reg_weight"], target_modules=a["targets"], task_type="CAUSAL_LM")
    model = get_peft_model(load(model_dir), config)
    model.save_pretrained(os.path.join(out, "ada_init"))
    rows = Records(os.path.join(out, "train.jsonl"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a["lr"], weight_decay=0.0)
    allocator = model.base_model.rankallocator
    final = a["steps"] - a["tfinal"]
    model.train()
    losses, patterns = [], {}
    for step in range(a["steps"]):
        batch = collate([rows[(2 * step + i) % len(rows)] for i in range(2)])
        loss = model(**batch).loss  # cross-entropy + orth_reg_weight · the orthogonality penalty
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, a["max_grad_norm"])
        opt.step()
        model.base_model.update_and_allocate(step)
        budget, masks = allocator.budget_schedule(step)
        if (step < final and masks) or step == final:
            pattern = model.peft_config["default"].rank_pattern
            patterns[step] = {k.replace(".lora_E.default", ""): v for k, v in pattern.items()}
        opt.zero_grad()
        losses.append(loss.item())
    json.dump({"losses": losses, "patterns": patterns, "settings": a}, open(os.path.join(out, "ada_reference.json"), "w"))
    model.save_pretrained(os.path.join(out, "ada_trained"))
    model.eval()
    ids = json.load(open(os.path.join(out, "ids.json")))
    save_file({"logits": logits_of(model, ids)}, os.path.join(out, "ada_trained_logits.safetensors"))


def model_logits(model_dir, ids_json, out_file):
    save_file({"logits": logits_of(load(model_dir), json.load(open(ids_json)))}, out_file)


def patterned(model_dir, out, variant=None):
    torch.manual_seed(7)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                        rank_pattern={"v_proj": 6}, alpha_pattern={"q_proj": 20}, task_type="CAUSAL_LM",
                        use_dora="dora" in (variant or ""),
                        trainable_token_indices=TOKENS if "tokens" in (variant or "") else None,
                        modules_to_save=["lm_head"] if "tokens" in (variant or "") else None)
    model = get_peft_model(load(model_dir), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
            if "lora_magnitude_vector" in name or "trainable_tokens_delta" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
    model.save_pretrained(os.path.join(out, "patterned"))
    ids = json.load(open(os.path.join(out, "ids.json")))
    save_file({"logits": logits_of(model, ids)}, os.path.join(out, "patterned_logits.safetensors"))


if __name__ == "__main__":
    cmd, *rest = sys.argv[1:]
    {"init": init, "train": train, "adapter-logits": adapter_logits, "model-logits": model_logits,
     "added-tokens": added_tokens, "adalora": adalora,
     "patterned": patterned}[cmd](*rest)
