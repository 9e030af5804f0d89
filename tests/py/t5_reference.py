"""Makes tiny random-init T5 models with transformers and the references ftscript must match.

usage: t5_reference.py OUT_DIR NAME
       t5_reference.py train OUT_DIR NAME       (after the first)
       t5_reference.py losses MODEL ADAPTER|- PAIRS_JSON OUT_JSON

NAME: t5 (v1.0: ReLU feed-forward, embeddings tied to the head, whose input is scaled by
d_model^-0.5) or flan_t5 (v1.1 / Flan-T5: gated-GELU, an untied head, unscaled). Writes
OUT_DIR/NAME/ (config.json, model.safetensors, tokenizer files) and
OUT_DIR/NAME/reference.safetensors with
  input_ids       [2, S] int64  sources (the second row right-padded)
  attention_mask  [2, S] int64
  labels          [2, T] int64  targets (the second row padded with -100)
  logits          [2, T, V] fp32
  loss            []    fp32    transformers' loss with `labels`
  greedy          [20]  int64   20 greedy tokens for the first source (EOS disabled)
  logits_bf16     [2, T, V] fp32  the logits of the model in bf16, as transformers loads it there
  logits_fp16     [2, T, V] fp32  in fp16, the feed-forwards' `wo` kept fp32 (_keep_in_fp32_modules)
and OUT_DIR/NAME/reference.json with text pairs, their losses and greedy generations (one by one,
in one padded batch, and with repetition_penalty 1.5), and with
the losses of the pairs under OUT_DIR/NAME/peft_adapter, a peft LoRA (q, v, wo; random B) made
on the model.

`train` copies the model to OUT_DIR/NAME_train/ without dropout and writes there train.jsonl
(`{input, target}` records), init/ (peft's fresh LoRA on q, v, wo: B = 0, the start point) and
hf.json: the per-step losses of HF `Seq2SeqTrainer` + peft from init/ over TRAIN's settings, the
records in order, and the losses of PAIRS under the adapter it trained (hf_trained/). The loss is
the token mean over each optimizer step's micro-batches (Trainer's `num_items_in_batch`, which
T5's own loss ignores: under accumulation it would sum per-micro-batch means).

`losses` writes the losses (transformers' `loss` with `labels`) of PAIRS_JSON's
`[[source, target], ...]` under MODEL (with ADAPTER loaded by `PeftModel.from_pretrained`).
"""
import copy
import json
import os
import sys

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from peft import LoraConfig, get_peft_model
import shutil

from transformers import (AutoTokenizer, PreTrainedTokenizerFast, Seq2SeqTrainer, Seq2SeqTrainingArguments, T5Config,
                          T5ForConditionalGeneration)
from peft import PeftModel

# the settings of tests/seq2seq.rs's training run
TRAIN = dict(batch_size=4, grad_accum=2, steps=20, lr=2e-3, warmup=2, weight_decay=0.01, max_grad_norm=0.5)

CORPUS = [
    "summarize: The quick brown fox jumps over the lazy dog.",
    "translate English to German: Fine-tuning adapts a pretrained model.",
    "Paris is the capital of France; Berlin is the capital of Germany.",
    "12345 + 678 = 13023",
] * 20

PAIRS = [
    ("summarize: The quick brown fox jumps over the lazy dog.", "A fox jumps."),
    ("translate English to German: Paris is the capital of France.", "Paris ist die Hauptstadt."),
]


