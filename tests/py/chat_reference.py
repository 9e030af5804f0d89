"""Prints transformers' apply_chat_template renderings (JSON list) for MODEL_DIR's tokenizer.
usage: chat_reference.py MODEL_DIR MESSAGES_JSON"""
import json
import sys

from transformers import AutoTokenizer

tok = AutoTokenizer.from_pretrained(sys.argv[1])
conversations = json.load(open(sys.argv[2]))
out = []
for msgs in conversations:
    for gen in (True, False):
        out.append(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen))
print(json.dumps(out))
