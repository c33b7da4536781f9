"""Load the demo's checkpoint in one plain process (no onegpu) and print a generated sample."""

import sys

import torch
from transformers import AutoModelForCausalLM, ByT5Tokenizer

path = sys.argv[1] if len(sys.argv) > 1 else "out/demo-llama"
prompt = sys.argv[2] if len(sys.argv) > 2 else "And God said"
model = AutoModelForCausalLM.from_pretrained(path)
tokenizer = ByT5Tokenizer.from_pretrained(path)
torch.manual_seed(0)
ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
out = model.generate(
    ids,
    attention_mask=torch.ones_like(ids),
    max_new_tokens=160,
    do_sample=True,
    temperature=0.7,
    top_k=20,
    pad_token_id=tokenizer.pad_token_id,
)
print(f"Sample from {path}, reloaded in a plain process:")
print(tokenizer.decode(out[0], skip_special_tokens=True))
