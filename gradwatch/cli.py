"""The ``gradwatch`` command: post-mortem views of a report directory.

``gradwatch show DIR`` (exit 0 clean, 1 alert or a check that could not run, 2
missing/unreadable), ``gradwatch trend DIR``,
``gradwatch worst DIR [--step N]``, ``gradwatch plot DIR -o FILE.png``,
``gradwatch html DIR -o FILE.html``; each takes ``--json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from gradwatch import __version__
from gradwatch.errors import GradwatchError
from gradwatch.report import Report, TruncatedReportWarning, load_report
from gradwatch.result import CheckResult, Localization
from gradwatch.store.models import RunSelection
from gradwatch.store.reader import locate_report
from gradwatch.views.html import detailed_steps, report_html
from gradwatch.views.plot import write_plot
from gradwatch.views.reading import completed as _completed
from gradwatch.views.reading import format_ratio as _g
from gradwatch.views.reading import nan_last as _nan_last
from gradwatch.views.reading import next_step, notable_notes, screened_only
from gradwatch.views.reading import step_of as _step
from gradwatch.views.reading import threshold as _threshold
from gradwatch.views.reading import worst_check as _worst_check
from gradwatch.views.show import error_text, printable, show_lines, steps_text

__all__ = ["main"]

EXIT_CLEAN = 0
EXIT_ALERT = 1
EXIT_ERROR = 2

_SPARK = "▁▂▃▄▅▆▇█"
_SPARK_ASCII = "_.-:=+*#"
_LOG_RANGE = (-12.0, 0.0)
_TREND_WIDTH = 60


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = _parser()
    arguments = parser.parse_args(argv)
    report: Report | None = None
    step = vars(arguments).get("step")
    try:
        directory, below = locate_report(arguments.report_dir)
        if below:  # on stderr: --json output stays one document
            print(f"gradwatch: reading the report in {printable(str(directory))}", file=sys.stderr)
        arguments.report_dir = directory
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TruncatedReportWarning)
            # Only the page keeps every check whole; the other views read a long run of a
            # large model in a few percent of that memory (see load_report's `compact`).
            keep: tuple[int, ...] = () if step is None else (step,)
            if arguments.command == "html":
                # The page lists some checks in full: read compact once to choose them, then
                # keep just those whole (a long run stays in a few percent of the memory).
                chosen = load_report(directory, compact=True, run=arguments.run)
                keep = tuple(detailed_steps(chosen))
            report = load_report(directory, compact=True, keep_steps=keep, run=arguments.run)
        # Named as the user typed it (relative stays relative): the commands it suggests
        # work from where they were typed.
        report = report.model_copy(update={"directory": directory})
        for message in report.warnings:
            print(f"gradwatch: warning: {printable(_one_line_text(message))}", file=sys.stderr)
        code: int = arguments.handler(report, arguments)
    except BrokenPipeError:  # output piped into `head`: the verdict still sets the exit code
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return _show_code(report) if report is not None and arguments.handler is _show else 0
    except (GradwatchError, OSError) as error:
        print(f"gradwatch: error: {printable(_one_line(error))}", file=sys.stderr)
        return EXIT_ERROR
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradwatch", description="Read the reports that gradwatch.GradWatch writes."
    )
    parser.add_argument("--version", action="version", version=f"gradwatch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument(
            "report_dir",
            metavar="DIR",
            help="report directory (with report.json), or a directory with one report "
            "a few levels below it (the Trainer's output_dir, Lightning's root dir)",
        )
        sub.add_argument("--json", action="store_true", help="machine-readable output")
        sub.add_argument(
            "--run",
            type=_run_choice,
            default="latest",
            metavar="N|all|latest",
            help="which run to read: a fresh train() starts a new run, a resume continues "
            "one (default: latest; N counts from 1)",
        )
        return sub

    show = command(
        "show",
        "summary of a run; exit 1 when it raised an alert or a check could not run (error), "
        "2 when unreadable",
    )
    show.set_defaults(handler=_show)
    trend = command("trend", "ratio per step, globally and per tensor, as text")
    trend.set_defaults(handler=_trend)
    worst = command("worst", "the worst components of one check")
    worst.add_argument("--step", type=int, help="the checked step (default: highest ratio)")
    worst.add_argument("--top", type=int, default=10, help="how many components (default 10)")
    worst.set_defaults(handler=_worst)
    plot = command("plot", "PNG of ratio per step per tensor (needs matplotlib)")
    plot.add_argument("-o", "--output", required=True, metavar="FILE.png", help="image to write")
    plot.set_defaults(handler=_plot)
    html = command("html", "one self-contained HTML page of the report (no network needed)")
    html.add_argument("-o", "--output", required=True, metavar="FILE.html", help="page to write")
    html.set_defaults(handler=_html)
    return parser


def _run_choice(text: str) -> RunSelection:
    if text in ("latest", "all"):
        return "latest" if text == "latest" else "all"
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(
            f"expected a run number >= 1, 'latest' or 'all', received {text!r}"
        )
    return number


# -- show ---------------------------------------------------------------------------------


def _show_code(report: Report) -> int:
    return EXIT_ALERT if report.alerts or report.errors else EXIT_CLEAN


def _show(report: Report, arguments: argparse.Namespace) -> int:
    code = _show_code(report)
    worst_check = _worst_check(report)
    if arguments.json:
        payload: dict[str, Any] = {
            "directory": str(report.directory),
            "closed": report.closed,
            "run": report.run,
            "run_summaries": [summary.model_dump() for summary in report.run_summaries],
            "runs": [run.model_dump() for run in report.runs],
            "steps": report.steps,
            "ratio": _ratio_summary(report),
            "threshold": _threshold(report),
            "alerts": [alert.model_dump() for alert in report.alerts],
            "errors": [_error_payload(check) for check in report.errors],
            "worst": None if worst_check is None else _worst_payload(worst_check, 10),
            "skipped": [skip.model_dump() for skip in report.skipped],
            "configuration": report.configuration.model_dump() if report.configuration else None,
            "notes": [note for note, _ in notable_notes(report)[0]],
            "next_step": next_step(report, str(report.directory)),
            "warnings": report.warnings,
            "exit_code": code,
        }
        _print_json(payload)
        return code

    for line in show_lines(report):
        _say(line)
    return code


# -- trend --------------------------------------------------------------------------------


def _trend(report: Report, arguments: argparse.Namespace) -> int:
    threshold = _threshold(report)
    completed = _completed(report)
    rows: list[tuple[str, npt.NDArray[np.int64], npt.NDArray[np.float64]]] = [
        (
            "global",
            np.array([_step(check) for check in completed], dtype=np.int64),
            np.array([check.ratio for check in completed], dtype=np.float64),
        )
    ]
    rows += [(name, steps, ratios) for name, (steps, ratios) in report.tensor_ratios().items()]
    error_steps = [_step(check) for check in report.errors]
    if arguments.json:
        head = {"steps": report.steps, "threshold": threshold, "error_steps": error_steps}
        _print_trend_json(head, rows)
        return EXIT_CLEAN
    if not report.checks:
        _say("no checks recorded")
        return EXIT_CLEAN
    if error_steps:
        _say(f"checks that could not run (error), not drawn: steps {steps_text(error_steps)}")
    if not completed:
        _say("no check ran to completion")
        return EXIT_CLEAN
    blocks = _spark_characters()
    low, high = _LOG_RANGE
    _say(
        f"ratio per check, steps {_step(completed[0])} .. {_step(completed[-1])} "
        f"({len(completed)} checks); log scale 1e{low:.0f} {blocks[0]} .. {blocks[-1]} "
        f"1e{high:.0f}; threshold {_g(threshold)}"
    )
    screened = [_step(check) for check in completed if screened_only(check)]
    if screened:
        _say(_screened_text(screened, len(completed)))
    width = max(len(name) for name, _, _ in rows)
    for name, steps, ratios in rows:
        if not ratios.size:
            continue
        line = _sparkline(ratios.tolist(), blocks)
        over = np.flatnonzero(np.isnan(ratios) | (ratios >= threshold))
        since = f"  >= threshold from step {steps[over[0]]}" if over.size else ""
        maximum = math.nan if np.isnan(ratios).any() else float(ratios.max())
        _say(
            f"{name:<{width}}  {line:<{min(_TREND_WIDTH, len(completed))}}  "
            f"last {_g(float(ratios[-1]))}  max {_g(maximum)}{since}"
        )
    return EXIT_CLEAN


def _screened_text(steps: list[int], checks: int) -> str:
    where = "every check" if len(steps) == checks else f"{len(steps)} of {checks} checks"
    return (
        f"tensors screened together at {where} (steps {steps_text(steps)}): none was checked "
        "on its own there, so no per-tensor ratio is drawn for them"
    )


def _print_trend_json(
    head: dict[str, Any], rows: list[tuple[str, npt.NDArray[np.int64], npt.NDArray[np.float64]]]
) -> None:
    """`head` plus ``"series"``, one series at a time (a long run never sits whole in text)."""
    text = json.dumps(head, indent=2)
    print(text[: text.rindex("}")].rstrip() + ',\n  "series": {', end="")
    for position, (name, steps, ratios) in enumerate(rows):
        points = [
            {"step": step, "ratio": ratio}
            for step, ratio in zip(steps.tolist(), ratios.tolist(), strict=True)
        ]
        print(f"{',' if position else ''}\n    {json.dumps(name)}: {json.dumps(points)}", end="")
    print("\n  }\n}")


def _sparkline(ratios: list[float], blocks: str) -> str:
    if len(ratios) > _TREND_WIDTH:  # one character per bin, showing the bin's worst ratio
        edges = [round(i * len(ratios) / _TREND_WIDTH) for i in range(_TREND_WIDTH + 1)]
        ratios = [max(ratios[a:b], key=_nan_last) for a, b in itertools.pairwise(edges)]
    low, high = _LOG_RANGE
    characters = []
    for ratio in ratios:
        if math.isnan(ratio):
            characters.append("?")
            continue
        level = math.log10(ratio) if ratio > 0 else low
        fraction = (min(max(level, low), high) - low) / (high - low)
        characters.append(blocks[min(int(fraction * len(blocks)), len(blocks) - 1)])
    return "".join(characters)


def _spark_characters() -> str:
    encoding = getattr(sys.stdout, "encoding", None) or "ascii"
    try:
        _SPARK.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return _SPARK_ASCII
    return _SPARK


# -- worst --------------------------------------------------------------------------------


def _worst(report: Report, arguments: argparse.Namespace) -> int:
    if arguments.top < 1:
        raise GradwatchError(f"--top: expected an int >= 1, received {arguments.top}")
    if arguments.step is not None:
        check = report.check_at(arguments.step)
    else:
        found = _worst_check(report)
        if found is None:
            raise GradwatchError(
                f"{report.directory} has no check that ran to completion; nothing to show"
            )
        check = found
    if arguments.json:
        _print_json(_worst_payload(check, arguments.top))
        return EXIT_CLEAN
    if check.status == "error":
        _say(error_text(check))
        return EXIT_CLEAN
    _say(
        f"step {check.step}: ratio {_g(check.ratio)} ({check.status}), "
        f"{check.checked} of {check.size} components checked ({check.mode})"
    )
    if check.localization is not None and not check.tensors:
        _say(
            f"tensors: none measured on its own (a confirmed screen, {check.checked} random "
            "directions, ended the check); where the bug is, by module:"
        )
        _module_search(check.localization, arguments.top)
    elif screened_only(check):
        _say(
            f"tensors: {len(check.tensors)}, screened together: {check.checked} random "
            f"directions over all {check.size} components, none checked on its own"
        )
        if not check.worst:
            _say(
                "no component listed: a screen below warn "
                f"({_g(check.warn)}) is the whole check; one at or above it checks each "
                "tensor and localizes the worst components"
            )
    else:
        _say("tensors: " + _tensors_text(check))
        if not check.worst:
            _say(f"no component listed: this {check.mode} check kept none")
    for component in check.worst[: arguments.top]:
        _say("  " + _component_text(component.model_dump()))
    return EXIT_CLEAN


def _module_search(found: Localization, top: int) -> None:
    """The module-local search of a failing check: the suspects in words, then the calls it
    checked that did not pass (at most ``top``), each side's local ratio."""
    for suspect in found.suspects:
        _say(f"  the bug is in {suspect.describe()}")
    if not found.suspects:
        _say("  no module call failed its own check")
    failing = [v for v in found.modules if v.status not in ("ok", "unreached")]
    _say(
        f"  {found.checks} module calls checked, {found.evaluations} module evaluations; "
        f"not passing ({len(failing)}), local threshold {_g(found.threshold)}:"
    )
    for verdict in failing[:top]:
        sides = ", ".join(
            f"{side} {_g(ratio)}"
            for side, ratio in (
                ("input", verdict.input_ratio),
                ("parameter", verdict.parameter_ratio),
            )
            if ratio is not None
        )
        name = verdict.module or "(the model)"
        _say(f"    {name} ({verdict.class_name}): {verdict.status}, {sides}")


