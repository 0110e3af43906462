"""`gradwatch plot`: one PNG that reads the same for 1 tensor and for 1,000.

The global ratio in black, the few tensors with the highest ratios as their own lines,
every other tensor as one grey band (lowest to highest ratio at each step) with its
median, the threshold and warn lines, a red cross at each alert and a grey line at each
check that could not run. The legend sits below the axes, so it never squeezes them;
steps are integers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from gradwatch.errors import GradwatchError
from gradwatch.report import Report
from gradwatch.result import CheckResult
from gradwatch.views.reading import completed, nan_last, screened_only, step_of, threshold

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["HIGHLIGHTED", "plot_figure", "write_plot"]

HIGHLIGHTED = 5
"""Tensors drawn as their own line: those with the highest ratio over the run."""
FLOOR = 1e-16
"""A ratio of exactly 0 has no place on a log axis; it is drawn here instead."""
_NAME_WIDTH = 48


def write_plot(report: Report, output: Path) -> Path:
    """Render `report` to the image `output` (needs matplotlib); returns the file written.

    A name without a suffix gets ``.png`` (the name returned says so).

    Raises:
        GradwatchError: `output` is a directory, or its suffix is not an image format
            matplotlib writes.
    """
    if output.is_dir() or str(output).endswith(("/", os.sep)):
        raise GradwatchError(
            f"-o: expected an image file such as plot.png, received the directory {str(output)!r}"
        )
    figure = plot_figure(report)
    if not output.suffix:
        output = output.with_name(output.name + ".png")
    formats = figure.canvas.get_supported_filetypes()
    if output.suffix[1:].lower() not in formats:
        raise GradwatchError(
            f"-o: expected an image file ending in .png (or {', '.join(f'.{f}' for f in formats)}"
            f"), received {str(output)!r}"
        )
    figure.savefig(output, dpi=120)
    return output


def plot_figure(report: Report) -> Figure:
    """The figure `write_plot` saves (tests measure its axes)."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as error:
        raise GradwatchError(
            "gradwatch plot needs matplotlib, which is not installed: pip install 'gradwatch[plot]'"
        ) from error
    checks = completed(report)
    if not checks:
        raise GradwatchError(
            f"{report.directory} has no check that ran to completion; nothing to plot"
        )
    series = report.tensor_ratios()
    figure = Figure(figsize=(9, 5.5), layout="constrained")
    axes = figure.add_subplot()
    _ratio_lines(axes, series, checks)
    _thresholds_and_events(axes, report, checks)
    axes.set_yscale("log")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    checked = [step_of(check) for check in report.checks]
    if min(checked) == max(checked):
        axes.set_xlim(min(checked) - 1, max(checked) + 1)
    axes.set_xlabel("step (optimizer updates)")
    axes.set_ylabel("ratio ‖numeric − analytic‖ / (‖numeric‖ + ‖analytic‖)")
    axes.set_title(
        f"gradwatch: {Path(*report.directory.parts[-2:])}: "
        f"{len(series)} tensors, {len(report.checks)} checks"
    )
    screened = [check for check in checks if screened_only(check)]
    if screened:
        where = "every check" if len(screened) == len(checks) else f"{len(screened)} checks"
        axes.text(
            0.01,
            0.98,
            f"tensors screened together at {where}: no per-tensor ratio there",
            transform=axes.transAxes,
            va="top",
            fontsize="small",
            color="0.3",
        )
    axes.grid(True, which="major", alpha=0.3)
    figure.legend(loc="outside lower center", ncols=3, fontsize="small", frameon=False)
    return figure


