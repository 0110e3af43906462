"""The two charts of `gradwatch html`: the ratio trend and the tensor-by-step heatmap.

Both are written here as inline SVG and an HTML table (no network, no CDN): the trend
draws the global ratio, the tensors with the highest ratios, a band for the rest, the
threshold and warn lines and an x at each alert; the heatmap colors one row per tensor and
one column per check (bins of checks on a long run), read from the report's per-tensor
arrays so a compact report draws it too.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from html import escape

import numpy as np

from gradwatch.report import Report
from gradwatch.result import CheckResult
from gradwatch.views.reading import (
    completed,
    format_ratio,
    listed_steps,
    nan_last,
    screened_only,
    step_of,
    threshold,
)

__all__ = ["HEATMAP_COLUMNS", "HIGHLIGHTED", "heatmap_section", "trend_section"]


HIGHLIGHTED = 5
"""Tensors drawn as their own line in the trend: the highest ratios over the run."""
HEATMAP_COLUMNS = 80
"""Heatmap columns at most; longer runs are binned, each cell showing its bin's worst."""
_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2")
_FLOOR = -16.0
_CEILING = 2.0
"""log10 ratios drawn at most (a correct ratio is <= 1; inf, NaN or 1e999 from a mutated
report are drawn at the top, never turned into an axis of 999 decades)."""


def trend_section(report: Report) -> str:
    """The page's "Ratio trend" section: the SVG chart and its legend."""
    checks = completed(report)
    if not checks:
        return "<h2>Ratio trend</h2><p>No check ran to completion.</p>"
    series = report.tensor_series()
    ranked = sorted(series, key=lambda name: -max(nan_last(r) for _, r in series[name]))
    lines = [("global ratio", "#000", [(step_of(c), c.ratio) for c in checks], 2.5)]
    lines += [
        (name, _COLORS[i % len(_COLORS)], series[name], 1.3)
        for i, name in enumerate(ranked[:HIGHLIGHTED])
    ]
    band = _band([series[name] for name in ranked[HIGHLIGHTED:]])
    svg = _trend_svg(report, lines, band)
    legend = "".join(
        f"<span><b style='color:{color}'>&#9644;</b> <code>{escape(name)}</code></span>"
        for name, color, _, _ in lines
    )
    if band:
        legend += f"<span>grey band: the other {len(ranked) - HIGHLIGHTED} tensors</span>"
    screened = [step_of(check) for check in checks if screened_only(check)]
    if screened:
        legend += f"<span>{escape(_screened_note(screened, len(checks)))}</span>"
    legend += "<span style='color:#b3261e'>--- threshold</span><span>&#x2715; alert</span>"
    return f"<h2>Ratio trend</h2>{svg}<p class='legend'>{legend}</p>"


def _band(points: list[list[tuple[int, float]]]) -> list[tuple[int, float, float, float]]:
    """(step, lowest, median, highest) log10 ratio of `points` at each step."""
    by_step: dict[int, list[float]] = {}
    for series in points:
        for step, ratio in series:
            if not math.isnan(ratio):
                by_step.setdefault(step, []).append(_log(ratio))
    return [(step, min(v), statistics.median(v), max(v)) for step, v in sorted(by_step.items())]


@dataclass(frozen=True)
class _Frame:
    """The trend's plot area: the steps and log10 ratios it spans, mapped to pixels."""

    first: int
    last: int
    low_y: float
    high_y: float
    width: int = 900
    height: int = 340
    left: int = 64
    right: int = 16
    top: int = 12
    bottom: int = 36

    def x(self, step: float) -> float:
        if self.last == self.first:
            return (self.width + self.left - self.right) / 2
        span = max(self.last - self.first, 1)
        return (
            self.left + 10 + (step - self.first) / span * (self.width - self.left - self.right - 20)
        )

    def y(self, value: float) -> float:
        plotted = self.height - self.top - self.bottom
        return self.top + (self.high_y - value) / (self.high_y - self.low_y) * plotted


