"""Advanced Parallelization with trials=3, then the plan the trials chose given to prepare() directly.

argv: OUT. For a Hugging Face Llama and a hand-written module: both runs' losses, gradient norms and eval loss, the
random numbers the loop draws after training, and the plan; each trained model saved to OUT/<scenario>-<run>.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scenarios import train  # noqa: E402

import onegpu  # noqa: E402

out = Path(sys.argv[1])
results = {}
for scenario, batch in (("hf", 4), ("custom", 5)):  # replicas for the one; pipelines for the other (5 is odd)
    torch.manual_seed(0)
    onegpu.enable_advanced_parallelization(trials=3)
    tried = train(scenario, prepare=onegpu.prepare, batch=batch)
    tried["after"] = torch.rand(3).tolist()  # the loop's random stream, as the trials left it
    onegpu.disable_advanced_parallelization()
    plan = tried["model"].onegpu_plan
    torch.manual_seed(0)
    direct = train(scenario, prepare=lambda *objects, p=plan: onegpu.prepare(*objects, plan=p), batch=batch)
    direct["after"] = torch.rand(3).tolist()
    for name, run in (("tried", tried), ("direct", direct)):
        run.pop("loader")
        onegpu.save_pretrained(run.pop("model"), out / f"{scenario}-{name}")
    results[scenario] = {"tried": tried, "direct": direct, "plan": plan.describe(), "reason": plan.reason}
if onegpu.is_main_process():
    (out / "results.json").write_text(json.dumps(results))
