"""The TRL side of the preference-objective tests (tests/preference.rs).

  trl_reference.py data MODEL OUT              text records OUT/pairs.jsonl ({prompt, chosen, rejected})
                                               and OUT/kto.jsonl ({prompt, completion, label}); peft LoRA
                                               adapters OUT/init (B drawn at random: a trained adapter,
                                               which TRL copies as the reference) and OUT/fresh (B = 0, as
                                               peft initialises: the reference is the base model)
  trl_reference.py dpo MODEL OUT ADAPTER LOSS_TYPE
                                               TRL's DPOTrainer from OUT/ADAPTER on OUT/pairs.jsonl
  trl_reference.py orpo MODEL OUT ADAPTER      TRL's ORPOTrainer (trl.experimental.orpo)
  trl_reference.py kto MODEL OUT ADAPTER       TRL's KTOTrainer on OUT/kto.jsonl

Each trainer writes OUT/trl_<name>.json: {"log": [TRL's log entry of each step], "settings": {...}}
and its trained adapter in OUT/trl_<name>_adapter. The same settings drive ftscript's side: CPU,
fp32, batch 2, no accumulation, examples in order, no dropout.
"""
import json
import os
import sys

import torch
from datasets import Dataset
from peft import PeftModel
from peft_reference import fresh_and_random_adapters
from transformers import AutoModelForCausalLM, AutoTokenizer

SETTINGS = dict(batch_size=2, steps=10, lr=5e-3, beta=0.1, max_grad_norm=1.0, max_length=128, robust_label_smoothing=0.1)

WORDS = ["the", "cat", "sat", "on", "mat", "quick", "brown", "fox", "jumps", "over", "lazy", "dog",
         "def", "add", "return", "café", "naïve", "12345", "678"]


def load(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()


def tokenizer(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = "<pad>"
    return tok


def data(model_dir, out):
    gen = torch.Generator().manual_seed(11)
    phrase = lambda lo, hi: " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(torch.randint(lo, hi, (1,), generator=gen)),), generator=gen))
    n = SETTINGS["batch_size"] * SETTINGS["steps"]
    with open(os.path.join(out, "pairs.jsonl"), "w") as f:
        for _ in range(n):
            prompt, chosen, rejected = "Q: " + phrase(2, 8) + "\nA:", " " + phrase(1, 9), " " + phrase(1, 9)
            # a pair whose completions are the same text ties its rewards exactly in TRL, and
            # `rewards/accuracies` (chosen > rejected) then flips with the last bit of rounding
            while rejected == chosen:
                rejected = " " + phrase(1, 9)
            f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    with open(os.path.join(out, "kto.jsonl"), "w") as f:
        for i in range(n):
            label = bool(torch.rand(1, generator=gen) < 0.5) if i % 4 else (i % 8 == 0)
            f.write(json.dumps({"prompt": "Q: " + phrase(2, 8) + "\nA:", "completion": " " + phrase(1, 9), "label": label}) + "\n")
    fresh_and_random_adapters(load(model_dir), os.path.join(out, "fresh"), os.path.join(out, "init"))


def in_order(trainer_class):
    class InOrder(trainer_class):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)
    return InOrder


COMMON = lambda out, name: dict(
    output_dir=os.path.join(out, "trl_" + name), per_device_train_batch_size=SETTINGS["batch_size"],
    gradient_accumulation_steps=1, max_steps=SETTINGS["steps"], learning_rate=SETTINGS["lr"],
    lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=SETTINGS["max_grad_norm"],
    logging_steps=1, save_strategy="no", report_to=[], seed=0, use_cpu=True, disable_tqdm=True,
    beta=SETTINGS["beta"], max_length=SETTINGS["max_length"], bf16=False)  # TRL's configs default to bf16


def records(path):
    return Dataset.from_list([json.loads(line) for line in open(path)])


def run(trainer, out, name):
    trainer.train()
    log = [h for h in trainer.state.log_history if "loss" in h]
    json.dump({"log": log, "settings": SETTINGS}, open(os.path.join(out, f"trl_{name}.json"), "w"), indent=1)
    trainer.model.save_pretrained(os.path.join(out, f"trl_{name}_adapter"))


def policy(model_dir, out, adapter):
    return PeftModel.from_pretrained(load(model_dir), os.path.join(out, adapter), is_trainable=True)


def dpo(model_dir, out, adapter, loss_type):
    from trl import DPOConfig, DPOTrainer
    smoothing = SETTINGS["robust_label_smoothing"] if loss_type == "robust" else 0.0
    args = DPOConfig(**COMMON(out, "dpo_" + loss_type), loss_type=[loss_type], label_smoothing=smoothing)
    trainer = in_order(DPOTrainer)(model=policy(model_dir, out, adapter), args=args, train_dataset=records(os.path.join(out, "pairs.jsonl")),
                                   processing_class=tokenizer(model_dir))
    run(trainer, out, "dpo_" + loss_type)


def orpo(model_dir, out, adapter):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    args = ORPOConfig(**COMMON(out, "orpo"))
    trainer = in_order(ORPOTrainer)(model=policy(model_dir, out, adapter), args=args, train_dataset=records(os.path.join(out, "pairs.jsonl")),
                                    processing_class=tokenizer(model_dir))
    run(trainer, out, "orpo")


def kto(model_dir, out, adapter):
    from trl import KTOConfig, KTOTrainer
    args = KTOConfig(**COMMON(out, "kto"))
    trainer = in_order(KTOTrainer)(model=policy(model_dir, out, adapter), args=args, train_dataset=records(os.path.join(out, "kto.jsonl")),
                                   processing_class=tokenizer(model_dir))
    run(trainer, out, "kto")


if __name__ == "__main__":
    cmd, *rest = sys.argv[1:]
    {"data": data, "dpo": dpo, "orpo": orpo, "kto": kto}[cmd](*rest)
