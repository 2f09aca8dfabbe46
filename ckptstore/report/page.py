"""The report page: plotly figures of a :class:`~ckptstore.report.data.ReportData` in one
self-contained HTML file. plotly.js is inlined once, in the first figure; nothing is fetched
from a network when the page is opened."""

from __future__ import annotations

import datetime as _dt
import html
import math
from typing import Any

import plotly.graph_objects as go

from ckptstore import CheckpointSummary
from ckptstore.render import human_bytes
from ckptstore.report.data import ChangeMap, QuantInfo, ReportData
from ckptstore.version import __version__

TITLES = {
    "bytes": "Bytes per checkpoint",
    "shares": "Where each checkpoint's bytes went",
    "quant": "Quantization error per tensor",
    "changes": "Change between consecutive checkpoints",
}
"""Figure titles (the page's section headings too)."""

_TEMPLATE = "plotly_white"
_CONFIG = {"displaylogo": False, "responsive": True}
_ZERO = "rgb(235, 235, 235)"


def _e(label: str) -> str:
    """A store-controlled string (tensor or checkpoint name) for plotly, which reads labels
    and hover text as a subset of HTML: ``<a href>`` in a name must stay text."""
    return html.escape(label, quote=False)


def render(data: ReportData) -> str:
    """The whole page as one HTML string."""
    parts: list[tuple[str, str, go.Figure | None]] = []  # (key, explanation, figure)
    if data.checkpoints:
        parts.append(("bytes", _BYTES_TEXT, bytes_figure(data.checkpoints)))
        parts.append(("shares", _SHARES_TEXT, shares_figure(data.checkpoints)))
        if data.quant is not None:
            parts.append(("quant", _quant_text(data.quant), quant_figure(data.quant)))
        elif data.window:
            parts.append(("quant", _LOSSLESS_TEXT.format(n=len(data.window)), None))
    if data.changes is not None and data.changes.tensors:
        parts.append(("changes", _changes_text(data.changes), changes_figure(data.changes)))
    sections: list[str] = []
    first = True
    for key, text, fig in parts:
        div = ""
        if fig is not None:
            div = fig.to_html(
                full_html=False,
                include_plotlyjs=first,  # plotly.js inlined once, never from a CDN
                div_id=f"fig-{key}",
                config=_CONFIG,
            )
            first = False
        sections.append(
            f'<section id="{key}"><h2>{html.escape(TITLES[key])}</h2><p>{text}</p>\n{div}</section>'
        )
    body = _header(data) + "\n".join(sections)
    return _PAGE.format(title=html.escape(f"ckptstore report — {data.url}"), body=body)


# -- figures ------------------------------------------------------------------------------
def _x(rows: list[CheckpointSummary]) -> tuple[list[Any], str]:
    """x values of checkpoints: their steps when every one has a distinct step, else their
    position (oldest = 1)."""
    steps = [r.step for r in rows]
    if None not in steps and len(set(steps)) == len(steps):
        return steps, "step"
    return list(range(1, len(rows) + 1)), "checkpoint (oldest = 1)"


def bytes_figure(rows: list[CheckpointSummary]) -> go.Figure:
    """Logical, stored and new bytes of each checkpoint."""
    x, xtitle = _x(rows)
    fig = go.Figure()
    series = (
        ("logical (in memory)", [r.logical_bytes for r in rows], "dot"),
        ("stored (referenced chunks + manifest)", [r.stored_bytes for r in rows], "solid"),
        ("new (written by its save)", [r.new_bytes for r in rows], "solid"),
    )
    for name, ys, dash in series:
        fig.add_trace(
            go.Scatter(
                x=x,
                y=ys,
                name=name,
                mode="lines+markers",
                line={"dash": dash},
                text=[f"{_e(r.name)}<br>{human_bytes(v)}" for r, v in zip(rows, ys, strict=True)],
                hovertemplate="%{text}<extra>" + name.split(" ")[0] + "</extra>",
            )
        )
    fig.update_layout(
        title=TITLES["bytes"],
        template=_TEMPLATE,
        xaxis_title=xtitle,
        yaxis={"title": "bytes", "tickformat": ".3~s", "rangemode": "tozero"},
        legend={"orientation": "h", "y": -0.2},
        height=420,
    )
    return fig