def _trend_svg(
    report: Report,
    lines: list[tuple[str, str, list[tuple[int, float]], float]],
    band: list[tuple[int, float, float, float]],
) -> str:
    steps = [step for _, _, points, _ in lines for step, _ in points]
    values = [_log(r) for _, _, points, _ in lines for _, r in points if not math.isnan(r)]
    values += [low for _, low, _, _ in band] + [_log(threshold(report))]
    values.append(_log(report.checks[-1].warn))
    frame = _Frame(
        min(steps), max(steps), math.floor(min(values)) - 0.5, math.ceil(max(values)) + 0.5
    )
    x, y = frame.x, frame.y
    parts = _axes(frame)
    if band:
        outline = [(x(s), y(hi)) for s, _, _, hi in band]
        outline += [(x(s), y(lo)) for s, lo, _, _ in reversed(band)]
        parts.append(f"<polygon points='{_points(outline)}' fill='#999' fill-opacity='0.3'/>")
        median = [(x(s), y(m)) for s, _, m, _ in band]
        parts.append(_polyline(median, "#777", 1.0, dash="4 3"))
    for value, color, dash in (
        (threshold(report), "#b3261e", "6 4"),
        (report.checks[-1].warn, "#b26a00", "2 3"),
    ):
        parts.append(
            f"<line x1='{frame.left}' x2='{frame.width - frame.right}' y1='{y(_log(value)):.1f}' "
            f"y2='{y(_log(value)):.1f}' stroke='{color}' stroke-dasharray='{dash}'/>"
        )
    for name, color, points, stroke in reversed(lines):
        drawn = [(x(step), y(_log(r))) for step, r in points if not math.isnan(r)]
        parts.append(_polyline(drawn, color, stroke, title=name))
    for alert in report.alerts:
        if alert.step is None:
            continue
        cx, cy = x(alert.step), y(_log(alert.ratio))
        parts.append(
            f"<g stroke='#d00' stroke-width='2.5'><title>alert at step {alert.step}: "
            f"{escape(alert.tensor or '-')}</title><line x1='{cx - 5:.1f}' y1='{cy - 5:.1f}' "
            f"x2='{cx + 5:.1f}' y2='{cy + 5:.1f}'/><line x1='{cx - 5:.1f}' y1='{cy + 5:.1f}' "
            f"x2='{cx + 5:.1f}' y2='{cy - 5:.1f}'/></g>"
        )
    parts.append(
        f"<rect x='{frame.left}' y='{frame.top}' width='{frame.width - frame.left - frame.right}' "
        f"height='{frame.height - frame.top - frame.bottom}' fill='none' stroke='#888'/></svg>"
    )
    return "".join(parts)


def _axes(frame: _Frame) -> list[str]:
    """The opening of the SVG: a grid line per decade of ratio, step ticks, the x label."""
    width, height, left, right = frame.width, frame.height, frame.left, frame.right
    parts = [
        f"<svg role='img' width='{width}' height='{height}' "
        f"viewBox='0 0 {width} {height}' font-size='11' font-family='sans-serif'>"
    ]
    for decade in range(math.ceil(frame.low_y), math.floor(frame.high_y) + 1):
        y = frame.y(decade)
        parts.append(
            f"<line x1='{left}' x2='{width - right}' y1='{y:.1f}' y2='{y:.1f}' "
            f"stroke='#e5e5e5'/><text x='{left - 6}' y='{y + 4:.1f}' "
            f"text-anchor='end'>1e{decade}</text>"
        )
    for step in _integer_ticks(frame.first, frame.last):
        parts.append(
            f"<text x='{frame.x(step):.1f}' y='{height - frame.bottom + 16}' "
            f"text-anchor='middle'>{step}</text>"
        )
    parts.append(
        f"<text x='{(width + left) / 2:.0f}' y='{height - 4}' text-anchor='middle'>"
        "step (optimizer updates)</text>"
    )
    return parts


