"""Reading a report directory back: `load_report`, one ``checks.jsonl`` line at a time.

The files of a report directory may come from someone else: they are found and opened by
`gradwatch.store.files` (regular files only, ``report.json`` size-limited); here each line
of ``checks.jsonl`` is read up to a size limit, and every corruption is a `ReportError`
naming file and line.
"""

from __future__ import annotations

import bisect
import os
import warnings
from collections.abc import Collection, Iterator
from pathlib import Path

from pydantic import ValidationError

from gradwatch.errors import ReportError
from gradwatch.result import CheckResult
from gradwatch.store.alerts import alert_for, ratio_sort_key
from gradwatch.store.files import (
    MAX_SUMMARY_BYTES,
    NOFOLLOW,
    file_kind,
    first_error,
    locate_report,
    open_report_file,
    read_summary,
    report_directory,
    shorten,
)
from gradwatch.store.models import (
    CHECKS_FILE,
    SCHEMA_VERSION,
    SUMMARY_FILE,
    Alert,
    Report,
    ReportSummary,
    RunRecord,
    RunSelection,
    RunSummary,
    TensorColumns,
    run_numbers,
)

__all__ = [
    "MAX_LINE_BYTES",
    "MAX_SUMMARY_BYTES",
    "NOFOLLOW",
    "TruncatedReportWarning",
    "file_kind",
    "load_report",
    "locate_report",
    "read_summary",
    "shorten",
]


class TruncatedReportWarning(UserWarning):
    """The last line of ``checks.jsonl`` was cut short (the run was killed mid-write)."""


MAX_LINE_BYTES = 64 << 20
"""The longest ``checks.jsonl`` line read: a check of about 500,000 tensors. Anything
longer is not a line gradwatch wrote (reading it would only exhaust memory)."""


def load_report(
    report_dir: str | os.PathLike[str],
    *,
    compact: bool = False,
    keep_steps: Collection[int] = (),
    run: RunSelection = "all",
) -> Report:
    """Read a report directory written by `GradWatch`.

    ``checks.jsonl`` is read one line at a time. The files of the directory must be
    regular files: a symlink, a FIFO or a device there is refused, never followed, read
    or waited on (a report someone sent you cannot make gradwatch read another file).

    Args:
        report_dir: the report directory (or the path of its ``report.json`` or
            ``checks.jsonl``).
        compact: keep the per-tensor results and worst components only of the checks a
            reader opens: the worst one, the first failing one, the error checks and
            `keep_steps`; every other check keeps its verdict, ratio and notes, and
            ``Report.tensor_ratios`` every per-tensor ratio (8 bytes each). What
            ``gradwatch show`` uses: a long run of a large model reads in a few percent
            of the memory the whole checks take.
        keep_steps: with `compact`, steps whose checks are kept whole too.
        run: which run's checks to read: ``"all"`` (default), ``"latest"`` or its number
            (1 = the first). A fresh ``train()`` starts a new run, a resume continues
            one (docs/runs.md); ``Report.run_summaries`` counts every run either way.

    Returns:
        The run, with ``.checks`` in step order and ``.alerts`` for every failing check.

    Raises:
        ReportError: the directory is missing, holds no report, a file is not a regular
            file, or a file is corrupt (the message names the file and line); `run`
            names no run of the report.

    Warns:
        TruncatedReportWarning: the last line of ``checks.jsonl`` is incomplete (the run
            was killed while writing it); every earlier check is loaded.
    """
    directory = report_directory(report_dir)
    notes: list[str] = []
    # report.json first: it says which process wrote which lines (a run's record is
    # written when it opens, before its first line).
    summary = _summary_if_present(directory / SUMMARY_FILE, notes)
    runs = _runs_of(summary)
    numbers = run_numbers(runs)
    selected = _selected_run(run, numbers[-1], directory)
    reading = _Reading(runs, numbers, selected, compact=compact, keep_steps=keep_steps)
    for line, check in _scan_checks(directory / CHECKS_FILE, notes):
        reading.add(line, check)
    for note in notes:
        warnings.warn(note, TruncatedReportWarning, stacklevel=2)
    return _report_from(directory, summary, reading, notes)


