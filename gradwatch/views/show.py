"""`gradwatch show` as text that fits an 80x40 terminal for a model of any size.

A run of any length and a model of any number of tensors give the same few blocks: the
run, the ratio, the errors and alerts (the first few), the worst check (which rule set
its status, the failing and the worst few tensors, the rest folded with a count, its
worst components), the notes that change how to read the result, and one line of next
steps when something went wrong. Every line is wrapped to `WIDTH` columns.
"""

from __future__ import annotations

import textwrap
from collections import Counter
from dataclasses import dataclass

from gradwatch.report import Report, RunRecord
from gradwatch.result import CheckResult, Component
from gradwatch.store.alerts import only_the_step_failed
from gradwatch.store.models import Alert, RunSummary
from gradwatch.views.reading import (
    completed,
    format_ratio,
    nan_last,
    next_step,
    notable_notes,
    ranked_tensors,
    screened_only,
    step_of,
    threshold,
    worst_check,
)

__all__ = [
    "HEIGHT",
    "WIDTH",
    "error_text",
    "printable",
    "runs_line",
    "show_lines",
    "steps_text",
    "tensor_lines",
]

WIDTH = 80
HEIGHT = 40
"""The terminal `show_lines` fits: at most `WIDTH` columns and `HEIGHT` lines."""

LISTED_ALERTS = 3
LISTED_ERRORS = 3
LISTED_RUNS = 3
LISTED_TENSORS = 6
"""Tensor rows of the worst check: the failing ones first, then the highest ratios."""
LISTED_COMPONENTS = 3
LISTED_NOTES = 4
NOTE_ROWS = 2
"""A note longer than this many rows is cut (``--json`` has it whole)."""

_ORDER = ("fail", "error", "nondeterministic", "warn", "ok")
_SHORT_STATUS = {"nondeterministic": "nondet"}


@dataclass(frozen=True)
class _Listed:
    """How many alerts, tensors, components and notes a summary lists."""

    alerts: int = LISTED_ALERTS
    tensors: int = LISTED_TENSORS
    components: int = LISTED_COMPONENTS
    notes: int = LISTED_NOTES
    errors: int = LISTED_ERRORS


_SHORTER = (_Listed(), _Listed(2, 4, 2, 3, 2), _Listed(1, 3, 1, 2, 1), _Listed(1, 1, 1, 1, 1))
"""Ever shorter summaries, tried in order until one fits `HEIGHT` lines (long paths,
long tensor names and many notes wrap to more rows)."""


def show_lines(report: Report) -> list[str]:
    """The human summary of `report`: at most `HEIGHT` lines of `WIDTH` columns, `printable`."""
    for listed in _SHORTER:
        lines = _summary(report, listed)
        if len(lines) <= HEIGHT:
            return lines
    return [*lines[: HEIGHT - 1], f"... {len(lines) - HEIGHT + 1} more lines (--json has all)"]


def _summary(report: Report, listed: _Listed) -> list[str]:
    directory = str(report.directory)
    state = "closed" if report.closed else "not closed: still running, or killed"
    lines = [f"gradwatch report {directory} ({state})"]
    lines += _runs(report)
    if not report.checks:
        return _fit([*lines, "no checks recorded"])
    lines.append(
        f"steps checked: {len(report.checks)} ({steps_text(report.steps)}); "
        f"threshold {threshold(report):.0e}, warn {report.checks[-1].warn:.0e}"
    )
    setup = _setup_text(report)
    if setup:
        lines.append("setup: " + setup)
    lines.append(_ratio_text(report))
    lines += _errors(report, listed.errors)
    lines += _alerts(report, listed.alerts)
    found = worst_check(report)
    if found is not None:
        lines += _worst_check(found, listed)
    lines += _notes(report, listed.notes)
    advice = _suspect_step(report, directory) or next_step(report, directory)
    if advice is not None:
        lines.append(advice)
    return _fit(lines)


def _suspect_step(report: Report, directory: str) -> str | None:
    """``next:`` naming the module where the first failing check's bug is, when that check
    searched its modules (module-local checks); None otherwise (`next_step` speaks)."""
    failed = [check for check in completed(report) if check.status == "fail"]
    if not failed or failed[0].localization is None or only_the_step_failed(failed[0]):
        return None
    first = failed[0]
    suspects = first.localization.suspects if first.localization else []
    if not suspects:
        return None
    named = suspects[0].describe()
    if len(suspects) > 1:
        named += f" (and {len(suspects) - 1} more suspect module calls: --json)"
    return f"next: read {named}; then gradwatch worst {directory} --step {step_of(first)}"