def _polyline(
    points: Sequence[tuple[float, float]],
    color: str,
    stroke: float,
    *,
    dash: str = "",
    title: str = "",
) -> str:
    dashes = f" stroke-dasharray='{dash}'" if dash else ""
    label = f"<title>{escape(title)}</title>" if title else ""
    dots = "".join(f"<circle cx='{px:.1f}' cy='{py:.1f}' r='2.2'/>" for px, py in points)
    return (
        f"<g fill='{color}'>{label}<polyline points='{_points(points)}' fill='none' "
        f"stroke='{color}' stroke-width='{stroke}'{dashes}/>{dots if not dash else ''}</g>"
    )


def _points(points: Iterable[tuple[float, float]]) -> str:
    return " ".join(f"{px:.1f},{py:.1f}" for px, py in points)


def _integer_ticks(first: int, last: int, most: int = 10) -> list[int]:
    stride = max(1, math.ceil((last - first) / most))
    magnitude = 10 ** max(0, len(str(stride)) - 1)
    stride = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= stride)
    return list(
        range(first - first % stride + (stride if first % stride else 0), last + 1, stride)
    ) or [first]


def _log(ratio: float) -> float:
    """log10 of `ratio` within [`_FLOOR`, `_CEILING`] (NaN, the worst news, at the top)."""
    if math.isnan(ratio):
        return _CEILING
    return _FLOOR if ratio <= 0 else min(max(math.log10(ratio), _FLOOR), _CEILING)


