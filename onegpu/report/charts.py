"""Matplotlib on its file backend (Agg), and figures written whole: as an SVG string to inline in a page, or as a
PNG or SVG file (written under a temporary name, then renamed, so a failed drawing leaves no half file)."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from onegpu.errors import UsageError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FORMATS = {".png": "png", ".svg": "svg"}
# one colour per category, the same in every chart (matplotlib's tab10, then tab20's lighter halves)
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896",
)  # fmt: skip


def figure(*, width: float, height: float) -> Figure:
    """A new figure not tied to pyplot's global state (nothing to close, nothing shown)."""
    from matplotlib.figure import Figure

    made = Figure(figsize=(width, height), layout="constrained")
    made.patch.set_facecolor("white")
    return made


def file_format(path: Path) -> str:
    """``png`` or ``svg``, from the file's suffix; anything else is a one-line error."""
    found = FORMATS.get(Path(path).suffix.lower())
    if found is None:
        raise UsageError(f"{path}: give a file name ending in .png or .svg (the suffix chooses the format)")
    return found


def writable(path: Path) -> str:
    """The format to write ``path`` in, once its suffix and directory are right (else a one-line error)."""
    kind = file_format(path)
    if not Path(path).parent.is_dir():
        raise UsageError(f"{path}: the directory {Path(path).parent} does not exist: create it or write elsewhere")
    return kind


def save(drawn: Figure, path: Path) -> Path:
    """Write ``drawn`` to ``path`` in the format its suffix names, whole or not at all."""
    path = Path(path)
    kind = writable(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with _svg_text():
            drawn.savefig(partial, format=kind, dpi=150)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def svg_text(drawn: Figure, *, chart_id: str) -> str:
    """``drawn`` as one ``<svg>`` element to inline in HTML, marked ``class="chart"``, ids unique to ``chart_id``."""
    out = io.StringIO()
    with _svg_text():
        drawn.savefig(out, format="svg")
    text = out.getvalue()
    text = text[text.index("<svg") :]  # no XML prologue or DOCTYPE inside HTML
    # matplotlib's ids (clip paths, glyphs) repeat across figures: make them unique within the page
    text = re.sub(r'id="([^"]+)"', rf'id="{chart_id}-\1"', text)
    text = re.sub(r"url\(#([^)]+)\)", rf"url(#{chart_id}-\1)", text)
    text = re.sub(r'href="#([^"]+)"', rf'href="#{chart_id}-\1"', text)
    return text.replace("<svg ", f'<svg class="chart" data-chart="{chart_id}" ', 1)


def _svg_text() -> Any:
    """Text in SVG as ``<text>`` elements (searchable, small, drawn in the browser's fonts), not glyph paths."""
    import matplotlib

    return matplotlib.rc_context({"svg.fonttype": "none"})