def t5_tokenizer():
    """T5's special ids (<pad> 0, </s> 1, <unk> 2) and its post-processor: EOS after the text, no BOS."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


CONFIGS = {
    "t5": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    # transformers 5 ties every T5's head to its embeddings and keeps `tie_word_embeddings: false`
    # only as "do not scale" (scale_decoder_outputs); Flan-T5's checkpoints hold their own
    # lm_head.weight, so the model is untied by hand below and written with it
    "flan_t5": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}


def main():
    out, name = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    tok = t5_tokenizer()
    cfg = T5Config(vocab_size=256, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_decoder_layers=3, num_heads=4,
                   relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.1,
                   layer_norm_epsilon=1e-6, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **CONFIGS[name])
    model = T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # widen the tiny init so logits are far from uniform; norms away from 1
        for n, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3 if "relative_attention_bias" in n else 0.08)
            else:
                p.add_(torch.randn_like(p) * 0.1)
        if name == "flan_t5":
            model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight) * 0.08)
    d = os.path.join(out, name)
    model.save_pretrained(d)
    if name == "flan_t5":
        save_file({k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("embed_tokens.weight")},
                  os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(d, "config.json")) as f:
            config = json.load(f)
        config["tie_word_embeddings"] = False
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
    tok.save_pretrained(d)
    gen = torch.Generator().manual_seed(1)
    # sources long enough that relative distances reach the logarithmic buckets
    input_ids = torch.randint(3, cfg.vocab_size, (2, 30), generator=gen)
    input_ids[:, -1] = 1
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 21:] = 0
    input_ids[1, 21:] = 0
    input_ids[1, 20] = 1
    labels = torch.randint(3, cfg.vocab_size, (2, 12), generator=gen)
    labels[1, 8:] = -100
    with torch.no_grad():
        o = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        # (transformers 5.17 sizes the decoder's cache by the encoder's layer count: generate without it)
        greedy = model.generate(input_ids=input_ids[:1], max_new_tokens=20, do_sample=False, eos_token_id=None, use_cache=False)[0, 1:]
    half = {}
    for name_, dtype in [("bf16", torch.bfloat16), ("fp16", torch.float16)]:
        m = copy.deepcopy(model).to(dtype)
        if dtype == torch.float16:  # the checkpoint's fp32 `wo`, as from_pretrained(dtype=fp16) loads them
            for b16, b32 in zip(list(m.encoder.block) + list(m.decoder.block), list(model.encoder.block) + list(model.decoder.block)):
                b16.layer[-1].DenseReluDense.wo = copy.deepcopy(b32.layer[-1].DenseReluDense.wo)
        with torch.no_grad():
            half[name_] = m(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits.float().contiguous()
    save_file({"input_ids": input_ids.contiguous(), "attention_mask": attention_mask.contiguous(), "labels": labels.contiguous(),
               "logits": o.logits.float().contiguous(), "loss": o.loss.float().reshape([]), "greedy": greedy.contiguous(),
               "logits_bf16": half["bf16"], "logits_fp16": half["fp16"]},
              os.path.join(d, "reference.safetensors"))
    pairs = []
    for source, target in PAIRS:
        enc = tok(source, return_tensors="pt")
        lab = tok(target, return_tensors="pt").input_ids
        with torch.no_grad():
            loss = model(**enc, labels=lab).loss.item()
            gen_ids = model.generate(**enc, max_new_tokens=20, do_sample=False, use_cache=False)[0]
        pairs.append({"source": source, "target": target, "loss": loss,
                      "generated": tok.decode(gen_ids, skip_special_tokens=True), "generated_ids": gen_ids[1:].tolist()})
    # the sources in one right-padded batch; and each with a repetition penalty (transformers
    # applies it to the decoder's ids only)
    enc = tok([source for source, _ in PAIRS], return_tensors="pt", padding=True)
    with torch.no_grad():
        batch = model.generate(**enc, max_new_tokens=20, do_sample=False, use_cache=False)
        for pair, ids in zip(pairs, batch):
            pair["batch_generated"] = tok.decode(ids, skip_special_tokens=True)
        for pair in pairs:
            ids = model.generate(**tok(pair["source"], return_tensors="pt"), max_new_tokens=20, do_sample=False,
                                 repetition_penalty=1.5, use_cache=False)[0]
            pair["penalized"] = tok.decode(ids, skip_special_tokens=True)
    # a peft LoRA with non-zero B, on a copy (get_peft_model changes the model it wraps)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v", "wo"], init_lora_weights=False, task_type="SEQ_2_SEQ_LM")
    torch.manual_seed(2)
    adapted = get_peft_model(copy.deepcopy(model), lora).eval()
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    adapted.save_pretrained(os.path.join(d, "peft_adapter"))
    for pair in pairs:
        enc = tok(pair["source"], return_tensors="pt")
        lab = tok(pair["target"], return_tensors="pt").input_ids
        with torch.no_grad():
            pair["loss_with_adapter"] = adapted(**enc, labels=lab).loss.item()
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump({"pairs": pairs}, f, indent=1)
    print(f"made {d}")


def train_records():
    """48 source/target pairs of ragged lengths from the corpus' words."""
    words = " ".join(CORPUS[:4]).replace(";", "").replace(".", "").split()
    gen = torch.Generator().manual_seed(5)
    records = []
    for i in range(48):
        n = 3 + int(torch.randint(0, 12, (1,), generator=gen))
        src = [words[int(j)] for j in torch.randint(0, len(words), (n,), generator=gen)]
        records.append({"input": "summarize: " + " ".join(src), "target": " ".join(src[: 1 + n // 3])})
    return records


def loss_of(model, tok, source, target):
    enc = tok(source, return_tensors="pt")
    with torch.no_grad():
        return model(**enc, labels=tok(target, return_tensors="pt").input_ids).loss.item()


def train(out, name):
    src, d = os.path.join(out, name), os.path.join(out, name + "_train")
    shutil.copytree(src, d, dirs_exist_ok=True)
    with open(os.path.join(d, "config.json")) as f:
        config = json.load(f)
    config["dropout_rate"] = 0.0
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    records = train_records()
    with open(os.path.join(d, "train.jsonl"), "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    tok = AutoTokenizer.from_pretrained(d)
    torch.manual_seed(3)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v", "wo"], lora_dropout=0.0, task_type="SEQ_2_SEQ_LM")
    get_peft_model(T5ForConditionalGeneration.from_pretrained(d, dtype=torch.float32), lora).save_pretrained(os.path.join(d, "init"))
    model = PeftModel.from_pretrained(T5ForConditionalGeneration.from_pretrained(d, dtype=torch.float32), os.path.join(d, "init"), is_trainable=True)
    rows = [{"input_ids": tok(r["input"]).input_ids, "labels": tok(r["target"]).input_ids} for r in records]

    def collate(batch):
        pad = lambda xs, v, w: xs + [v] * (w - len(xs))
        ws, wt = max(len(r["input_ids"]) for r in batch), max(len(r["labels"]) for r in batch)
        labels = torch.tensor([pad(r["labels"], -100, wt) for r in batch])
        start = torch.full((len(batch), 1), config["decoder_start_token_id"])
        return {"input_ids": torch.tensor([pad(r["input_ids"], 0, ws) for r in batch]),
                "attention_mask": torch.tensor([pad([1] * len(r["input_ids"]), 0, ws) for r in batch]),
                "decoder_input_ids": torch.cat([start, labels[:, :-1].masked_fill(labels[:, :-1] == -100, 0)], 1),
                "labels": labels}

    def token_mean(outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"]
        return torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)).float(), labels.view(-1), ignore_index=-100,
                                                 reduction="sum") / num_items_in_batch

    class InOrder(Seq2SeqTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    args = Seq2SeqTrainingArguments(
        output_dir=os.path.join(d, "hf"), per_device_train_batch_size=TRAIN["batch_size"],
        gradient_accumulation_steps=TRAIN["grad_accum"], max_steps=TRAIN["steps"], learning_rate=TRAIN["lr"],
        lr_scheduler_type="linear", warmup_steps=TRAIN["warmup"], weight_decay=TRAIN["weight_decay"],
        max_grad_norm=TRAIN["max_grad_norm"], logging_steps=1, save_strategy="no", report_to=[],
        seed=0, use_cpu=True, disable_tqdm=True, remove_unused_columns=False)
    trainer = InOrder(model=model, args=args, train_dataset=rows, data_collator=collate, compute_loss_func=token_mean)
    trainer.train()
    model.save_pretrained(os.path.join(d, "hf_trained"))
    model.eval()
    pairs = [[r["input"], r["target"]] for r in records[:3]]
    json.dump({"losses": [h["loss"] for h in trainer.state.log_history if "loss" in h], "settings": TRAIN, "pairs": pairs,
               "trained_pair_losses": [loss_of(model, tok, s_, t_) for s_, t_ in pairs]},
              open(os.path.join(d, "hf.json"), "w"), indent=1)
    print(f"trained {d}")


def losses(model_dir, adapter, pairs_json, out_json):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = T5ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    if adapter != "-":
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    json.dump([loss_of(model, tok, s_, t_) for s_, t_ in json.load(open(pairs_json))], open(out_json, "w"))


if __name__ == "__main__":
    if sys.argv[1] == "train":
        train(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "losses":
        losses(*sys.argv[2:6])
    else:
        main()
