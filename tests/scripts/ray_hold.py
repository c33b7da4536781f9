"""Worker script of tests/test_ray_pool.py: joins the job, writes OUT/running (rank 0) and waits for OUT/stop."""

import sys
import time
from pathlib import Path

import onegpu

out = Path(sys.argv[1])
onegpu.init()
if onegpu.is_main_process():
    (out / "running").write_text("")
while not (out / "stop").exists():
    time.sleep(0.2)
