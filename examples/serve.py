"""Batch inference on the virtual device: a list of prompts split across the model's replicas, each replica
completing its share in batches, every completion printed in the prompts' order.

onegpu run --workers 2 examples/serve.py                         # a tiny random Llama, built-in prompts
onegpu run --workers 2 examples/serve.py out/demo-llama --prompts prompts.txt
python examples/serve.py out/demo-llama                          # one plain process: the same completions
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, ByT5Tokenizer

import onegpu
from onegpu.plan import Plan

sys.path.insert(0, str(Path(__file__).resolve().parent))
from completions import complete_ids, decode  # noqa: E402
from demo_data import build_demo_model, load_tokenizer  # noqa: E402

PROMPTS = [
    "In the beginning",
    "And God said, Let there be",
    "The LORD is my shepherd;",
    "Blessed are the",
    "For God so loved the world, that he gave",
    "Jesus wept.",
    "And the evening and the morning were",
    "Thou shalt not",
    "Ask, and it shall be given you; seek, and",
    "Love is",
    "Now faith is the substance of things hoped for,",
    "Remember now thy Creator",
]

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("checkpoint", nargs="?", help="a from_pretrained directory (default: a tiny Llama from a config)")
parser.add_argument("--prompts", type=Path, help="a text file, one prompt a line (default: 12 built-in prompts)")
parser.add_argument("--batch-size", type=int, default=4, help="prompts per generate() call of one replica")
parser.add_argument("--max-new-tokens", type=int, default=32)
parser.add_argument("--json", action="store_true", help="print the figures as one JSON line (bench/serve.py)")
parser.add_argument("--plan", help='a Plan as JSON, e.g. \'{"dp": 1, "tp": 2}\' (default: what prepare chooses)')
args = parser.parse_args()

prompts = [line for line in args.prompts.read_text().splitlines() if line.strip()] if args.prompts else PROMPTS
if args.checkpoint:
    model, tokenizer = (
        AutoModelForCausalLM.from_pretrained(args.checkpoint),
        ByT5Tokenizer.from_pretrained(args.checkpoint),
    )
else:
    tokenizer = load_tokenizer()
    model = build_demo_model(vocab_size=len(tokenizer))
model = onegpu.prepare(model, plan=Plan.from_json(args.plan) if args.plan else None)
model.eval()

started = time.perf_counter()
with onegpu.split_between_replicas(prompts) as mine:  # this replica's share; its model calls are its own
    ids = complete_ids(model, tokenizer, mine, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
ids = onegpu.gather_object(ids)  # every replica's, in the prompts' order
elapsed = time.perf_counter() - started

tokens = sum(len(row) for row in ids)
if onegpu.is_main_process() and args.json:
    print(json.dumps({"prompts": len(prompts), "tokens": tokens, "seconds": elapsed, "ids": ids}))
elif onegpu.is_main_process():
    for prompt, completion in zip(prompts, decode(tokenizer, ids)):
        print(f"{prompt!r} -> {completion!r}")
    print(
        f"{len(prompts)} prompts, {tokens} new tokens in {elapsed:.2f} s: {tokens / elapsed:.0f} tokens/s "
        f"| strategy {model.onegpu_plan.strategy} | torch threads {torch.get_num_threads()}"
    )
