"""onegpu: a cluster of accelerators that single-device PyTorch code sees as one device.

The public names are imported when first used, so that ``onegpu smi`` and other commands that need
neither torch's distributed stack nor the planner start in a fraction of the time.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "Plan": "onegpu.plan",
    "disable_advanced_parallelization": "onegpu.api",
    "enable_advanced_parallelization": "onegpu.api",
    "find_plan": "onegpu.planner.search",
    "gather": "onegpu.runtime.gather",
    "gather_object": "onegpu.runtime.replicas",
    "init": "onegpu.launch.relaunch",
    "is_main_process": "onegpu.launch.process_group",
    "load_state": "onegpu.runtime.state",
    "prepare": "onegpu.api",
    "save_pretrained": "onegpu.runtime.checkpoint",
    "save_state": "onegpu.runtime.state",
    "saved_extra": "onegpu.runtime.state",
    "split_between_replicas": "onegpu.runtime.replicas",
}
__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'onegpu' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
