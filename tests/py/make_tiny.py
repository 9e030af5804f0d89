"""Makes tiny random-init models with transformers and the reference outputs ftscript must match.

usage: make_tiny.py OUT_DIR [NAME ...]

For each model NAME it writes OUT_DIR/NAME/ (save_pretrained: config.json, model.safetensors,
tokenizer files) and OUT_DIR/NAME/reference.safetensors with
  ids     [2, T]  int64  token ids (two rows)
  logits  [2, T, V] fp32 transformers' logits for those ids
  greedy  [20]    int64  20 greedy tokens after ids[0] (EOS disabled)
"""
import json
import os
import shutil
import tempfile
import sys

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (AutoModelForCausalLM, AutoTokenizer, Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig,
                          Phi3Config, PreTrainedTokenizerFast, Qwen2Config, Qwen3Config,
                          Qwen3MoeConfig)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Fine-tuning adapts a pretrained language model to a new task.",
    "Paris is the capital of France; Berlin is the capital of Germany.",
    "def add(a, b):\n    return a + b\n",
    "12345 + 678 = 13023, naïve café, 東京, emoji 🙂",
] * 20


def tiny_tokenizer(bos=True):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def spm_tokenizer(work, gemma=False):
    """A sentencepiece BPE tokenizer (byte fallback, as Llama 2 / Mistral 7B, or Gemma's, which adds
    no space before the text): tokenizer.model is trained in `work` and converted by transformers;
    returns (tokenizer, tokenizer.model path)."""
    import sentencepiece as spm
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_prefix=os.path.join(work, "sp"), vocab_size=320,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, hard_vocab_limit=False, minloglevel=2,
                                   add_dummy_prefix=not gemma)
    model = os.path.join(work, "tokenizer.model")
    os.replace(os.path.join(work, "sp.model"), model)
    with open(os.path.join(work, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "GemmaTokenizer" if gemma else "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
                   "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, f)
    return AutoTokenizer.from_pretrained(work), model


COMMON = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
              num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
              bos_token_id=0, eos_token_id=1, rms_norm_eps=1e-5)
# the sentencepiece models: its vocabulary (up to 320 pieces, and what transformers adds) and special ids (<unk> 0, <s> 1, </s> 2)
SPM = {**COMMON, "vocab_size": 336, "bos_token_id": 1, "eos_token_id": 2}

CONFIGS = {
    "llama_gqa": lambda: LlamaConfig(**COMMON, rope_theta=10000.0),
    "llama3_rope": lambda: LlamaConfig(**{**COMMON, "max_position_embeddings": 64}, rope_theta=500000.0,
                                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "llama_linear_rope": lambda: LlamaConfig(**COMMON, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    # a sentencepiece vocabulary (tokenizer.model beside tokenizer.json), as Llama 2 and Mistral 7B
    "llama_spm": lambda: LlamaConfig(**SPM, rope_theta=10000.0),
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=8, rope_theta=10000.0),
    "qwen2_tied": lambda: Qwen2Config(**COMMON, tie_word_embeddings=True, rope_theta=1000000.0),
    # head_dim apart from hidden/heads, q/k norms, a window on layers 1 and 2 shorter than the ids
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=16, rope_theta=1000000.0, use_sliding_window=True,
                                 sliding_window=8, max_window_layers=1),
    # soft-caps low enough to bite, the query scale apart from head_dim, windows on layers 0 and 2
    "gemma2": lambda: Gemma2Config(**COMMON, head_dim=16, query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
                                   final_logit_softcapping=3.0, sliding_window=8, pad_token_id=2),
    # per-head (1 + w) q/k norms; a global layer between two sliding ones, each type its own RoPE
    "gemma3": lambda: Gemma3TextConfig(**COMMON, head_dim=16, query_pre_attn_scalar=24, sliding_window=8, pad_token_id=2,
                                       layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                       rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                                                        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    # fused qkv_proj and gate_up_proj; RoPE over 3/4 of each head; LongRoPE whose long factors the
    # 24 reference ids reach (original length 16; attention factor √(1 + ln 16 / ln 16)); a window
    "phi3": lambda: Phi3Config(**{**COMMON, "num_attention_heads": 4, "pad_token_id": 2}, partial_rotary_factor=0.75,
                               sliding_window=8, original_max_position_embeddings=16,
                               rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                                             "long_factor": [1.5, 2.0, 3.0, 4.5, 6.0, 8.0]}),
    # Qwen3-MoE: top-2 of 6 experts (renormalized), layer 1 dense among sparse ones, the
    # load-balancing loss on (its coefficient large enough to move the loss)
    "qwen3_moe": lambda: Qwen3MoeConfig(**COMMON, head_dim=16, rope_theta=1000000.0, num_experts=6,
                                        num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                                        decoder_sparse_step=1, mlp_only_layers=[1], output_router_logits=True,
                                        router_aux_loss_coef=0.05),
    # wide and long enough that a micro-batch's activations outweigh the weights (memory_budget)
    "llama_wide": lambda: LlamaConfig(**{**COMMON, "hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 12,
                                         "num_key_value_heads": 8, "max_position_embeddings": 1024}, rope_theta=10000.0),
    # the families llama.cpp converts, with a sentencepiece vocabulary (its converter knows no tiny
    # BPE pre-tokenizer): for the GGUF import
    "qwen3_spm": lambda: Qwen3Config(**SPM, head_dim=16, rope_theta=1000000.0),
    "phi3_spm": lambda: Phi3Config(**{**SPM, "num_attention_heads": 4, "pad_token_id": 0}, partial_rotary_factor=0.75,
                                   sliding_window=64, original_max_position_embeddings=16,
                                   rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                                                 "long_factor": [1.5, 2.0, 3.0, 4.5, 6.0, 8.0]}),
    # Qwen3-MoE as llama.cpp runs it: every layer sparse, the top-k renormalized
    "qwen3_moe_sparse": lambda: Qwen3MoeConfig(**COMMON, head_dim=16, rope_theta=1000000.0, num_experts=6,
                                               num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
    # Gemma as llama.cpp runs it: sentencepiece, queries scaled by 1/√head_dim
    "gemma2_spm": lambda: Gemma2Config(**SPM, head_dim=16, query_pre_attn_scalar=16, attn_logit_softcapping=2.0,
                                       final_logit_softcapping=3.0, sliding_window=8, pad_token_id=0),
    # (and Gemma 3's layer pattern, which llama.cpp fixes: five sliding layers, then a global one)
    "gemma3_spm": lambda: Gemma3TextConfig(**{**SPM, "num_hidden_layers": 6}, head_dim=16, query_pre_attn_scalar=16,
                                           sliding_window=8, pad_token_id=0,
                                           layer_types=["sliding_attention"] * 5 + ["full_attention"],
                                           rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                                                            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
}


# the models the other tests' training dynamics were tuned on keep transformers' norms
OLDER = ("llama", "mistral", "qwen2")


def attention(cfg):
    """Gemma 2's soft-capped scores exist only in transformers' eager attention (SDPA skips them)."""
    return "eager" if cfg.model_type == "gemma2" else "sdpa"


def main():
    out = sys.argv[1]
    names = sys.argv[2:] or list(CONFIGS)
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    for seed, name in enumerate(names):
        torch.manual_seed(seed)
        cfg = CONFIGS[name]()
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32, attn_implementation=attention(cfg)).eval()
        with torch.no_grad():  # random init is small; widen it so logits are far from uniform
            for p in model.parameters():
                if p.dim() >= 2:  # (and expert stacks, [E, out, in])
                    p.normal_(0, 0.08)
                elif cfg.model_type not in OLDER:  # norms away from their init, so reading them matters
                    p.add_(torch.randn_like(p) * 0.1)
        d = os.path.join(out, name)
        model.save_pretrained(d)
        if name.endswith("_spm"):
            work = tempfile.mkdtemp()
            spm_tok, spm_model = spm_tokenizer(work, gemma=name.startswith("gemma"))
            assert len(spm_tok) <= cfg.vocab_size, len(spm_tok)
            spm_tok.save_pretrained(d)
            shutil.copy(spm_model, os.path.join(d, "tokenizer.model"))
            shutil.rmtree(work)
        else:
            tok.save_pretrained(d)
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(3, cfg.vocab_size, (2, 24), generator=gen)
        with torch.no_grad():
            logits = model(ids).logits.float()
            # LongRoPE: when a sequence first passes the pretraining length, Phi-3's generation drops
            # its cache to compute it again with the long factors, but passes on the one-token
            # cache_position, so that pass masks nothing (transformers 5.17); without a cache,
            # generation is the causal model's
            longrope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type") == "longrope"
            greedy = model.generate(ids[:1, :10], max_new_tokens=20, do_sample=False, eos_token_id=None,
                                    pad_token_id=2, use_cache=not longrope)[0, 10:]
        save_file({"ids": ids.contiguous(), "logits": logits.contiguous(), "greedy": greedy.contiguous()},
                  os.path.join(d, "reference.safetensors"))
        print(f"made {d}")


if __name__ == "__main__":
    main()