def heatmap_section(report: Report) -> str:
    """The page's "Tensors by step" section: the filter box and the heatmap table."""
    checks = completed(report)
    parts = [
        "<h2>Tensors by step</h2>",
        "<p><input id='filter' type='search' placeholder='filter by tensor name' "
        "aria-label='filter by tensor name'> <span id='matches'></span></p>",
    ]
    if not checks:
        return "\n".join(parts)
    bins = _bins(len(checks))
    cell = max(8, min(40, 640 // len(bins)))
    warn, limit = checks[-1].warn, threshold(report)
    labelled = max(1, math.ceil(len(bins) / 16))  # a step label on every few columns
    head = "".join(
        f"<th class='s' title='steps {step_of(checks[a])}..{step_of(checks[b - 1])}'>"
        f"{step_of(checks[a]) if column % labelled == 0 else ''}</th>"
        for column, (a, b) in enumerate(bins)
    )
    rows: list[str] = []
    binned = _binned_ratios(report, checks, bins)
    screened = [step_of(check) for check in checks if screened_only(check)]
    if screened:
        parts.append(f"<p class='note'>{escape(_screened_note(screened, len(checks)))}.</p>")
    if len(screened) == len(checks):
        return "\n".join(parts)
    for name in report.tensor_names:
        row = binned.get(name, [None] * len(bins))
        rows.append(_heatmap_row(name, row, checks, bins, cell, (warn, limit)))
    parts.append(
        f"<p class='note'>One row per tensor (parameter order), one column per check"
        f"{' bin' if len(checks) > HEATMAP_COLUMNS else ''}, colored by ratio: "
        f"<span style='background:{_color(1e-10, warn, limit)}'>&nbsp;below warn&nbsp;</span> "
        f"<span style='background:{_color(warn * 10, warn, limit)}'>&nbsp;warn&nbsp;</span> "
        f"<span style='background:{_color(limit * 10, warn, limit)};color:#fff'>&nbsp;at or above "
        f"threshold&nbsp;</span>. A wrong backward spoils the tensors before it: the last "
        f"red row in parameter order is nearest the bug.</p>"
    )
    parts.append(
        "<table class='heat'><tr><th>tensor</th><th>max</th>"
        + head
        + "</tr>"
        + "".join(rows)
        + "</table>"
    )
    return "\n".join(parts)


def _heatmap_row(
    name: str,
    row: list[float | None],
    checks: list[CheckResult],
    bins: list[tuple[int, int]],
    cell: int,
    levels: tuple[float, float],
) -> str:
    """One tensor's row: its name, its largest ratio, a colored cell per bin of checks."""
    warn, limit = levels
    cells = []
    worst = -math.inf
    for (a, b), value in zip(bins, row, strict=True):
        if value is None:
            cells.append("<td class='c' style='background:#fff'></td>")
            continue
        worst = max(worst, nan_last(value))
        screen = all(screened_only(c) for c in checks[a:b])
        tip = f"{name} steps {step_of(checks[a])}..{step_of(checks[b - 1])}: {value:.2e}"
        tip += " (screen only)" if screen else ""
        cells.append(
            f"<td class='c' style='width:{cell}px;background:{_color(value, warn, limit)}' "
            f"title='{escape(tip)}'></td>"
        )
    return (
        f"<tr data-tensor='{escape(name)}'><td class='n'>{escape(name)}</td>"
        f"<td class='n'>{format_ratio(worst) if worst > -math.inf else '-'}</td>"
        + "".join(cells)
        + "</tr>"
    )


def _screened_note(steps: list[int], checks: int) -> str:
    where = "every check" if len(steps) == checks else f"{len(steps)} of {checks} checks"
    return (
        f"tensors screened together at {where} (steps {listed_steps(steps)}): none was checked on "
        "its own there, so they have no per-tensor ratio (blank cells)"
    )


def _binned_ratios(
    report: Report, checks: list[CheckResult], bins: list[tuple[int, int]]
) -> dict[str, list[float | None]]:
    """Each tensor's largest ratio (NaN counts as largest) in each bin of checks.

    Read from the report's per-tensor arrays, so a compact report of a long run (whose
    checks do not carry their tensors) draws the same heatmap in a few percent of the memory.
    """
    check_steps = np.array([step_of(c) for c in checks], dtype=np.int64)
    edges = np.array([a for a, _ in bins] + [bins[-1][1]], dtype=np.int64)
    binned: dict[str, list[float | None]] = {}
    for name, (steps, ratios) in report.tensor_ratios().items():
        position = np.searchsorted(check_steps, steps)
        inside = position < len(check_steps)
        inside[inside] &= check_steps[position[inside]] == steps[inside]
        column = np.searchsorted(edges, position[inside], side="right") - 1
        values = ratios[inside]
        ordered = np.where(np.isnan(values), np.inf, values)
        row: list[float | None] = []
        for index in range(len(bins)):
            members = column == index
            if not members.any():
                row.append(None)
                continue
            largest = int(np.argmax(np.where(members, ordered, -np.inf)))
            row.append(float(values[largest]))
        binned[name] = row
    return binned


def _bins(count: int) -> list[tuple[int, int]]:
    columns = min(count, HEATMAP_COLUMNS)
    edges = [round(i * count / columns) for i in range(columns + 1)]
    return [(edges[i], edges[i + 1]) for i in range(columns)]


def _color(ratio: float, warn: float, limit: float) -> str:
    """Light green far below warn, yellow at warn, orange to dark red from the threshold."""
    if math.isnan(ratio):
        return "#888"
    value = _log(ratio)
    if ratio >= limit:
        depth = min((value - _log(limit)) / 2, 1.0)
        return _mix((0xF4, 0x8C, 0x3A), (0x8B, 0x0F, 0x14), depth)
    if ratio >= warn:
        depth = (value - _log(warn)) / max(_log(limit) - _log(warn), 1e-9)
        return _mix((0xFF, 0xE0, 0x82), (0xF4, 0xA2, 0x61), depth)
    depth = min(max((value - (_log(warn) - 8)) / 8, 0.0), 1.0)
    return _mix((0xF4, 0xFA, 0xF2), (0xB7, 0xDF, 0xB0), depth)


def _mix(start: tuple[int, int, int], end: tuple[int, int, int], depth: float) -> str:
    depth = min(max(depth, 0.0), 1.0)
    red, green, blue = (round(a + (b - a) * depth) for a, b in zip(start, end, strict=True))
    return f"#{red:02x}{green:02x}{blue:02x}"
