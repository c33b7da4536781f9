"""Worker script: greedy generation with the KV cache, and forward passes, under pipeline plans (2 workers).

A 4-block Llama and GPT-2 (tied embeddings) with a vocabulary of 257 are prepared (no optimizer, no loader)
under pp=2 with GPipe, 1F1B (2 micro-batches) and interleaved 1F1B (4 stages, 2 per worker), and generate
from 3 left-padded prompts (:func:`scenarios.greedy_generation`; 3 rows: not a multiple of the micro-batches);
then a forward of 4 rows runs through the schedule, and they generate with a static cache. A Llama built on
the meta device (each worker allocates only its stage) generates too, and is saved for the reference. The
last GPT-2 samples (do_sample=True), seeded, then from random streams each worker moved differently. A hand-written model (no cache) runs a forward of 3 rows. Every worker reports what its loop saw, the parameters
it holds and, per layer of its cache, the keys' shape; rank 0 writes them all to results.json.
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scenarios import GENERATED, ODD_VOCAB, build, greedy_generation, meta_llama, write_gathered  # noqa: E402

import onegpu  # noqa: E402
from onegpu.plan import Plan  # noqa: E402

out = Path(sys.argv[1])
plans = {
    "pp2-gpipe": Plan(dp=1, pp=2, microbatches=2, schedule="gpipe"),
    "pp2-1f1b": Plan(dp=1, pp=2, microbatches=2, schedule="1f1b"),
    "pp2-interleaved": Plan(dp=1, pp=2, microbatches=2, schedule="interleaved"),
}
report = {"rank": int(os.environ["RANK"])}
for scenario in ("hf-odd", "gpt2-odd"):
    for name, plan in plans.items():
        model = onegpu.prepare(build(scenario, layers=4)[0], plan=plan)
        seen = greedy_generation(model, vocab=ODD_VOCAB)
        ids, _ = seen["prompts"]
        with torch.no_grad():
            four_rows = model(input_ids=torch.cat([ids, ids[:1]])).logits
        report[f"{scenario}-{name}"] = {
            "tokens": seen["tokens"].tolist(),
            "step_logits": seen["step_logits"].tolist(),
            "forward_logits": seen["forward_logits"].tolist(),
            "four_row_logits": four_rows.tolist(),
            "cache_length": seen["cache"].get_seq_length(),
            "cache_keys": [list(layer.keys.shape) for layer in seen["cache"].layers],
            "held": sum(p.numel() for p in model.parameters()),
            "static_cache_tokens": greedy_generation(model, vocab=ODD_VOCAB, cache_implementation="static")[
                "tokens"
            ].tolist(),
        }
# sampling: seeded, then from streams the workers moved apart (each worker's loop must pick the same tokens)
torch.manual_seed(7)
report["sampled"] = greedy_generation(model, vocab=ODD_VOCAB, do_sample=True)["tokens"].tolist()
torch.rand(report["rank"] + 1)
report["sampled_unseeded"] = greedy_generation(model, vocab=ODD_VOCAB, do_sample=True)["tokens"].tolist()

model = onegpu.prepare(meta_llama(num_hidden_layers=4), plan=plans["pp2-gpipe"])  # never whole on a worker
seen = greedy_generation(model, vocab=512)
report["meta-pp2-gpipe"] = {key: seen[key].tolist() for key in GENERATED} | {
    "held": sum(p.numel() for p in model.parameters()),
    "held_on": sorted({p.device.type for p in model.parameters()}),
}
onegpu.save_pretrained(model, out / "meta-llama")  # gathered on rank 0: the test's one-device reference
model, data = build("custom", layers=3)  # a hand-written model (4 blocks, a skip connection): no cache
model = onegpu.prepare(model, plan=plans["pp2-gpipe"])
model.eval()
with torch.no_grad():
    report["custom-pp2-gpipe"] = model(data.x[:3]).tolist()  # 3 rows, 2 micro-batches: run whole
write_gathered(report, str(out / "results.json"))