def _ratio_lines(
    axes: Axes,
    series: dict[str, tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]],
    checks: list[CheckResult],
) -> None:
    """The band of the other tensors, the highlighted tensors' lines, the global line."""
    ranked = sorted(series, key=lambda name: -_highest(series[name][1]))
    highlighted, rest = ranked[:HIGHLIGHTED], ranked[HIGHLIGHTED:]
    if rest:
        _band(axes, {name: series[name] for name in rest})
    global_ratio = {step_of(check): check.ratio for check in checks}
    for name in highlighted:
        steps, ratios = series[name]
        hidden = _under(steps, ratios, global_ratio)
        axes.plot(
            steps,
            np.maximum(ratios, FLOOR),  # NaN stays NaN (a gap)
            marker=".",
            lw=1.2,
            # Drawn exactly under the global line: a legend entry would name an unseen line.
            label="_nolegend_" if hidden else _shorten(name),
        )
    axes.plot(
        [step_of(check) for check in checks],
        [max(check.ratio, FLOOR) for check in checks],
        color="black",
        lw=2.2,
        marker="o",
        label="global ratio",
    )


def _thresholds_and_events(axes: Axes, report: Report, checks: list[CheckResult]) -> None:
    """The threshold and warn lines, a cross at each alert, a line at each error check."""
    limit = threshold(report)
    axes.axhline(limit, color="tab:red", ls="--", lw=1.2, label=f"threshold {limit:g}")
    axes.axhline(checks[-1].warn, color="tab:orange", ls=":", lw=1.2, label="warn")
    alerts = [alert for alert in report.alerts if alert.step is not None]
    if alerts:
        axes.scatter(
            [alert.step or 0 for alert in alerts],
            [max(alert.ratio, FLOOR) for alert in alerts],
            marker="x",
            s=90,
            color="red",
            zorder=5,
            label=f"alert ({len(alerts)})",
        )
    for position, unfinished in enumerate(report.errors):
        axes.axvline(
            step_of(unfinished),
            color="gray",
            lw=1,
            alpha=0.6,
            label="check could not run" if position == 0 else None,
        )


def _under(
    steps: npt.NDArray[np.int64], ratios: npt.NDArray[np.float64], global_ratio: dict[int, float]
) -> bool:
    """True when a tensor's series is within 5% of the global ratio at each of its steps (a
    one-tensor model, or the tensor that sets it): its line hides under the global one."""
    if not ratios.size:
        return True
    reference = np.array([global_ratio.get(int(step), np.nan) for step in steps])
    return bool(np.allclose(ratios, reference, rtol=0.05, atol=0.0, equal_nan=True))


def _highest(ratios: npt.NDArray[np.float64]) -> float:
    """The largest ratio, NaN ranked highest (see `nan_last`)."""
    return nan_last(float(np.max(ratios))) if ratios.size else -np.inf


def _band(
    axes: Axes, series: dict[str, tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]]
) -> None:
    """Lowest to highest ratio of `series` at each step, and the median line."""
    all_steps = np.concatenate([steps for steps, _ in series.values()])
    all_ratios = np.concatenate([ratios for _, ratios in series.values()])
    finite = ~np.isnan(all_ratios)  # NaN: no place in a band
    all_steps, all_ratios = all_steps[finite], np.maximum(all_ratios[finite], FLOOR)
    order = np.lexsort((all_ratios, all_steps))  # by step, then by ratio
    all_steps, all_ratios = all_steps[order], all_ratios[order]
    steps, start, count = np.unique(all_steps, return_index=True, return_counts=True)
    low, high = all_ratios[start], all_ratios[start + count - 1]
    middle = (all_ratios[start + (count - 1) // 2] + all_ratios[start + count // 2]) / 2
    label = f"other {len(series)} tensors: lowest to highest"
    axes.fill_between(steps, low, high, color="0.6", alpha=0.35, lw=0, label=label)
    axes.plot(steps, middle, color="0.45", lw=1, ls="-.", label="their median")


def _shorten(name: str) -> str:
    if len(name) <= _NAME_WIDTH:
        return name
    head = (_NAME_WIDTH - 3) // 2
    return name[:head] + "..." + name[len(name) - (_NAME_WIDTH - 3 - head) :]
