"""Makes tiny random-init T5 models with transformers and the references ftscript must match.

usage: t5_reference.py OUT_DIR NAME

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
and OUT_DIR/NAME/reference.json with text pairs, their losses and greedy generations, and with
the losses of the pairs under OUT_DIR/NAME/peft_adapter, a peft LoRA (q, v, wo; random B) made
on the model.
"""
import copy
import json
import os
import sys

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from peft import LoraConfig, get_peft_model
from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

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


if __name__ == "__main__":
    main()