def _selected_run(run: object, last: int, directory: Path) -> int | None:
    """The run number `run` names (None: all), checked against the report's runs."""
    if run == "all":
        return None
    if run == "latest":
        return last
    if isinstance(run, int) and not isinstance(run, bool) and 1 <= run <= last:
        return run
    raise ReportError(
        f"run: expected 'latest', 'all' or a run number from 1 to {last} (runs of "
        f"{str(directory)!r}), received {run!r}"
    )


def _summary_if_present(path: Path, notes: list[str]) -> ReportSummary | None:
    """``report.json`` read, or None with a note when it is missing."""
    if os.path.lexists(path):
        return read_summary(path)
    notes.append(f"{path} is missing: configuration and environment are unknown")
    return None


def _report_from(
    directory: Path, summary: ReportSummary | None, reading: _Reading, notes: list[str]
) -> Report:
    """The `Report` of the checks read (in step order, each with its run) and the summary."""
    order = sorted(range(len(reading.entries)), key=reading.step_key)  # stable: file order
    report = Report(
        directory=directory.absolute(),
        schema_version=summary.schema_version if summary else SCHEMA_VERSION,
        configuration=summary.configuration if summary else None,
        environment=summary.environment if summary else None,
        checks=[reading.check(index) for index in order],
        check_runs=[reading.segments[index] for index in order],
        runs=reading.runs,
        run=reading.selected,
        run_summaries=list(reading.summaries.values()),
        alerts=[alert for index in order if (alert := reading.entries[index][2]) is not None],
        skipped=summary.skipped if summary else [],
        closed=summary.closed if summary else False,
        warnings=notes,
        compact=reading.compact,
    )
    if reading.compact:
        report._columns = reading.columns.arrays(order)
    return report


class _Reading:
    """What `load_report` keeps of each check while it streams ``checks.jsonl``.

    Every check's alert is derived from the whole check as it is read. A compact reading
    keeps each check without its tensors and components (their ratios go to `columns`),
    except the checks a reader opens: the worst, the first failing one, the error checks
    and the steps asked for, picked as ``worst_check`` and ``next_step`` pick them from
    the checks in step order.
    """

    def __init__(
        self,
        runs: list[RunRecord],
        numbers: list[int],
        selected: int | None,
        *,
        compact: bool,
        keep_steps: Collection[int],
    ) -> None:
        self.runs = runs
        self._numbers = numbers
        self._starts = [run.first_line for run in runs]
        self.selected = selected
        for run in runs:  # counted from the lines read (report.json may lag)
            run.checks, run.first_step, run.last_step = 0, None, None
        self.summaries: dict[int, RunSummary] = {}
        for index, (run, number) in enumerate(zip(runs, numbers, strict=True)):
            found = self.summaries.setdefault(
                number, RunSummary(run=number, segments=[], started=run.started)
            )
            found.segments.append(index)
            found.closed = run.closed
        self.segments: list[int] = []
        """The process (index into `runs`) that wrote each entry."""
        self.compact = compact
        self.keep_steps = set(keep_steps)
        self.entries: list[tuple[int, CheckResult, Alert | None]] = []
        """(line, check, its alert) in file order; compact: the check without tensors."""
        self.whole: dict[int, CheckResult] = {}
        """Compact: entry index -> the whole check, for error checks and `keep_steps`."""
        self.columns = TensorColumns()
        self._worst: tuple[tuple[float, int, int], CheckResult] | None = None
        """((ratio, -step, -index), check): the highest ratio, the first in step order."""
        self._first_failing: tuple[tuple[int, int], CheckResult] | None = None

    def step_key(self, index: int) -> int:
        step = self.entries[index][1].step
        return -1 if step is None else step

    def check(self, index: int) -> CheckResult:
        if self._worst is not None and self._worst[0][2] == -index:
            return self._worst[1]
        if self._first_failing is not None and self._first_failing[0][1] == index:
            return self._first_failing[1]
        return self.whole.get(index, self.entries[index][1])

    def add(self, line: int, check: CheckResult) -> None:
        segment = max(bisect.bisect_right(self._starts, line) - 1, 0)
        alert = alert_for(check)
        self._count(segment, check, alert is not None)
        if self.selected is not None and self._numbers[segment] != self.selected:
            return
        index = len(self.entries)
        self.segments.append(segment)
        if not self.compact:
            self.entries.append((line, check, alert))
            return
        self.columns.add(index, check)
        self.entries.append((line, check.model_copy(update={"tensors": {}, "worst": []}), alert))
        step = self.step_key(index)
        if check.status == "error" or check.step in self.keep_steps:
            self.whole[index] = check
        if check.status != "error":
            worst = (ratio_sort_key(check.ratio), -step, -index)
            if self._worst is None or worst > self._worst[0]:
                self._worst = (worst, check)
        if check.status == "fail":
            first = (step, index)
            if self._first_failing is None or first < self._first_failing[0]:
                self._first_failing = (first, check)

    def _count(self, segment: int, check: CheckResult, alert: bool) -> None:
        """Count `check` in its process's record and its run's summary."""
        record, summary = self.runs[segment], self.summaries[self._numbers[segment]]
        record.checks += 1
        summary.checks += 1
        summary.alerts += alert
        summary.errors += check.status == "error"
        if check.status != "error" and (
            summary.max_ratio is None
            or ratio_sort_key(check.ratio) > ratio_sort_key(summary.max_ratio)
        ):
            summary.max_ratio = check.ratio
        if check.step is not None:
            for counted in (record, summary):
                first, last = counted.first_step, counted.last_step
                counted.first_step = check.step if first is None else min(first, check.step)
                counted.last_step = check.step if last is None else max(last, check.step)


