"""Worker script: every scenario x strategy through onegpu; rank 0 writes results.json + checkpoints."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.distributed as dist  # noqa: E402
from scenarios import train  # noqa: E402

import onegpu  # noqa: E402

out = Path(sys.argv[1])
results = {}
for scenario in ("hf", "custom", "external"):
    for strategy in ("ddp", "fsdp"):
        run = train(scenario, prepare=onegpu.prepare, strategy=strategy)
        onegpu.save_pretrained(run.pop("model"), out / f"{scenario}-{strategy}")
        if dist.is_initialized():  # what every worker saw, to show the batch really was split
            sizes = [None] * dist.get_world_size()
            dist.all_gather_object(sizes, run["local_batch_sizes"])
            run["local_batch_sizes"] = sizes
        else:
            run["local_batch_sizes"] = [run["local_batch_sizes"]]
        results[f"{scenario}-{strategy}"] = run
if onegpu.is_main_process():
    (out / "results.json").write_text(json.dumps(results))
