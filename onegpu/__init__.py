"""onegpu: a cluster of accelerators that single-device PyTorch code sees as one device."""

from onegpu.launch.relaunch import init
from onegpu.runtime.checkpoint import save_pretrained
from onegpu.runtime.distributed import is_main_process
from onegpu.runtime.prepare import prepare

__all__ = ["init", "is_main_process", "prepare", "save_pretrained"]
__version__ = "0.1.0"