def _runs_of(summary: ReportSummary | None) -> list[RunRecord]:
    """The runs that wrote the report (one unknown run when ``report.json`` does not say)."""
    if summary is not None and summary.runs:
        return [run.model_copy(deep=True) for run in summary.runs]
    closed = summary.closed if summary is not None else False
    environment = summary.environment if summary is not None else None
    return [
        RunRecord(
            run=0,
            pid=environment.pid if environment else None,
            started=environment.started if environment else None,
            first_line=0,
            closed=closed,
        )
    ]


def _scan_checks(path: Path, notes: list[str]) -> Iterator[tuple[int, CheckResult]]:
    """The checks of ``checks.jsonl`` with their line index (0-based), one line at a time."""
    with open_report_file(path) as file:
        count = 0
        number = 0
        while line := file.readline(MAX_LINE_BYTES + 1):
            number += 1
            if len(line) > MAX_LINE_BYTES:
                raise ReportError(
                    f"{path}, line {number}: expected one CheckResult as JSON, received a "
                    f"line longer than {MAX_LINE_BYTES >> 20} MiB"
                )
            if not line.strip():
                continue
            try:
                check = CheckResult.model_validate_json(line)
            except ValidationError as error:
                if not line.endswith(b"\n"):  # a complete file ends with "\n"
                    notes.append(
                        f"{path}, line {number} is truncated (the run was probably killed "
                        f"while writing it); loaded the {count} checks before it"
                    )
                    return
                raise ReportError(
                    f"{path}, line {number}: expected one CheckResult as JSON, received "
                    f"{shorten(line.decode('utf-8', 'replace'))!r} ({first_error(error)})"
                ) from error
            if check.step is not None and not 0 <= check.step < 2**63:
                raise ReportError(  # no training reaches it; the views index steps in int64
                    f"{path}, line {number}: expected a step from 0 to 2**63 - 1, received "
                    f"{shorten(str(check.step))}"
                )
            count += 1
            yield number - 1, check
