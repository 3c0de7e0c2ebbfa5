"""Charts as inline SVG, rendered on the server: readable with no JavaScript at all.

Three shapes cover the console: vertical bars over time (``bar_chart``), a line
over time (``line_chart``) and horizontal bars for a ranking (``ranking_chart``).
Each returns one ``<svg>`` element with axes, every mark carrying a ``<title>``
(the browser's own tooltip) and ``data-label``/``data-value`` attributes for the
optional script. Every label is escaped; nothing is styled inline (the
stylesheet colours the ``class`` names), so a strict Content-Security-Policy
holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape
from typing import List, Optional, Sequence, Tuple

__all__ = ["Point", "bar_chart", "format_number", "line_chart", "nice_ticks", "ranking_chart"]

_WIDTH = 640
_HEIGHT = 240
_LEFT = 56  # room for the y-axis labels
_RIGHT = 20
_TOP = 12
_BOTTOM = 28  # room for the x-axis labels
_X_LABELS = 7  # at most this many x-axis labels, evenly spread
_RANK_ROW = 24
_RANK_LABEL = 180
_RANK_LABEL_CHARS = 20


@dataclass(frozen=True)
class Point:
    """One mark: its label (a bucket start or a value) and its number (None: no number)."""

    label: str
    value: Optional[float]
    tick: str = ""
    """A shorter label for the axis (default: ``label``)."""


def format_number(value: Optional[float]) -> str:
    """``1234567`` → ``"1,234,567"``; floats with at most 3 decimals; None: an en dash."""
    if value is None:
        return "\N{EN DASH}"
    if isinstance(value, int) or float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.3f}".rstrip("0").rstrip(".")


def nice_ticks(highest: float, count: int = 4) -> List[float]:
    """Round axis ticks from 0 to at least ``highest``: steps of 1, 2 or 5 times a power of 10."""
    if not math.isfinite(highest) or highest <= 0:
        return [0.0, 1.0]
    raw = highest / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    if highest >= 1 and step < 1:
        step = 1.0
    ticks = [0.0]
    while ticks[-1] < highest:
        ticks.append(round(ticks[-1] + step, 10))
    return ticks


def _attr(value: object) -> str:
    return escape(str(value), quote=True)


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _open(title: str, description: str, width: int, height: int, kind: str) -> List[str]:
    return [
        f'<svg class="chart chart-{kind}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="{_attr(title)}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title>",
        f"<desc>{escape(description)}</desc>",
    ]


def _y_axis(ticks: Sequence[float], scale: float, plot_bottom: float, width: int) -> List[str]:
    parts = ['<g class="axis axis-y">']
    for tick in ticks:
        y = plot_bottom - tick * scale
        parts.append(
            f'<line class="grid" x1="{_LEFT}" x2="{width - _RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"{escape(format_number(tick))}</text>"
        )
    parts.append("</g>")
    return parts


def _x_labels(labels: Sequence[str], centres: Sequence[float], y: float) -> List[str]:
    if not labels:
        return []
    every = max(1, math.ceil(len(labels) / _X_LABELS))
    shown = list(range(0, len(labels), every))
    if shown[-1] != len(labels) - 1:
        if len(labels) - 1 - shown[-1] < every / 2 and len(shown) > 1:
            shown.pop()  # too close to the last label to fit beside it
        shown.append(len(labels) - 1)
    parts = ['<g class="axis axis-x">']
    for index in shown:
        parts.append(
            f'<text x="{centres[index]:.1f}" y="{y:.1f}" text-anchor="middle">'
            f"{escape(_short(labels[index], 12))}</text>"
        )
    parts.append("</g>")
    return parts


def _y_scale(values: Sequence[float], plot_bottom: float) -> Tuple[List[float], float]:
    """The y axis's ticks for ``values`` and the pixels per unit above ``plot_bottom``."""
    ticks = nice_ticks(max(values, default=0))
    return ticks, (plot_bottom - _TOP) / ticks[-1]


def _from_to(points: Sequence[Point]) -> str:
    """``", from <first> to <last>"`` for a chart's description; empty without points."""
    return f", from {points[0].label} to {points[-1].label}" if points else ""


def _x_axis(
    points: Sequence[Point], centres: Sequence[float], plot_bottom: float, width: int, height: int
) -> List[str]:
    """The baseline under the marks and a label (its tick, else its label) under each point."""
    baseline = (
        f'<line class="baseline" x1="{_LEFT}" x2="{width - _RIGHT}" '
        f'y1="{plot_bottom}" y2="{plot_bottom}"/>'
    )
    return [baseline, *_x_labels([p.tick or p.label for p in points], centres, height - 8)]


def _tooltip(label: str, value: Optional[float], unit: str) -> str:
    suffix = f" {unit}" if unit else ""
    return f"{label}: {format_number(value)}{suffix}"