def shares_figure(rows: list[CheckpointSummary]) -> go.Figure:
    """Each checkpoint's logical bytes split into: written, reused (dedup), saved by the
    codecs (compression); plus the share of stored bytes held in delta chunks."""
    x, xtitle = _x(rows)

    def share(part: int, whole: int) -> float:
        return 100.0 * part / whole if whole else 0.0

    parts = (
        ("written by its save", lambda r: r.new_bytes, "#1f77b4"),
        ("reused from earlier saves (dedup)", lambda r: r.stored_bytes - r.new_bytes, "#2ca02c"),
        ("saved by compression", lambda r: r.logical_bytes - r.stored_bytes, "#ff7f0e"),
    )
    fig = go.Figure()
    for name, fn, color in parts:
        ys = [share(fn(r), r.logical_bytes) for r in rows]
        fig.add_trace(
            go.Bar(
                x=x,
                y=ys,
                name=name,
                marker_color=color,
                text=[f"{_e(r.name)}<br>{human_bytes(fn(r))}" for r in rows],
                textposition="none",
                hovertemplate="%{text}<br>%{y:.1f}% of logical<extra>" + name + "</extra>",
            )
        )
    if any(r.delta_bytes for r in rows):
        fig.add_trace(
            go.Scatter(
                x=x,
                y=[share(r.delta_bytes, r.stored_bytes) for r in rows],
                name="delta chunks (% of stored)",
                mode="lines+markers",
                line={"color": "#9467bd"},
                hovertemplate="%{y:.1f}% of stored bytes in delta chunks<extra></extra>",
            )
        )
    fig.update_layout(
        title=TITLES["shares"],
        template=_TEMPLATE,
        barmode="relative",
        xaxis_title=xtitle,
        yaxis={"title": "% of logical bytes", "ticksuffix": "%"},
        legend={"orientation": "h", "y": -0.2},
        height=420,
    )
    return fig


def quant_figure(q: QuantInfo) -> go.Figure:
    """Relative L2 error each lossy tensor was stored with (recorded at save time)."""
    rows = [r for r in q.rows if r.rel_l2 is not None]
    text = [
        f"{_e(r.fqn)}<br>{r.dtype} → {r.codec}, {human_bytes(r.logical_bytes)}<br>"
        f"rel. L2 {r.rel_l2:.3e}, max abs {r.max_abs:.3e}"
        + (f"<br>{r.fallback_chunks} fallback chunk(s)" if r.fallback_chunks else "")
        for r in rows
    ]
    fig = go.Figure(
        go.Bar(
            x=[max(r.rel_l2 or 0.0, 1e-12) for r in rows],
            y=[_e(r.fqn) for r in rows],
            orientation="h",
            marker_color="#d62728",
            text=text,
            textposition="none",
            customdata=[[r.rel_l2, r.max_abs] for r in rows],
            hovertemplate="%{text}<extra></extra>",
        )
    )
    step = q.checkpoint if q.step is None else f"step {q.step}"
    logs = [math.log10(r.rel_l2) for r in rows if r.rel_l2]
    # bars of a log axis start at its left edge: begin a decade below the smallest error
    span = [math.floor(min(logs)) - 1, math.ceil(max(logs) + 0.1)] if logs else None
    fig.update_layout(
        title=f"{TITLES['quant']} ({step}; ‖x−x̂‖/‖x‖ recorded at save time)",
        template=_TEMPLATE,
        xaxis={
            "title": "relative L2 error",
            "type": "log",
            "range": span,
            "dtick": 1,
            "exponentformat": "power",
        },
        yaxis={"autorange": "reversed", "automargin": True},
        height=max(260, 120 + 22 * len(rows)),
    )
    return fig


def changes_figure(c: ChangeMap) -> go.Figure:
    """Tensor × checkpoint heat map of ‖b−a‖/‖a‖, colour on a log scale; exact zeros in
    light grey, cells that cannot be compared left blank."""
    labels = [
        f"step {s}" if s is not None else _e(n) for s, n in zip(c.steps, c.checkpoints, strict=True)
    ]
    if len(set(labels)) != len(labels):
        labels = [_e(n) for n in c.checkpoints]
    x = labels[1:]
    logs = [math.log10(v) for row in c.values for v in row if v]
    lo = math.floor(min(logs)) if logs else -6
    hi = max(math.ceil(max(logs)), lo + 1) if logs else 0
    z = [[math.log10(v) if v else None for v in row] for row in c.values]
    zeros = [[0.0 if v == 0.0 else None for v in row] for row in c.values]
    text = [
        [
            f"{_e(fqn)}<br>{labels[j]} → {labels[j + 1]}<br>"
            + ("not compared" if v is None else f"rel. L2 change {v:.4g}")
            + (f" ({note})" if note else "")
            for j, (v, note) in enumerate(zip(vals, notes, strict=True))
        ]
        for fqn, vals, notes in zip(c.tensors, c.values, c.notes, strict=True)
    ]
    tensors = [_e(t) for t in c.tensors]
    fig = go.Figure()
    fig.add_trace(
        go.Heatmap(
            x=x,
            y=tensors,
            z=zeros,
            colorscale=[[0, _ZERO], [1, _ZERO]],
            showscale=False,
            hoverinfo="skip",
            name="unchanged",
        )
    )
    fig.add_trace(
        go.Heatmap(
            x=x,
            y=tensors,
            z=z,
            zmin=lo,
            zmax=hi,
            colorscale="Viridis",
            customdata=c.values,
            text=text,
            hovertemplate="%{text}<extra></extra>",
            colorbar={
                "title": {"text": "‖b−a‖/‖a‖"},
                "tickvals": list(range(lo, hi + 1)),
                "ticktext": [f"1e{k}" for k in range(lo, hi + 1)],
            },
            name="relative L2 change",
            xgap=1,
            ygap=1,
        )
    )
    fig.update_layout(
        title=f"{TITLES['changes']} (‖b−a‖/‖a‖; grey: exactly 0, blank: not comparable)",
        template=_TEMPLATE,
        xaxis={"title": "checkpoint (compared with the one before)", "type": "category"},
        yaxis={"autorange": "reversed", "automargin": True, "type": "category"},
        height=max(300, 160 + 22 * len(c.tensors)),
    )
    return fig


