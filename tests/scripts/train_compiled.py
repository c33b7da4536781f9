"""Worker script: train with every repeated block compiled (torch.compile, inductor), replicated and sharded;
and measure the job's devices as if each worker were a node of its own.

argv: OUT. Writes results.json and each trained model.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scenarios import train  # noqa: E402

import onegpu  # noqa: E402
from onegpu.launch.process_group import current_worker  # noqa: E402
from onegpu.parallel.compile import CompiledForward  # noqa: E402
from onegpu.plan import Plan  # noqa: E402
from onegpu.planner.cluster_measure import measure_job_cluster  # noqa: E402

out = Path(sys.argv[1])
results = {}
for scenario, sharding in (("hf", "none"), ("custom", "parameters")):
    run = train(scenario, prepare=onegpu.prepare, plan=Plan(dp=2, sharding=sharding, compile=True))
    model = run.pop("model")
    run.pop("loader")
    run["compiled"] = sum(isinstance(m.__dict__.get("forward"), CompiledForward) for m in model.modules())
    onegpu.save_pretrained(model, out / scenario)
    results[scenario] = run
worker = current_worker()
two_nodes = measure_job_cluster(rank=worker.rank, world_size=2, device=worker.device, devices_per_node=1, cache=False)
results["two nodes"] = two_nodes.to_dict()
if onegpu.is_main_process():
    (out / "results.json").write_text(json.dumps(results))