def printable(line: str) -> str:
    """`line` with every character that is not printable shown as ``?``.

    Tensor names, notes, errors and configuration come from a report file, which may have
    come from anyone: an escape sequence there must not clear the screen or retitle the
    terminal, and a newline must not forge a line such as ``alerts: none``.
    """
    return "".join(c if c.isprintable() else "?" for c in line)


def _runs(report: Report) -> list[str]:
    """Which run is shown, the others in one line, and the restarts of the shown one."""
    lines = runs_line(report)
    shown = report.runs
    if report.run is not None:
        (summary,) = [found for found in report.run_summaries if found.run == report.run]
        shown = [report.runs[index] for index in summary.segments]
    elif len(report.run_summaries) > 1:
        return lines  # every run: the line above counts them (--json lists each process)
    if len(shown) <= 1 and not any(run.resumed for run in shown):
        return lines
    lines.append(f"processes: {len(shown)} (restarted or resumed; every one's checks are kept)")
    listed = shown if len(shown) <= LISTED_RUNS else [shown[0], *shown[-(LISTED_RUNS - 1) :]]
    for position, run in enumerate(listed):
        if position == 1 and len(shown) > LISTED_RUNS:
            lines.append(f"  ... {len(shown) - LISTED_RUNS} more (--json lists them)")
        who, what = _run_text(run, last=run is report.runs[-1])
        lines += [f"  {who}", f"    {what}"]
    return lines


def runs_line(report: Report) -> list[str]:
    """``run 2 of 2 (the latest); earlier: run 1 (2 alerts, steps 0..20): --run N``, or nothing.

    A fresh ``train()`` into the same directory is a new run: the verdict is the shown
    run's; the others are counted in one line so a fixed bug's alerts stay findable.
    """
    summaries = report.run_summaries
    if len(summaries) <= 1:
        return []
    if report.run is None:
        bad = [summary.run for summary in summaries if not summary.clean]
        verdict = f"runs {_numbers(bad)} have alerts or errors" if bad else "all clean"
        return [f"all {len(summaries)} runs (--run all): {verdict}"]
    latest = report.run == summaries[-1].run
    head = f"run {report.run} of {len(summaries)}" + (" (the latest)" if latest else "")
    others = [summary for summary in summaries if summary.run != report.run]
    if len(others) <= 2:
        described = "; ".join(f"run {summary.run} ({_run_verdict(summary)})" for summary in others)
    else:
        bad = [summary.run for summary in others if not summary.clean]
        described = f"{len(others)} runs, " + (
            f"runs {_numbers(bad)} with alerts or errors" if bad else "all clean"
        )
    return [f"{head}; other runs: {described}; read one with --run N or --run all"]


def _run_verdict(summary: RunSummary) -> str:
    parts = [f"{summary.checks} check{'' if summary.checks == 1 else 's'}"]
    if summary.alerts:
        parts.append(f"{summary.alerts} alert{'' if summary.alerts == 1 else 's'}")
    if summary.errors:
        parts.append(f"{summary.errors} error{'' if summary.errors == 1 else 's'}")
    if summary.clean:
        parts.append("clean")
    if summary.first_step is not None:
        parts.append(f"steps {summary.first_step}..{summary.last_step}")
    return ", ".join(parts)


def _numbers(numbers: list[int]) -> str:
    shown = ", ".join(str(number) for number in numbers[:5])
    return shown + (f" and {len(numbers) - 5} more" if len(numbers) > 5 else "")


def _run_text(run: RunRecord, *, last: bool) -> tuple[str, str]:
    """(``process 2: pid 42 on node1, started ...``, ``resumed from ..., 3 checks, closed``)."""
    who = f"process {run.run + 1}: " + ("pid ?" if run.pid is None else f"pid {run.pid}")
    if run.host:
        who += f" on {_printable(run.host)}"
    if run.started:
        who += f", started {_printable(run.started)}"
    parts = [f"resumed from {_printable(run.resumed)}"] if run.resumed else []
    steps = "" if run.first_step is None else f" (steps {run.first_step}..{run.last_step})"
    parts.append(f"{run.checks} check{'' if run.checks == 1 else 's'}{steps}")
    if run.closed:
        parts.append("closed")
    else:
        parts.append("not closed: still running, or killed" if last else "not closed: killed")
    return who, ", ".join(parts)


