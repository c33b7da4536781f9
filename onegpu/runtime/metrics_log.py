"""Where rank 0 of a job of ``onegpu run`` writes each step's row (``runtime/step_metrics.py``):

- ``<log_dir>/metrics.jsonl``, one JSON object per line, each line flushed as it is written (a killed job keeps
  the lines written so far);
- ``<log_dir>/tensorboard/``, TensorBoard event files (``torch.utils.tensorboard``'s ``FileWriter``, one summary of
  every figure per step: a sixth of the time of one ``add_scalar`` per figure), written by a thread of their own
  (which also imports TensorBoard, about a second, while the first steps run), flushed every few seconds and at
  exit;
- the progress line on the terminal (``runtime/progress_line.py``).

``log_dir`` is ``onegpu run --log-dir``, by default the job's directory (``ONEGPU_LOG_DIR``).
"""

from __future__ import annotations

import atexit
import json
import math
import queue
import threading
from pathlib import Path
from typing import Any

from onegpu.runtime.progress_line import ProgressLine

METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
FLUSH_S = 2


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The row's figures as TensorBoard scalars: each number under its name, each worker's peak memory under
    ``memory/peak_per_worker(GiB)/rank<i>``."""
    found = {}
    for name, value in row.items():
        if name in ("step", "time"):
            continue
        if isinstance(value, list):
            found.update({f"{name}/rank{i}": v for i, v in enumerate(value) if v is not None})
        elif isinstance(value, (int, float)) and math.isfinite(value):
            found[name] = float(value)
    return found


class MetricsLog:
    """Rank 0's writer of the job's rows, opened once per process."""

    def __init__(self, log_dir: Path, *, progress: ProgressLine | None = None) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.file = (log_dir / METRICS).open("a", buffering=1)  # line-buffered: each row reaches the file whole
        self.progress = progress
        self.rows: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._tensorboard, args=(log_dir / TENSORBOARD,), daemon=True)
        self.thread.start()
        atexit.register(self.close)

    def write(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(_finite(row)) + "\n")
        if self.thread.is_alive():  # a TensorBoard that cannot be written does not stop the others
            self.rows.put(row)
        if self.progress is not None:
            self.progress.show(row)

    def close(self) -> None:
        """At exit: the rows not yet in the event files are written, the progress line says the last step."""
        if self.progress is not None:
            self.progress.close()
        self.rows.put(None)
        self.thread.join(timeout=30)
        self.file.close()

    def _tensorboard(self, directory: Path) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary
        from torch.utils.tensorboard.writer import FileWriter

        writer = FileWriter(str(directory), flush_secs=FLUSH_S)
        try:
            while (row := self.rows.get()) is not None:
                values = [Summary.Value(tag=name, simple_value=value) for name, value in scalars(row).items()]
                writer.add_summary(Summary(value=values), global_step=row["step"], walltime=row["time"])
        finally:
            writer.close()


def _finite(value: Any) -> Any:
    """The row with a figure that is not a number (a diverged loss) as null, which strict JSON readers accept."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
