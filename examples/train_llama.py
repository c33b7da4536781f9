"""Fine-tune a tiny Llama on the King James Bible: ordinary single-device code plus two onegpu lines.

onegpu run --workers 2 examples/train_llama.py     # or: python examples/train_llama.py
"""

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

import onegpu

onegpu.init()  # `python train_llama.py` starts the workers itself

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_data import GLOBAL_BATCH, LR, SEQ_LEN, TextChunks, build_demo_model, load_tokenizer  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--steps", type=int, default=200)
parser.add_argument(
    "--log-every", type=int, default=0, help="print a step line every N steps (0: only onegpu's progress line)"
)
parser.add_argument("--batch-size", type=int, default=GLOBAL_BATCH, help="global batch, as on one device")
parser.add_argument("--out", default="out/demo-llama")
args = parser.parse_args()

tokenizer = load_tokenizer()
chunks = TextChunks(seq_len=SEQ_LEN, tokenizer=tokenizer)
held_out = len(chunks) // 20
train_set = Subset(chunks, range(held_out, len(chunks)))
eval_set = Subset(chunks, range(held_out))
model = build_demo_model(vocab_size=len(tokenizer))
optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
warmup = max(1, args.steps // 20)
scheduler = torch.optim.lr_scheduler.LambdaLR(
    optimizer,
    lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, args.steps) / args.steps)),
)
train_loader = DataLoader(
    train_set, batch_size=args.batch_size, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0)
)
eval_loader = DataLoader(eval_set, batch_size=args.batch_size, drop_last=True)

model, optimizer, train_loader, eval_loader = onegpu.prepare(model, optimizer, train_loader, eval_loader)


def evaluate(batches: int = 8) -> float:
    model.eval()
    with torch.no_grad():
        losses = [model(**batch).loss.item() for batch, _ in zip(eval_loader, range(batches))]
    model.train()
    return sum(losses) / len(losses)


params = sum(p.numel() for p in model.parameters())
tokens_per_step = args.batch_size * SEQ_LEN
print(
    f"Model: Llama, {params / 1e6:.2f}M parameters | global batch {args.batch_size} x {SEQ_LEN} tokens "
    f"= {tokens_per_step} tokens/step | {args.steps} steps"
)
eval_before = evaluate()
print(f"Held-out loss before training: {eval_before:.3f}")

step, first_loss, started = 0, None, time.perf_counter()
window_start, window_steps = time.perf_counter(), 0
while step < args.steps:
    for batch in train_loader:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        step += 1
        window_steps += 1
        first_loss = loss.item() if first_loss is None else first_loss
        if args.log_every and (step % args.log_every == 0 or step == args.steps or step == 1):
            duration = (time.perf_counter() - window_start) / window_steps
            print(
                f"[Step {step}/{args.steps}] | Loss: {loss.item():.3f} | Duration: {duration:.2f} s | "
                f"Throughput: {tokens_per_step / duration:.0f} tokens/sec",
                flush=True,
            )
            window_start, window_steps = time.perf_counter(), 0
        if step == args.steps:
            break
elapsed = time.perf_counter() - started
eval_after = evaluate()
onegpu.save_pretrained(model, args.out)
if onegpu.is_main_process():
    tokenizer.save_pretrained(args.out)
print(
    f"Done: {args.steps} steps in {elapsed:.1f} s, {args.steps * tokens_per_step / elapsed:.0f} tokens/sec | "
    f"strategy {model.onegpu_plan.strategy} | train loss {first_loss:.3f} -> {loss.item():.3f} | "
    f"held-out loss {eval_before:.3f} -> {eval_after:.3f}"
)
print(f"Checkpoint: {args.out} (load it with transformers' from_pretrained, no onegpu needed)")
