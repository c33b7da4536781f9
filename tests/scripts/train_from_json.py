"""Worker script: train from plans made in another process and written as JSON, without inspecting the model.

argv: OUT PLANS.json. The model's inspection is made to fail here: a layout must be built from the plan alone.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scenarios import train  # noqa: E402

import onegpu  # noqa: E402
import onegpu.planner.inspection  # noqa: E402
from onegpu.plan import Plan  # noqa: E402


def refuse(*args, **kwargs):
    raise AssertionError("the model was inspected on a worker, though its plan came fitted")


onegpu.planner.inspection.describe = refuse
out, plans = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
results = {}
for name, text in plans.items():
    run = train("hf", prepare=onegpu.prepare, plan=Plan.from_json(text))
    run.pop("loader")
    onegpu.save_pretrained(run.pop("model"), out / name)
    results[name] = run
if onegpu.is_main_process():
    (out / "results.json").write_text(json.dumps(results))