def bar_chart(
    points: Sequence[Point],
    *,
    title: str,
    unit: str = "",
    width: int = _WIDTH,
    height: int = _HEIGHT,
) -> str:
    """Vertical bars, one per point, in order (e.g. one per day); None draws no bar."""
    plot_bottom = height - _BOTTOM
    values = [p.value for p in points if p.value is not None]
    ticks, scale = _y_scale(values, plot_bottom)
    slot = (width - _LEFT - _RIGHT) / max(1, len(points))
    bar_width = max(1.0, slot * 0.8)
    description = f"{len(points)} bars" + _from_to(points)
    parts = _open(title, description, width, height, "bar")
    parts += _y_axis(ticks, scale, plot_bottom, width)
    parts.append('<g class="marks">')
    centres = []
    for index, point in enumerate(points):
        x = _LEFT + index * slot + (slot - bar_width) / 2
        centres.append(x + bar_width / 2)
        if point.value is None:
            continue
        bar_height = max(0.0, point.value * scale)
        parts.append(
            f'<rect class="bar" x="{x:.1f}" y="{plot_bottom - bar_height:.1f}" '
            f'width="{bar_width:.1f}" height="{bar_height:.1f}" '
            f'data-label="{_attr(point.label)}" data-value="{_attr(format_number(point.value))}">'
            f"<title>{escape(_tooltip(point.label, point.value, unit))}</title></rect>"
        )
    parts.append("</g>")
    parts += _x_axis(points, centres, plot_bottom, width, height)
    parts.append("</svg>")
    return "".join(parts)


def line_chart(
    points: Sequence[Point],
    *,
    title: str,
    unit: str = "",
    width: int = _WIDTH,
    height: int = _HEIGHT,
) -> str:
    """A line through the points, in order, with a dot on each; None breaks the line."""
    plot_bottom = height - _BOTTOM
    values = [p.value for p in points if p.value is not None]
    ticks, scale = _y_scale(values, plot_bottom)
    span = width - _LEFT - _RIGHT
    step = span / max(1, len(points) - 1)
    centres = [_LEFT + (i * step if len(points) > 1 else span / 2) for i in range(len(points))]
    description = f"{len(values)} points" + _from_to(points)
    parts = _open(title, description, width, height, "line")
    parts += _y_axis(ticks, scale, plot_bottom, width)
    parts.append('<g class="marks">')
    runs: List[List[str]] = [[]]
    dots = []
    for point, x in zip(points, centres):
        if point.value is None:
            runs.append([])
            continue
        y = plot_bottom - point.value * scale
        runs[-1].append(f"{x:.1f},{y:.1f}")
        dots.append(
            f'<circle class="point" cx="{x:.1f}" cy="{y:.1f}" r="3.5" '
            f'data-label="{_attr(point.label)}" data-value="{_attr(format_number(point.value))}">'
            f"<title>{escape(_tooltip(point.label, point.value, unit))}</title></circle>"
        )
    parts += [f'<polyline class="line" points="{" ".join(run)}"/>' for run in runs if len(run) > 1]
    parts += dots
    parts.append("</g>")
    parts += _x_axis(points, centres, plot_bottom, width, height)
    parts.append("</svg>")
    return "".join(parts)


def ranking_chart(
    points: Sequence[Point], *, title: str, unit: str = "", width: int = _WIDTH
) -> str:
    """Horizontal bars, one row per point in the order given (biggest first, usually)."""
    height = _TOP + _BOTTOM + _RANK_ROW * max(1, len(points))
    plot_left = _RANK_LABEL
    plot_width = width - plot_left - _RIGHT - 56  # room for the value after the bar
    values = [p.value for p in points if p.value is not None]
    highest = max(values, default=0) or 1
    description = f"{len(points)} bars"
    parts = _open(title, description, width, height, "ranking")
    parts.append('<g class="marks">')
    for index, point in enumerate(points):
        y = _TOP + index * _RANK_ROW
        bar_width = max(0.0, (point.value or 0) / highest * plot_width)
        parts.append(
            f'<text class="rank-label" x="{plot_left - 8}" y="{y + _RANK_ROW * 0.65:.1f}" '
            f'text-anchor="end">{escape(_short(point.label, _RANK_LABEL_CHARS))}</text>'
        )
        if point.value is not None:
            parts.append(
                f'<rect class="bar" x="{plot_left}" y="{y + 4:.1f}" width="{bar_width:.1f}" '
                f'height="{_RANK_ROW - 8}" data-label="{_attr(point.label)}" '
                f'data-value="{_attr(format_number(point.value))}">'
                f"<title>{escape(_tooltip(point.label, point.value, unit))}</title></rect>"
            )
        parts.append(
            f'<text class="rank-value" x="{plot_left + bar_width + 6:.1f}" '
            f'y="{y + _RANK_ROW * 0.65:.1f}">{escape(format_number(point.value))}</text>'
        )
    parts.append("</g>")
    parts.append(
        f'<line class="baseline" x1="{plot_left}" x2="{plot_left}" y1="{_TOP}" '
        f'y2="{height - _BOTTOM}"/>'
    )
    parts.append("</svg>")
    return "".join(parts)
