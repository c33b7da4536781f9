"""onegpu: a cluster of accelerators that single-device PyTorch code sees as one device."""

from onegpu.launch.relaunch import init
from onegpu.planner.plan import Plan
from onegpu.planner.search import plan
from onegpu.runtime.advanced import disable_advanced_parallelization, enable_advanced_parallelization
from onegpu.runtime.checkpoint import save_pretrained
from onegpu.runtime.distributed import is_main_process
from onegpu.runtime.prepare import prepare

__all__ = [
    "Plan",
    "disable_advanced_parallelization",
    "enable_advanced_parallelization",
    "init",
    "is_main_process",
    "plan",
    "prepare",
    "save_pretrained",
]
__version__ = "0.1.0"