def _setup_text(report: Report) -> str:
    configuration = report.configuration
    parts: list[str] = []
    if configuration is not None:
        parts.append(f"every {configuration.every}")
        mode = completed(report)[-1].mode if completed(report) else None
        parts.append(f"sample {configuration.sample!r}" + (f" ({mode})" if mode else ""))
        if configuration.dtype:
            parts.append(configuration.dtype)
    if configuration is not None and configuration.regularization:
        parts.append("J includes " + ", ".join(configuration.regularization))
    return ", ".join(parts)


def _ratio_text(report: Report) -> str:
    checks = completed(report)
    if not checks:
        return "ratio: - (no check ran to completion)"
    first, last = checks[0], checks[-1]
    worst = max(checks, key=lambda check: (check.ratio != check.ratio, check.ratio))
    return (
        f"ratio first {format_ratio(first.ratio)} (step {first.step}), "
        f"last {format_ratio(last.ratio)} (step {last.step}), "
        f"max {format_ratio(worst.ratio)} (step {worst.step})"
    )


def _errors(report: Report, listed: int = LISTED_ERRORS) -> list[str]:
    errors = report.errors
    if not errors:
        return []
    counted = f"{len(errors)} check{'' if len(errors) == 1 else 's'}"
    lines = [f"errors: {counted} could not run, first at step {errors[0].step}"]
    for check in errors[:listed]:
        lines.append("  " + _cut(error_text(check), WIDTH - 2))
    if len(errors) > listed:
        lines.append(f"  ... and {len(errors) - listed} more")
    return lines


def error_text(check: CheckResult) -> str:
    """``step 2: error in gradwatch.check: RuntimeError: ...`` on one line."""
    return (
        f"step {check.step}: error in {check.error_source or 'gradwatch'}: "
        f"{_one_line(check.error or 'unknown error')}"
    )


def _alert_tensor(alert: Alert) -> str:
    return f"{alert.tensor} ({format_ratio(alert.tensor_ratio)})" if alert.tensor else "-"


def _alerts(report: Report, most: int = LISTED_ALERTS) -> list[str]:
    alerts = report.alerts
    if not alerts:
        return ["alerts: none"]
    lines = [f"alerts: {len(alerts)}, first at step {alerts[0].step}"]
    listed = alerts if len(alerts) <= most else alerts[:1]
    for alert in listed:
        # The module the search named is where the bug is; a tensor only measures it.
        where = f"bug in {alert.module}" if alert.module else f"tensor {_alert_tensor(alert)}"
        lines.append(
            f"  step {alert.step}: ratio {format_ratio(alert.ratio)}, {where}, "
            f"worst {alert.component or '-'}"
        )
    rest = alerts[len(listed) :]
    if rest:
        named = Counter(alert.module or alert.tensor or "-" for alert in rest)
        tensors = ", ".join(f"{name} ({count})" for name, count in named.most_common(2))
        others = len(named) - 2
        tensors += f" and {others} other tensors" if others > 0 else ""
        lines.append(
            f"  ... and {len(rest)} more (steps {rest[0].step}..{rest[-1].step}) naming {tensors}"
        )
    return lines


def _worst_check(check: CheckResult, listed: _Listed) -> list[str]:
    lines = [f"worst check: step {check.step}, ratio {format_ratio(check.ratio)} ({check.status})"]
    link = check.step_link
    if link is not None and link.status == "fail":
        # Backprop may be right while the training step is not: say which link broke.
        lines += _cut_rows(
            f"  rule: fail by the step link (the optimizer's gradient against the gradient "
            f"of the step's loss): ratio {format_ratio(link.ratio)} >= threshold "
            f"{link.threshold:g}; backprop: {check.verdict or 'not judged'}",
            NOTE_ROWS,
            indent="    ",
        )
    elif check.verdict:
        lines += _cut_rows(f"  rule: {check.verdict}", NOTE_ROWS, indent="    ")
    lines += tensor_lines(check, listed.tensors)
    lines += _component_lines(check.worst[: listed.components])
    return lines


