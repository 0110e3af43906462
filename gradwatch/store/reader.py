"""Reading a report directory back: `load_report`, one ``checks.jsonl`` line at a time.

The files of a report directory may come from someone else: each is opened as a regular
file only (never through a symlink, never a FIFO or a device), lines and ``report.json``
are read up to a size limit, and every corruption is a `ReportError` naming file and line.
"""

from __future__ import annotations

import bisect
import errno
import json
import os
import stat
import warnings
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import IO, Any

from pydantic import ValidationError

from gradwatch.errors import ReportError
from gradwatch.result import CheckResult
from gradwatch.store.alerts import alert_for, ratio_sort_key
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


NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
"""Never follow a planted symlink: gradwatch reads and writes its own files only."""

MAX_LINE_BYTES = 64 << 20
"""The longest ``checks.jsonl`` line read: a check of about 500,000 tensors. Anything
longer is not a line gradwatch wrote (reading it would only exhaust memory)."""
MAX_SUMMARY_BYTES = 64 << 20
"""The largest ``report.json`` read (schema 2 keeps it at a few KB; schema 1, which held
the whole series, reached about 15 MB at 10,000 checks)."""


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
    directory = _report_directory(report_dir)
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


def _report_directory(report_dir: str | os.PathLike[str]) -> Path:
    """The report directory `report_dir` names, checked to hold ``checks.jsonl``.

    Raises:
        ReportError: the directory is missing, is a file, cannot be read, or holds no
            ``checks.jsonl``.
    """
    directory = _readable_directory(report_dir)
    if not os.path.lexists(directory / CHECKS_FILE):
        found = "only report.json" if os.path.lexists(directory / SUMMARY_FILE) else "neither"
        raise ReportError(
            f"{str(directory)!r} is not a gradwatch report: expected {CHECKS_FILE} and "
            f"{SUMMARY_FILE}, found {found}"
        )
    return directory


def _readable_directory(report_dir: str | os.PathLike[str]) -> Path:
    """`report_dir` (or the directory of the report file it names), listed once.

    Raises:
        ReportError: it is missing, a file, or cannot be listed (permission denied).
    """
    directory = Path(report_dir)
    if directory.name in (CHECKS_FILE, SUMMARY_FILE) and not directory.is_dir():
        directory = directory.parent
    if not directory.exists():
        raise ReportError(
            f"report directory {str(directory)!r} does not exist; expected a directory "
            f"written by gradwatch.GradWatch (with {CHECKS_FILE} and {SUMMARY_FILE})"
        )
    if not directory.is_dir():
        raise ReportError(f"expected a report directory, received the file {str(directory)!r}")
    try:
        with os.scandir(directory):
            pass
    except OSError as error:
        raise ReportError(
            f"cannot read the report directory {str(directory)!r}: "
            f"{error.strerror or error} (expected a directory this user may list and read)"
        ) from None
    return directory


SEARCH_DEPTH = 3
"""How far below a directory `locate_report` looks: ``<output_dir>/gradwatch`` (the HF
Trainer) is 1, ``<root>/lightning_logs/version_0/gradwatch`` (Lightning) is 3."""
_SEARCH_LIMIT = 5000
"""Directories `locate_report` visits at most (a checkpoint tree must not make it slow)."""


def locate_report(path: str | os.PathLike[str]) -> tuple[Path, bool]:
    """The report directory at `path` or, when `path` holds none, the one report below it.

    What a user naturally types is the trainer's directory (the HF Trainer's
    ``output_dir``, Lightning's ``default_root_dir``); the report is a few levels below.

    Returns:
        (the report directory, True when it was found below `path`).

    Raises:
        ReportError: `path` is missing or unreadable, holds no report up to `SEARCH_DEPTH`
            levels below, or holds several (they are listed: name one).
    """
    directory = _readable_directory(path)
    if os.path.lexists(directory / CHECKS_FILE) or os.path.lexists(directory / SUMMARY_FILE):
        return directory, False
    found = _reports_below(directory)
    if len(found) == 1:
        return found[0], True
    if not found:
        raise ReportError(
            f"{str(directory)!r} is not a gradwatch report: expected {CHECKS_FILE} and "
            f"{SUMMARY_FILE}, found neither, nor a report directory up to {SEARCH_DEPTH} "
            "levels below it"
        )
    listed = "; ".join(str(report) for report in found[:10])
    more = f" and {len(found) - 10} more" if len(found) > 10 else ""
    raise ReportError(
        f"{str(directory)!r} holds {len(found)} gradwatch reports, expected one: name the "
        f"one to read: {listed}{more}"
    )


