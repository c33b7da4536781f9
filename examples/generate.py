"""Sample text from the demo's checkpoint on the virtual device: single-device generation code plus one onegpu line.

python examples/generate.py out/demo-llama                       # one process
onegpu run --workers 2 examples/generate.py out/demo-llama       # 2 workers: the same text
python examples/generate.py out/demo-llama --plain               # transformers alone: onegpu is not imported
"""

import argparse
import sys

import torch
from transformers import AutoModelForCausalLM, ByT5Tokenizer

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("checkpoint", nargs="?", default="out/demo-llama")
parser.add_argument("prompts", nargs="*", default=["And God said", "In the beginning", "Blessed are the"])
parser.add_argument("--max-new-tokens", type=int, default=120)
parser.add_argument("--plain", action="store_true", help="load and generate without onegpu (not even imported)")
args = parser.parse_args()

model = AutoModelForCausalLM.from_pretrained(args.checkpoint)
tokenizer = ByT5Tokenizer.from_pretrained(args.checkpoint, padding_side="left")
if not args.plain:
    import onegpu

    model = onegpu.prepare(model)  # no optimizer: a plan for inference (replicas when the weights fit)
model.eval()

torch.manual_seed(0)
batch = tokenizer(args.prompts, add_special_tokens=False, padding=True, return_tensors="pt").to(model.device)
out = model.generate(
    **batch,
    max_new_tokens=args.max_new_tokens,
    do_sample=True,
    temperature=0.7,
    top_k=20,
    pad_token_id=tokenizer.pad_token_id,
)
where = "one plain process, without onegpu" if "onegpu" not in sys.modules else f"{model.onegpu_plan.describe()}"
print(f"Samples from {args.checkpoint} ({where}):")
for text in tokenizer.batch_decode(out, skip_special_tokens=True):
    print(f"  {text!r}")