def _worst_payload(check: CheckResult, top: int) -> dict[str, Any]:
    return {
        "step": check.step,
        "ratio": check.ratio,
        "status": check.status,
        # A tensor not checked on its own has no ratio of its own (null), not the global one.
        "tensors": {
            name: tensor.model_dump() | ({} if tensor.checked else {"ratio": None})
            for name, tensor in check.tensors.items()
        },
        "components": [component.model_dump() for component in check.worst[:top]],
        "localization": check.localization.model_dump() if check.localization else None,
        "error": check.error,
        "error_source": check.error_source,
    }


def _error_payload(check: CheckResult) -> dict[str, Any]:
    return {"step": check.step, "error": check.error, "source": check.error_source}


def _plot(report: Report, arguments: argparse.Namespace) -> int:
    output = write_plot(report, Path(arguments.output))
    if arguments.json:
        _print_json({"output": str(output.absolute()), "checks": len(report.checks)})
    else:
        _say(f"wrote {output}")
    return EXIT_CLEAN


# -- html ---------------------------------------------------------------------------------


def _html(report: Report, arguments: argparse.Namespace) -> int:
    output = Path(arguments.output)
    output.write_text(report_html(report), encoding="utf-8")
    if arguments.json:
        _print_json({"output": str(output.absolute()), "checks": len(report.checks)})
    else:
        _say(f"wrote {output}")
    return EXIT_CLEAN