def _reports_below(directory: Path) -> list[Path]:
    """Report directories (holding ``checks.jsonl``) up to `SEARCH_DEPTH` levels below."""
    found: list[Path] = []
    level = [directory]
    visited = 0
    for _ in range(SEARCH_DEPTH):
        below: list[Path] = []
        for parent in level:
            try:
                with os.scandir(parent) as entries:
                    children = sorted(
                        Path(entry.path)
                        for entry in entries
                        if entry.is_dir(follow_symlinks=False) and not entry.name.startswith(".")
                    )
            except OSError:
                continue  # an unreadable corner of the tree is not where the report is
            for child in children:
                visited += 1
                if visited > _SEARCH_LIMIT:
                    return found
                if os.path.lexists(child / CHECKS_FILE):
                    found.append(child)
                else:
                    below.append(child)
        level = below
    return found


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


def _open_report_file(path: Path) -> IO[bytes]:
    """`path` open for reading: a regular file, never through a symlink, never blocking.

    Raises:
        ReportError: `path` is a symlink, a FIFO, a device or unreadable; nothing of
            what it points to is read.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    except OSError as error:
        if error.errno == errno.ELOOP or os.path.islink(path):
            raise ReportError(
                f"{path}: expected a regular file, received a symlink; gradwatch does not "
                "follow links in a report directory (copy the file it points to in its place "
                "to read it)"
            ) from None
        raise ReportError(f"cannot read {path}: {error.strerror or error}") from None
    status = os.fstat(descriptor)
    if not stat.S_ISREG(status.st_mode):
        os.close(descriptor)
        raise ReportError(
            f"{path}: expected a regular file, received {file_kind(status.st_mode)}; a "
            "report directory holds the files gradwatch wrote, nothing else"
        )
    return os.fdopen(descriptor, "rb")


def _scan_checks(path: Path, notes: list[str]) -> Iterator[tuple[int, CheckResult]]:
    """The checks of ``checks.jsonl`` with their line index (0-based), one line at a time."""
    with _open_report_file(path) as file:
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
                    f"{shorten(line.decode('utf-8', 'replace'))!r} ({_first_error(error)})"
                ) from error
            if check.step is not None and not 0 <= check.step < 2**63:
                raise ReportError(  # no training reaches it; the views index steps in int64
                    f"{path}, line {number}: expected a step from 0 to 2**63 - 1, received "
                    f"{shorten(str(check.step))}"
                )
            count += 1
            yield number - 1, check


def read_summary(path: Path) -> ReportSummary:
    with _open_report_file(path) as file:
        data = file.read(MAX_SUMMARY_BYTES + 1)
    if len(data) > MAX_SUMMARY_BYTES:
        raise ReportError(
            f"{path}: expected a gradwatch report summary (a few KB), received a file larger "
            f"than {MAX_SUMMARY_BYTES >> 20} MiB"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ReportError(f"cannot read {path}: {error}") from error
    try:
        document = json.loads(text)
    except RecursionError:
        raise ReportError(
            f"{path}: expected a gradwatch report summary, received JSON nested too deeply "
            "to be one"
        ) from None
    except ValueError:
        document = None
    version = document.get("schema_version") if isinstance(document, dict) else None
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise ReportError(
            f"{path}: expected schema_version <= {SCHEMA_VERSION}, received {version} "
            "(written by a newer gradwatch; upgrade gradwatch to read it)"
        )
    try:
        if version == 1:  # the whole series was kept in report.json; checks.jsonl has it
            return _upgrade_version_1(document)
        return ReportSummary.model_validate_json(text)
    except ValidationError as error:
        line = _error_line(text, error)
        where = f", line {line}" if line else ""
        raise ReportError(
            f"{path}{where}: expected a gradwatch report summary, received invalid content "
            f"({_first_error(error)})"
        ) from error


def _upgrade_version_1(data: Any) -> ReportSummary:
    """A schema 1 ``report.json`` as a `ReportSummary`: ``series`` dropped, counts added."""
    if isinstance(data, dict):
        series = data.pop("series", None)
        data.setdefault("alert_count", len(data.get("alerts") or []))
        data.setdefault("skipped_count", len(data.get("skipped") or []))
        if isinstance(series, list) and series:
            data.setdefault("last", series[-1])
    return ReportSummary.model_validate(data)


def _first_error(error: ValidationError) -> str:
    first = error.errors()[0]
    location = ".".join(str(part) for part in first["loc"])
    return f"{location}: {first['msg']}" if location else str(first["msg"])


def _error_line(text: str, error: ValidationError) -> int | None:
    """The line of a JSON syntax error, when pydantic reports one (``line N column M``)."""
    message = str(error.errors()[0].get("msg", ""))
    marker = " at line "
    if marker in message:
        tail = message.split(marker, 1)[1].split()[0]
        if tail.isdigit():
            return int(tail)
    try:
        json.loads(text)
    except json.JSONDecodeError as decode_error:
        return decode_error.lineno
    return None


def shorten(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def file_kind(mode: int) -> str:
    """What a path that is not a regular file is, for a message: ``"a FIFO"``, ...."""
    for test, kind in (
        (stat.S_ISLNK, "a symlink"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return kind
    return "not a regular file"
