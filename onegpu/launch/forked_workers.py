"""Start CPU workers by forking them from a server that imported torch and onegpu once.

A fresh Python process spends seconds importing torch, torch.distributed and onegpu (and transformers), each
worker again, on cores the other workers need. torchelastic can start its workers as a function instead of a
command, forked from multiprocessing's fork server: that server imports the modules below once, and every
worker, first or restarted, starts from it with them imported. CUDA workers do not fork (CUDA cannot be used
in a forked process): they start as fresh processes, as torchrun's do.

The server is a fresh process of its own (no thread, lock or signal handler of the launcher is copied into a
worker); ``launch.worker.forked`` gives each worker the launcher's environment of this launch, a session of its
own and unbuffered output, as ``python -u -m onegpu.launch.worker`` under torchrun had.
"""

from __future__ import annotations

import ast
import multiprocessing
import os
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from torch.distributed.launcher.api import elastic_launch
from torch.distributed.run import config_from_args, get_args_parser

from onegpu.launch.worker import forked

# what every worker imports: the worker's entry point, prepare() and every parallel technique
PRELOAD = (
    "onegpu.launch.fork_server",
    "onegpu.launch.worker",
    "onegpu.api",
    "torch.distributed.pipelining",
    "torch.distributed.checkpoint",
)
# imported too when the script imports the package: Hugging Face models' shared code
PRELOAD_IF_IMPORTED = {"transformers": "transformers.modeling_utils"}


def run_forked(script: str, args: list[str], *, options: list[str]) -> None:
    """Run ``script ARGS`` on torchelastic with torchrun's ``options`` (workers, restarts, rendezvous id), each
    worker forked from the preloaded server."""
    standalone = ["--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0", "--start-method=forkserver"]
    config, _, _ = config_from_args(get_args_parser().parse_args([*standalone, *options, script, *args]))
    multiprocessing.get_context("forkserver").set_forkserver_preload(list(preloaded_modules(script)))
    with _main_module_hidden():
        elastic_launch(config, entrypoint=forked)(dict(os.environ), script, *args)


def preloaded_modules(script: str) -> tuple[str, ...]:
    """What the fork server imports for ``script``: onegpu's modules, and the shared code of the packages it
    imports, itself or through a module of its project (``train.py`` importing ``model.py`` from its folder or
    the one above)."""
    folder, imported = Path(script).resolve().parent, imported_packages(Path(script))
    for name in list(imported):
        for module in (folder / f"{name}.py", folder.parent / f"{name}.py"):
            if module.is_file():
                imported |= imported_packages(module)
    return PRELOAD + tuple(module for package, module in PRELOAD_IF_IMPORTED.items() if package in imported)


def imported_packages(path: Path) -> set[str]:
    """The top-level names of the modules a Python file imports anywhere in it (none when it cannot be read)."""
    try:
        tree = ast.parse(path.read_text(errors="replace"))
    except (OSError, SyntaxError, ValueError):
        return set()
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


@contextmanager
def _main_module_hidden() -> Iterator[None]:
    """multiprocessing runs the launcher's main module again in each worker it forks when that module is a file
    (``python train.py`` calling ``onegpu.init()``): hidden, the workers run the script once, themselves."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main