# -- helpers ------------------------------------------------------------------------------


def _ratio_summary(report: Report) -> dict[str, Any]:
    completed = _completed(report)
    if not completed:
        return {}
    first, last = completed[0], completed[-1]
    worst = _worst_check(report)
    assert worst is not None
    return {
        "first": first.ratio,
        "first_step": first.step,
        "last": last.ratio,
        "last_step": last.step,
        "max": worst.ratio,
        "max_step": worst.step,
    }


SHOWN_TENSORS = 6
"""Tensors ``gradwatch worst`` lists: every non-ok one, then the largest ratios."""


def _tensors_text(check: CheckResult) -> str:
    ordered = sorted(check.tensors.items(), key=lambda item: -_nan_last(item[1].ratio))
    flagged = sum(tensor.status != "ok" for _, tensor in ordered)
    shown = ordered[: max(SHOWN_TENSORS, flagged)]
    text = ", ".join(
        f"{name} {_g(tensor.ratio)}" + ("" if tensor.status == "ok" else f" {tensor.status}")
        for name, tensor in shown
    )
    hidden = len(ordered) - len(shown)
    return text + (f", ... and {hidden} more (ok)" if hidden else "")


def _component_text(component: dict[str, Any]) -> str:
    diagnosis = component.get("diagnosis") or ""
    return (
        f"{component['name']:<14} analytic {component['analytic']:+.6e}  "
        f"numeric {component['numeric']:+.6e}  abs error {component['abs_error']:.2e}  "
        f"rel error {component['rel_error']:.2e}  {diagnosis}"
    ).rstrip()


def _at_or_above(ratio: float, threshold: float) -> bool:
    return math.isnan(ratio) or ratio >= threshold


def _say(line: str) -> None:
    """Print one line of a view; a report's text never drives the terminal (see `printable`)."""
    print(printable(line))


def _print_json(payload: object) -> None:
    # NaN and Infinity stay what they are (as in checks.jsonl), never null.
    print(json.dumps(payload, indent=2, default=str))


def _one_line(error: BaseException) -> str:
    return _one_line_text(str(error)) or type(error).__name__


def _one_line_text(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