# -- text ---------------------------------------------------------------------------------
_BYTES_TEXT = (
    "<b>logical</b>: tensor bytes as held in memory; <b>stored</b>: what the checkpoint "
    "references after compression (chunks shared with other checkpoints included, plus its "
    "manifest); <b>new</b>: what its save wrote. From the catalog: every checkpoint."
)
_LOSSLESS_TEXT = (
    "No tensor of the latest {n} checkpoint(s) is quantized: every tensor is stored "
    "lossless (bit-exact), so there is no quantization error to show."
)
_SHARES_TEXT = (
    "Each checkpoint's logical bytes, split into what its save wrote, what it reused from "
    "earlier saves (dedup) and what the codecs saved (compression); a negative compression "
    "share means the stored form is larger than in memory (incompressible data plus the "
    "manifest). The line, where present, is the share of stored bytes held in delta chunks."
)


def _quant_text(q: QuantInfo) -> str:
    step = html.escape(q.checkpoint if q.step is None else f"step {q.step}")
    out = (
        f"The lossy tensors of the newest checkpoint that has any ({step}) and the error each "
        "was stored with: ‖x−x̂‖/‖x‖ over finite elements and max |x−x̂|, measured at save "
        "time and kept in the manifest (docs/quantization.md). "
        f"{q.lossy_checkpoints} checkpoint(s) of the window hold quantized tensors."
    )
    if q.worst is not None:
        name, fqn, err = q.worst
        out += f" Worst recorded: {err:.3e} ({html.escape(fqn)} in {html.escape(name)})."
    missing = [r.fqn for r in q.rows if r.rel_l2 is None]
    if missing:
        out += " No error is recorded for: " + html.escape(", ".join(missing)) + "."
    return out


def _changes_text(c: ChangeMap) -> str:
    return (
        "For each pair of consecutive checkpoints a → b and each tensor of the same dtype "
        "and shape in both: ‖b−a‖/‖a‖, decoded from the store. Chunks with the same key in "
        "a and b count as unchanged without being decoded. A blank cell could not be compared "
        "(tensor added or removed, shape or dtype changed; hover for why). "
        f"Decoded {human_bytes(c.decoded_bytes)}; {human_bytes(c.skipped_bytes)} found "
        "unchanged by chunk key alone."
        + (
            f" {c.omitted} smaller tensor(s) ({human_bytes(c.omitted_bytes)}) are not shown."
            if c.omitted
            else ""
        )
    )


def _header(data: ReportData) -> str:
    rows = data.checkpoints
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    out = [
        "<h1>ckptstore report</h1>",
        f'<p class="meta">{html.escape(data.url)} — generated {now} by ckptstore '
        f"{html.escape(__version__)}</p>",
    ]
    if not rows:
        out.append('<p class="empty">The store holds no committed checkpoint.</p>')
    else:
        logical = sum(r.logical_bytes for r in rows)
        stored = sum(r.stored_bytes for r in rows)
        new = sum(r.new_bytes for r in rows)
        cells = [
            (
                "checkpoints",
                f"{len(rows)} ({html.escape(rows[0].name)} … {html.escape(rows[-1].name)})",
            ),
            ("logical, all checkpoints", human_bytes(logical)),
            ("stored, all checkpoints (without dedup)", human_bytes(stored)),
            ("written by their saves", human_bytes(new)),
            ("compression (logical / stored)", f"{logical / stored:.3f}×" if stored else "-"),
            ("dedup (stored / written)", f"{stored / new:.3f}×" if new else "-"),
        ]
        out.append(
            '<table class="summary">'
            + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in cells)
            + "</table>"
        )
    if data.notes:
        out.append(
            '<ul class="notes">'
            + "".join(f"<li>{html.escape(n)}</li>" for n in data.notes)
            + "</ul>"
        )
    return "\n".join(out)


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em auto;
       max-width: 1200px; padding: 0 1em; color: #222; }}
h1 {{ margin-bottom: 0.2em; }}
.meta {{ color: #666; margin-top: 0; }}
table.summary {{ border-collapse: collapse; margin: 1em 0; }}
table.summary th {{ text-align: left; font-weight: normal; color: #555; padding: 2px 1.5em 2px 0; }}
table.summary td {{ font-variant-numeric: tabular-nums; }}
ul.notes {{ background: #fff8e1; border-left: 4px solid #f0b400; padding: 0.6em 0.6em 0.6em 2em; }}
section {{ margin-top: 2em; }}
section p {{ color: #444; max-width: 60em; }}
</style>
</head>
<body>
{body}
</body>
</html>
"""
