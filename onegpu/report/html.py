"""The run report (``onegpu report JOB``): one self-contained HTML page of a job, its charts inlined as SVG.

No external file, font, script or stylesheet: the page works offline and can be mailed. A small inline script
checks that every chart drew (non-zero bounding box) and marks ``<body data-charts-drawn="N">``.
"""

from __future__ import annotations

import html
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from onegpu.errors import UsageError
from onegpu.plan import GB
from onegpu.report import job_charts
from onegpu.report.charts import svg_text
from onegpu.report.job_record import JobRecord
from onegpu.report.plan_plot import plan_figure, short_name

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1280px; padding: 1em 2em; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; margin-top: 1.8em; }
table { border-collapse: collapse; margin: 0.6em 0; } td, th { border: 1px solid #ddd; padding: 3px 8px; }
th { background: #f4f4f4; text-align: left; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.charts { display: flex; flex-wrap: wrap; gap: 1em; } svg.chart { max-width: 100%; height: auto; }
.missing { color: #777; font-style: italic; } .state { font-weight: bold; } .bad { color: #b00; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; }
"""
# marks the page once its charts drew: how many have a non-empty box, and how many there are
SCRIPT = """
(function () {
  const charts = Array.from(document.querySelectorAll("svg.chart"));
  const drawn = charts.filter(function (chart) {
    const box = chart.getBBox();
    return box.width > 0 && box.height > 0;
  });
  document.body.dataset.chartsDrawn = String(drawn.length);
  document.body.dataset.charts = String(charts.length);
})();
"""


def write_report(record: JobRecord, output: Path | None = None) -> Path:
    """Write the report of ``record`` to ``output`` (default ``<job dir>/report.html``), whole or not at all."""
    path = Path(output) if output is not None else record.directory / "report.html"
    if not path.parent.is_dir():
        raise UsageError(f"{path}: the directory {path.parent} does not exist: create it or write elsewhere")
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        partial.write_text(render(record))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def render(record: JobRecord) -> str:
    """The page, as HTML text."""
    body = [
        _header(record),
        _section("training", "Training", _training(record)),
        _section("memory", "Memory per worker", _memory(record)),
        _section("plan", "The plan, and why it won", _plan(record)),
        _section("timeline", "Pipeline timeline", _timeline(record)),
        _section("devices", "Devices and leases", _devices(record)),
        _section("doctor", "Hang doctor", _doctor(record)),
    ]
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>onegpu report: {_e(record.name)}</title>'
        f"<style>{STYLE}</style></head>\n<body>\n{''.join(body)}\n<script>{SCRIPT}</script>\n</body></html>\n"
    )


def _header(record: JobRecord) -> str:
    job = record.job
    if record.running:
        state = '<span class="state">running</span>: what it recorded so far'
    elif job.get("exit") == 0:
        state = '<span class="state">ended</span> (exit 0)'
    else:
        state = f'<span class="state bad">failed</span> (exit {_e(job.get("exit"))}) {_e(job.get("error") or "")}'
    started, ended = job.get("started"), job.get("ended")
    took = f" for {_duration((ended or time.time()) - started)}" if started else ""
    command = " ".join(str(a) for a in [job.get("script", "?"), *job.get("args", ())])
    lines = [
        f"<h1>onegpu job {_e(record.name)}</h1>",
        f"<p>{state}; started {_when(started)}{took}, by {_e(job.get('user', '?'))}.</p>",
        f"<p><code>onegpu run --workers {_e(job.get('workers', '?'))} {_e(command)}</code></p>",
        f'<p class="missing">record: {_e(record.directory)}; report written {_when(time.time())}</p>',
    ]
    if not job:
        lines.append(_missing("job.json not written yet: the launcher writes it when the job starts"))
    return "\n".join(lines)


def _training(record: JobRecord) -> str:
    metrics = record.metrics
    if not metrics:
        return _missing("no step recorded yet (metrics.jsonl is empty or absent)")
    charts = [job_charts.loss_chart(metrics), job_charts.throughput_chart(metrics, record.plan)]
    last = metrics[-1]
    shown = [
        ("step", "step"),
        ("loss", job_charts.LOSS),
        ("gradient norm", job_charts.GRAD_NORM),
        ("tokens/s", job_charts.TOKENS),
        ("samples/s", job_charts.SAMPLES),
        ("step time (s)", job_charts.STEP_TIME),
        ("data loading (%)", "time_metrics/data_loading(%)"),
        ("TFLOP/s", "tflops"),
        ("MFU (%)", "mfu(%)"),
        ("max active memory (GiB)", job_charts.MAX_ACTIVE),
    ]
    cells = [(label, last[key]) for label, key in shown if isinstance(last.get(key), int | float)]
    table = _table([label for label, _ in cells], [[_number(v) for _, v in cells]])
    notes = "" if charts[0] else _missing("no loss recorded: the model's output carries none onegpu could find")
    count = len(job_charts.runs(metrics, "step"))
    again = f" in {count} runs (the step count started again: the script prepared again, or the job restarted)"
    recorded = f"<p>{len(metrics)} steps recorded{again if count > 1 else ''}.</p>"
    return _charts(charts, "training") + notes + recorded + table


def _memory(record: JobRecord) -> str:
    peaks = job_charts.peak_per_worker(record.metrics)
    if not peaks:
        return _missing("no memory recorded yet")
    text = f"<p>Largest peak {max(peaks):.2f} GiB (rank {peaks.index(max(peaks))})"
    plan = record.plan
    if plan is not None and plan.predicted is not None:
        predicted = plan.predicted.memory_per_device_bytes / job_charts.GIB
        text += f"; the plan predicted {predicted:.2f} GiB per device ({max(peaks) / predicted:.0%} of it)"
    return _charts([job_charts.memory_chart(record.metrics, plan)], "memory") + text + ".</p>"


def _plan(record: JobRecord) -> str:
    plan = record.plan
    if plan is None:
        return _missing("no plan recorded yet (plan.json: rank 0 writes it after prepare)")
    lines = [f"<p><b>{_e(short_name(plan))}</b>: {_e(plan.describe())}</p>"]
    if plan.reason:
        lines.append(f"<p>Why: {_e(plan.reason)}.</p>")
    predicted = plan.predicted
    if predicted is None:
        lines.append(_missing("no prediction: the plan was given by hand, or chosen by the simple rule (memory alone)"))
        return "\n".join(lines)
    measured = job_charts.series(record.metrics, job_charts.STEP_TIME)[1]
    step = f"{predicted.step_time_s:.3f} s per step predicted"
    if measured:
        median = sorted(measured)[len(measured) // 2]
        step += f", {median:.3f} s measured (median of {len(measured)} steps)"
    memory = predicted.memory_per_device_bytes
    lines.append(f"<p>{step}; {memory / GB:.2f} GB ({memory / job_charts.GIB:.2f} GiB) per device predicted.</p>")
    lines += [f'<p class="missing">unmeasured: {_e(note)}</p>' for note in plan.confidence]
    rows = [["chosen", short_name(plan), *_predicted(plan.predicted), ""]]
    rows += [["runner-up", short_name(a), *_predicted(a.predicted), ""] for a in plan.alternatives if a.predicted]
    rows += [["rejected", short_name(r.plan), *_predicted(r.plan.predicted), r.why] for r in plan.rejected]
    lines.append(_table(["", "plan", "step (s)", "tokens/s", "GB per device", "why it lost"], rows))
    lines.append(_charts([plan_figure(plan)], "plan"))
    return "\n".join(lines)


def _predicted(p: Any) -> list[str]:
    return [f"{p.step_time_s:.3f}", f"{p.tokens_per_s:,.0f}", f"{p.memory_per_device_bytes / GB:.2f}"]


def _timeline(record: JobRecord) -> str:
    trace = record.timeline
    if trace is None:
        why = record.missing.get("timeline", "not recorded for this job")
        pipelined = record.plan is not None and record.plan.pp > 1
        return _missing(why if pipelined or "reader" in why else f"{why} (its plan has no pipeline)")
    other = trace.get("otherData") or {}
    measured, predicted = other.get("bubble_measured"), other.get("bubble_predicted")
    text = ""
    if isinstance(measured, int | float):
        text = f"<p>Bubble (share of the step a pipeline worker waits): measured {measured:.1%}"
        text += f", predicted {predicted:.1%}.</p>" if isinstance(predicted, int | float) else ".</p>"
    chart = job_charts.timeline_chart(trace)
    return text + (_charts([chart], "timeline") if chart else _missing("the timeline has no events"))


def _devices(record: JobRecord) -> str:
    job = record.job
    facts = [
        ("workers", job.get("workers")),
        ("devices", ", ".join(str(d) for d in job.get("devices") or ()) or None),
        ("nodes", ", ".join(str(n) for n in job.get("nodes") or ()) or None),
        ("flavor", job.get("flavor")),
        ("backend", job.get("backend")),
        ("logs", job.get("log_dir")),
    ]
    rows = "".join(f"<tr><th>{name}</th><td>{_e(value)}</td></tr>" for name, value in facts if value is not None)
    lines = [f"<table>{rows}</table>"]
    resizes = job.get("resizes") or ()
    if resizes:
        rows = [[_when(r.get("time")), r.get("workers", "?")] for r in resizes]
        lines.append("<p>Resized:</p>" + _table(["when", "workers"], rows))
    if record.leases:
        rows = [
            [i.device, i.user, _when(i.start), _when(i.end), i.billed_minutes]
            for i in sorted(record.leases, key=lambda i: (i.start, i.device))
        ]
        lines.append(_table(["device", "user", "leased", "released", "device-minutes"], rows))
        minutes = sum(i.billed_minutes for i in record.leases)
        lines.append(f"<p>{len(record.leases)} lease intervals, {minutes} device-minutes billed.</p>")
    else:
        lines.append(_missing(record.missing.get("leases", "no lease recorded")))
    return "\n".join(lines)


def _doctor(record: JobRecord) -> str:
    if "doctor" in record.missing:
        return _missing(record.missing["doctor"])
    if not record.diagnosis:
        return "<p>The doctor found nothing wrong (no stuck or missing collective recorded).</p>"
    return f"<pre>{_e(record.diagnosis)}</pre>"


def _charts(charts: list[Any], name: str) -> str:
    svgs = [svg_text(c, chart_id=f"{name}-{i}") for i, c in enumerate(charts) if c is not None]
    return f'<div class="charts">{"".join(svgs)}</div>' if svgs else ""


def _section(anchor: str, title: str, content: str) -> str:
    return f'\n<section id="{anchor}"><h2>{_e(title)}</h2>\n{content}\n</section>'


def _table(header: list[str], rows: list[list[Any]]) -> str:
    """A table of text (escaped here) and numbers (right-aligned)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(f"<tr>{''.join(_cell(v) for v in row)}</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(value: Any) -> str:
    return f'<td class="n">{value}</td>' if isinstance(value, int | float) else f"<td>{_e(value)}</td>"


def _missing(why: str) -> str:
    return f'<p class="missing">{_e(why)}</p>'


def _number(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def _when(moment: Any) -> str:
    if not isinstance(moment, int | float):
        return "?"
    return datetime.fromtimestamp(moment, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min {secs} s"


def _e(value: Any) -> str:
    return html.escape(str(value))
