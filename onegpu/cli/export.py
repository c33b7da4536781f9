"""``onegpu export CKPT OUT``: a state of ``onegpu.save_state`` as one consolidated checkpoint, without workers.

CKPT is a directory of states (its newest committed one is exported) or one ``step-*`` directory. OUT gets
``model.safetensors`` (the model's own parameter names, whole), and ``config.json`` when the state holds a
Hugging Face model's config: ``from_pretrained(OUT)`` loads it. Read in this one process, with torch's
checkpoint reader (no process group): every worker's shards are joined by torch.distributed.checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Annotated

import typer

from onegpu.cli.one_line import one_line_errors
from onegpu.errors import UsageError
from onegpu.runtime.state_files import newest_state


def export(
    checkpoint: Annotated[Path, typer.Argument(help="A directory of states, or one step-* directory in it.")],
    out: Annotated[Path, typer.Argument(help="Where to write model.safetensors (and config.json).")],
) -> None:
    """Write a saved state's model as one Hugging Face / safetensors checkpoint."""
    state = newest_state(checkpoint) if checkpoint.is_dir() else None
    if state is None:
        what = "does not exist" if not checkpoint.exists() else "holds no committed state"
        raise UsageError(f"export: {checkpoint} {what}: give a directory onegpu.save_state wrote, or a step-* in it")
    tensors = consolidated(state)
    written = write_checkpoint(tensors, out=out, config=state / "config.json")
    typer.echo(f"onegpu: exported {state} ({len(tensors)} tensors) to {written}")


def consolidated(state: Path) -> dict:
    """The model's whole tensors in ``state``, by its own names, read in this process alone."""
    import torch
    import torch.distributed.checkpoint as dcp

    from onegpu.parallel.state_dict import MODEL

    metadata = dcp.FileSystemReader(state).read_metadata().state_dict_metadata
    tensors = {
        key: torch.empty(tuple(m.size), dtype=m.properties.dtype)
        for key, m in metadata.items()
        if key.startswith(MODEL) and hasattr(m, "size")
    }
    with warnings.catch_warnings():  # that it reads in one process is the point
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(tensors, checkpoint_id=state, no_dist=True)
    return {key[len(MODEL) :]: tensor for key, tensor in tensors.items()}


def write_checkpoint(tensors: dict, *, out: Path, config: Path) -> Path:
    """``out`` with model.safetensors (and a copy of ``config``), appearing whole (replacing an earlier export)."""
    from safetensors.torch import save_file

    from onegpu.runtime.checkpoint import MARKER, WEIGHTS_NAME, _fsync_tree, _replace, _unshared, check_target

    target = out.resolve()
    check_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.export-", dir=target.parent))
    try:
        (staging / MARKER).write_text("Written by onegpu export: onegpu may replace this directory.\n")
        save_file(_unshared(tensors), str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
        if config.is_file():
            shutil.copy2(config, staging / "config.json")
        umask = os.umask(0)
        os.umask(umask)
        for path in (staging, *staging.iterdir()):
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
        _fsync_tree(staging)
        _replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def register(app: typer.Typer) -> None:
    app.command("export")(one_line_errors(export))
