"""transformers' and TRL's assistant masks for multi-turn conversations, for tests/datasets.rs.

usage: chat_mask_reference.py MODEL_DIR CONVERSATIONS_JSON OUT_JSON

MODEL_DIR's chat template marks assistant turns with {% generation %}. For each conversation
(a list of {role, content}) writes {input_ids, assistant_masks} from
`apply_chat_template(..., tokenize=True, return_dict=True, return_assistant_tokens_mask=True)`,
and `trl_labels`: the labels TRL's SFTTrainer builds from the same data with
`assistant_only_loss=True` (its dataset preparation, run without a model).
"""
import json
import sys
import tempfile
import types

sys.modules["kernels"] = None  # TRL imports bitsandbytes, which would fetch a CPU kernel from the Hub through it

from datasets import Dataset
from transformers import AutoTokenizer
from trl import SFTConfig, SFTTrainer

model_dir, conversations_path, out_path = sys.argv[1:4]
tok = AutoTokenizer.from_pretrained(model_dir)
conversations = json.load(open(conversations_path))
out = []
for messages in conversations:
    enc = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    out.append({"input_ids": list(enc["input_ids"]), "assistant_masks": list(enc["assistant_masks"])})

with tempfile.TemporaryDirectory() as tmp:
    args = SFTConfig(output_dir=tmp, assistant_only_loss=True, max_length=None, report_to=[], dataset_num_proc=None,
                     use_cpu=True, bf16=False)
    trainer_state = types.SimpleNamespace(_tokenizer=tok, chat_template=None, completion_only_loss=False)
    data = Dataset.from_list([{"messages": m} for m in conversations])
    prepared = SFTTrainer._prepare_dataset(trainer_state, data, tok, args, False, None, "train")
    for row, ours in zip(prepared, out):
        assert list(row["input_ids"]) == ours["input_ids"], "TRL tokenized differently from apply_chat_template"
        ours["trl_labels"] = list(row["labels"])
json.dump(out, open(out_path, "w"))
