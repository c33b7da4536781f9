"""onegpu: a cluster of accelerators that single-device PyTorch code sees as one device."""

from onegpu.api import disable_advanced_parallelization, enable_advanced_parallelization, prepare
from onegpu.launch.process_group import is_main_process
from onegpu.launch.relaunch import init
from onegpu.plan import Plan
from onegpu.planner.search import find_plan
from onegpu.runtime.checkpoint import save_pretrained

__all__ = [
    "Plan",
    "disable_advanced_parallelization",
    "enable_advanced_parallelization",
    "find_plan",
    "init",
    "is_main_process",
    "prepare",
    "save_pretrained",
]
__version__ = "0.1.0"
