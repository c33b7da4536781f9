"""The job's progress on the terminal, from rank 0 alone, on stderr (stdout stays the script's own).

On a terminal, one line at the bottom, refreshed in place (``rich``'s live display; what the script prints goes
above it). Elsewhere (a pipe, a file, a Ray job's forwarded output), a plain line at the first step, then at most
every ``PLAIN_EVERY_S`` seconds, and the last step's at the end.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

PLAIN_EVERY_S = 10.0
REFRESH_S = 0.25


def progress_text(row: dict[str, Any]) -> str:
    """A row's figures in one line: ``step 20 | loss 5.123 | grad norm 0.870 | 12,345 tokens/s | ...``."""
    parts = [f"step {row['step']}"]
    if (loss := row.get("loss_metrics/global_avg_loss")) is not None:
        parts.append(f"loss {loss:.4g}")
    if (norm := row.get("grad_norm")) is not None:
        parts.append(f"grad norm {norm:.3g}")
    if (tps := row.get("throughput(tps)")) is not None:
        parts.append(f"{tps:,.0f} tokens/s")
    elif (sps := row.get("throughput(sps)")) is not None:
        parts.append(f"{sps:,.1f} samples/s")
    seconds = row.get("time_metrics/end_to_end(s)") or 0.0
    parts.append(f"{seconds:.3g} s/step (data {row.get('time_metrics/data_loading(%)') or 0.0:.0f} %)")
    if (tflops := row.get("tflops")) is not None:
        mfu = row.get("mfu(%)")
        parts.append(f"{tflops:.3g} TFLOPs/worker" + ("" if mfu is None else f", MFU {mfu:.1f} %"))
    if (memory := row.get("memory/max_active(GiB)")) is not None:
        parts.append(f"peak memory {memory:.2f} GiB")
    return "onegpu: " + " | ".join(parts)


class ProgressLine:
    """Shows rows as they come, as the stream allows (see the module's docstring)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.live, self.shown_at, self.last, self.last_shown = None, -PLAIN_EVERY_S, None, False
        self.tty = _isatty(self.stream)

    def show(self, row: dict[str, Any]) -> None:
        self.last, now = row, time.monotonic()
        if self.tty:
            if now - self.shown_at >= REFRESH_S:
                self._live().update(_text(row), refresh=True)
                self.shown_at, self.last_shown = now, True
            else:
                self.last_shown = False
        elif now - self.shown_at >= PLAIN_EVERY_S:
            self._plain(row)
            self.shown_at = now
        else:
            self.last_shown = False

    def close(self) -> None:
        """The last step's figures stay on the screen."""
        if self.live is not None:
            if self.last is not None and not self.last_shown:
                self.live.update(_text(self.last), refresh=True)
            self.live.stop()
            self.live = None
        elif self.last is not None and not self.last_shown:
            self._plain(self.last)
        self.last_shown = True

    def _plain(self, row: dict[str, Any]) -> None:
        try:
            print(progress_text(row), file=self.stream, flush=True)
        except (OSError, ValueError):  # a closed stream: the metrics are in the files anyway
            pass
        self.last_shown = True

    def _live(self):
        if self.live is None:
            from rich.console import Console
            from rich.live import Live

            console = Console(file=self.stream, highlight=False)
            self.live = Live(console=console, auto_refresh=False, redirect_stdout=True, redirect_stderr=True)
            self.live.start()
        return self.live


def _text(row: dict[str, Any]):
    from rich.text import Text

    return Text(progress_text(row), no_wrap=True, overflow="ellipsis")  # one line; no markup read in the figures


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