def tensor_lines(check: CheckResult, listed: int = LISTED_TENSORS) -> list[str]:
    """The failing and the worst few tensors of `check`, the rest folded with a count."""
    total = len(check.tensors)
    if not total and check.localization is not None:
        return ["  tensors: none measured on its own; the module search says where (next:)"]
    if not total:
        return ["  tensors: none recorded in this check"]
    if screened_only(check):
        return [
            f"  tensors: {total}, none checked on its own: the screen along "
            f"{check.checked} random directions over all of them gave "
            f"{format_ratio(check.ratio)} ({check.status})"
        ]
    ranked = ranked_tensors(check)
    counts: Counter[str] = Counter(tensor.status for _, tensor in ranked)
    summary = ", ".join(f"{counts[status]} {status}" for status in _ORDER if counts[status])
    lines = [f"  tensors: {total} ({summary}); worst first"]
    shown = ranked[:listed]
    sizes = [f"{tensor.checked}/{tensor.size}" for _, tensor in shown]
    size_width = max(len(text) for text in sizes)
    name_width = min(max(len(name) for name, _ in shown), WIDTH - 25 - size_width)
    for (name, tensor), size in zip(shown, sizes, strict=True):
        status = _SHORT_STATUS.get(tensor.status, tensor.status)
        lines.append(
            f"    {_shorten(name, name_width):<{name_width}}  {format_ratio(tensor.ratio)}  "
            f"{status:<6} {size:>{size_width}}"
        )
    rest = ranked[listed:]
    if rest:
        folded = Counter(tensor.status for _, tensor in rest)
        folded_kinds = ", ".join(f"{count} {status}" for status, count in folded.most_common())
        top = format_ratio(max((tensor.ratio for _, tensor in rest), key=nan_last))
        lines.append(f"    ... and {len(rest)} more ({folded_kinds}; ratio at most {top})")
    return lines


def _component_lines(components: list[Component]) -> list[str]:
    if not components:
        return []
    lines = ["  worst components: analytic, numeric, abs error, label"]
    width = WIDTH - 4 - 40
    for component in components:
        numbers = (
            f"{component.analytic:+.4e}  {component.numeric:+.4e}  "
            f"{component.abs_error:.2e}  {component.diagnosis or ''}"
        ).rstrip()
        if len(component.name) < width:
            lines.append(f"    {component.name:<{width}}{numbers}")
        else:
            lines += [f"    {component.name}", f"    {'':<{width}}{numbers}"]
    return lines


def _notes(report: Report, listed: int = LISTED_NOTES) -> list[str]:
    notes, routine = notable_notes(report)
    if not notes:
        return []
    checks = len(report.checks)
    folded = f" ({routine} routine in --json)" if routine else ""
    lines = [f"notes that change how to read it{folded}:"]
    for note, count in notes[:listed]:
        where = "" if count >= checks else f" [{count} of {checks} checks]"
        lines += _cut_rows(f"  - {_one_line(note)}{where}", NOTE_ROWS, indent="    ")
    if len(notes) > listed:
        lines.append(f"  ... and {len(notes) - listed} more notes (--json)")
    return lines


# -- fitting ------------------------------------------------------------------------------


def _fit(lines: list[str]) -> list[str]:
    """Every line made `printable`, wrapped at `WIDTH` with its own indentation plus four."""
    fitted = []
    for line in map(printable, lines):
        if len(line) <= WIDTH:
            fitted.append(line)
            continue
        indent = " " * (len(line) - len(line.lstrip()))
        fitted += textwrap.wrap(
            line,
            WIDTH,
            subsequent_indent=indent + "    ",
            break_long_words=True,
            break_on_hyphens=False,
        )
    return fitted


def _cut_rows(line: str, rows: int, *, indent: str) -> list[str]:
    """`line` wrapped to at most `rows` rows, the last one ending in ``...`` when cut."""
    wrapped = textwrap.wrap(line, WIDTH, subsequent_indent=indent, break_on_hyphens=False)
    if len(wrapped) <= rows:
        return wrapped
    kept = wrapped[:rows]
    kept[-1] = _cut(kept[-1] + " " + wrapped[rows].strip(), WIDTH)
    return kept


def _cut(text: str, width: int) -> str:
    """`text` within `width` columns, cut after a whole word and marked `` ...``."""
    if len(text) <= width:
        return text
    head = text[: width - 4]
    indent = len(head) - len(head.lstrip())
    space = head.rfind(" ")
    if space > indent + width // 2:  # a word boundary not too far back
        head = head[:space]
    return head.rstrip() + " ..."


def _shorten(name: str, width: int) -> str:
    """`name` cut in the middle to `width` characters (the layer and the tensor kind stay)."""
    if len(name) <= width:
        return name
    head = (width - 3) // 2
    return name[:head] + "..." + name[len(name) - (width - 3 - head) :]


def steps_text(steps: list[int]) -> str:
    if len(steps) <= 8:
        return ", ".join(str(step) for step in steps)
    return ", ".join(str(step) for step in steps[:3]) + ", ..., " + str(steps[-1])


def _printable(text: str) -> str:
    """`text` on one line with control characters (terminal escapes) shown as ``?``."""
    return printable(_one_line(text))


def _one_line(text: str) -> str:
    return " ".join(text.split())
