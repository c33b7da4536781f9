"""Worker script on a Ray pool: two scenarios trained through onegpu, where each rank ran, and the cluster the
planner measures with the job's own workers; rank 0 writes results.json and the trained models."""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.distributed as dist  # noqa: E402
from scenarios import train  # noqa: E402

import onegpu  # noqa: E402
from onegpu.planner.cluster import measure_job_cluster  # noqa: E402

out = Path(sys.argv[1])
results = {}
for scenario, strategy in (("custom", "fsdp"), ("hf", "ddp")):
    run = train(scenario, prepare=onegpu.prepare, strategy=strategy)
    run.pop("loader")
    onegpu.save_pretrained(run.pop("model"), out / f"{scenario}-{strategy}")
    results[f"{scenario}-{strategy}"] = run
place = {k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ONEGPU_DEVICES")}
places = [None] * dist.get_world_size()
dist.all_gather_object(places, place)
cluster = measure_job_cluster(
    rank=dist.get_rank(), world_size=dist.get_world_size(), devices_per_node=int(place["LOCAL_WORLD_SIZE"]), cache=False
)
if onegpu.is_main_process():
    results["places"] = places
    results["cluster"] = {"nodes": cluster.nodes, "devices_per_node": cluster.devices_per_node}
    results["ray_in_worker"] = "ray" in sys.modules  # a worker reports to the ledger without joining Ray
    (out / "results.json").write_text(json.dumps(results))
