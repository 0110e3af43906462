"""Reports on disk: ``checks.jsonl`` (append-only) and ``report.json`` (atomic summary).

A report directory holds:

- ``checks.jsonl``: one `CheckResult` per line, appended, flushed and fsynced after each
  check, so a run killed at any moment leaves every finished check readable. It is the
  only place the ratio series lives: `load_report` derives the series from it.
- ``report.json``: a `ReportSummary` of constant size per check (configuration,
  environment, the runs that wrote the report, the latest check, the first alerts and
  skipped checks with their counts), replaced atomically (temporary file +
  ``os.replace``) after each check and on close. Reporting one check therefore costs the
  same at check 10,000 as at check 10.
- ``writer.lock``: held (``fcntl.flock``) by the one writer while it is open, removed
  at close. A second writer on the directory is refused with a `ReportInUseError` naming
  the first (pid, host, start time).

A run that opens a directory holding a report *continues* it: the earlier checks are
kept, a line cut short by a killed run is cut off (or completed), and a new `RunRecord`
in ``report.json`` marks the restart (``runs``), so `load_report` tells which run wrote
each check (``Report.check_runs``).

`load_report` reads both back into a `Report` whose ``.checks`` lists the results in step
order. A truncated last line of ``checks.jsonl`` (a killed run) loads with a
`TruncatedReportWarning`; any other corruption raises `ReportError` naming file and line.
Reports written by schema version 1 (``report.json`` with the whole ``series``) load too.
"""

from __future__ import annotations

import bisect
import contextlib
import datetime as dt
import errno
import importlib.metadata
import json
import os
import platform
import stat
import sys
import tempfile
import warnings
from array import array
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from gradwatch.errors import ReportError
from gradwatch.result import CheckResult, Component, Mode, Rule, Status

if sys.platform != "win32":
    import fcntl

__all__ = [
    "CHECKS_FILE",
    "LOCK_FILE",
    "MAX_LISTED",
    "SCHEMA_VERSION",
    "SUMMARY_FILE",
    "Alert",
    "Environment",
    "Report",
    "ReportInUseError",
    "ReportSummary",
    "ReportWriter",
    "RunConfiguration",
    "RunRecord",
    "SkippedCheck",
    "StepRecord",
    "TruncatedReportWarning",
    "alert_for",
    "load_report",
]

SCHEMA_VERSION = 2
"""2: ``report.json`` holds ``runs`` and ``last`` instead of the whole ``series`` (1)."""
CHECKS_FILE = "checks.jsonl"
SUMMARY_FILE = "report.json"
LOCK_FILE = "writer.lock"

MAX_LISTED = 100
"""Alerts and skipped checks ``report.json`` lists (the first ones; counts are complete):
a run full of alerts must not make each rewrite of ``report.json`` longer than the last.
Every alert is derived again from ``checks.jsonl`` by `load_report`."""


class ReportInUseError(ReportError):
    """Another writer holds the report directory (its ``writer.lock``)."""


# Same policy as CheckResult: inf and NaN are written as JSON constants, never as null.
_MODEL_CONFIG = ConfigDict(ser_json_inf_nan="constants", extra="forbid")


class TruncatedReportWarning(UserWarning):
    """The last line of ``checks.jsonl`` was cut short (the run was killed mid-write)."""


class RunConfiguration(BaseModel):
    """How the run was checked: schedule, check options and extra context."""

    model_config = _MODEL_CONFIG

    every: int
    schedule: str
    sample: str | int | float | None
    eps: float | None
    eps_policy: str | None = None
    dtype: str | None = None
    threshold: float
    warn: float
    top_k: int
    seed: int
    on_alert: str
    on_error: str = "record"
    budget: float | None = None
    regularization: list[str] = []
    context: dict[str, Any] = {}
    notes: list[str] = []


class Environment(BaseModel):
    """Where the run happened: versions, platform and process."""

    model_config = _MODEL_CONFIG

    python: str
    numpy: str
    gradwatch: str
    pydantic: str
    structlog: str
    platform: str
    pid: int
    started: str


class StepRecord(BaseModel):
    """One point of the ratio series: the global and per-tensor ratios at one step."""

    model_config = _MODEL_CONFIG

    step: int
    ratio: float
    status: Status
    mode: Mode
    checked: int
    size: int
    loss: float
    seconds: float
    tensors: dict[str, float]
    """Per-tensor ratio, by tensor name."""
    tensor_status: dict[str, Status]
    worst: list[Component]


class Alert(BaseModel):
    """A check at or above the threshold, with the tensor and component to look at."""

    model_config = _MODEL_CONFIG

    step: int | None
    ratio: float
    threshold: float
    tensor: str | None
    """The failing tensor with the largest per-tensor ratio (else the worst component's)."""
    tensor_ratio: float | None
    component: str | None
    """The worst component's name, e.g. ``W2[0, 3]``."""
    message: str
    rule: Rule | None = None
    """Which rule fired: ``"global"`` (``ratio`` >= ``threshold``), ``"per-tensor"``
    (``tensor_ratio`` >= ``threshold`` while ``ratio`` is below it) or ``"non-finite"``
    (NaN/inf in theta, the gradient or J; ``non_finite`` says which). None in reports
    written before it existed."""
    rule_ratio: float | None = None
    """The number of the rule that fired (``ratio`` or ``tensor_ratio``; None when non-finite)."""
    non_finite: str | None = None


class SkippedCheck(BaseModel):
    """A due check that was skipped to keep checks within the time budget."""

    model_config = _MODEL_CONFIG

    step: int
    reason: str
    share: float
    """Share of wall time spent in checks when the check was skipped."""
    budget: float


class RunRecord(BaseModel):
    """One process that wrote to the report: the first run, and each restart or resume."""

    model_config = _MODEL_CONFIG

    run: int
    """0 for the run that created the report, 1 for its first restart, ..."""
    pid: int | None = None
    host: str | None = None
    started: str | None = None
    """None: unknown (a report written before gradwatch kept its runs)."""
    first_line: int
    """Index (0-based) of this run's first line in ``checks.jsonl``: the run wrote the
    lines from here up to the next run's ``first_line``."""
    checks: int = 0
    first_step: int | None = None
    last_step: int | None = None
    resumed: str | None = None
    """What the run said it resumed from, e.g. ``"a checkpoint at step 5 (transformers)"``;
    None when it did not say (a plain loop restarted, or a new run in the directory)."""
    closed: bool = False
    """False while the run goes on, or when it was killed before it closed the report."""
    notes: list[str] = []


class ReportSummary(BaseModel):
    """The content of ``report.json`` (its size does not grow with the number of checks)."""

    model_config = _MODEL_CONFIG

    schema_version: int = SCHEMA_VERSION
    configuration: RunConfiguration
    environment: Environment
    runs: list[RunRecord] = []
    checks: int = 0
    """Lines in ``checks.jsonl`` (every run)."""
    last: StepRecord | None = None
    """The latest check written; the whole series is in ``checks.jsonl``."""
    alerts: list[Alert] = []
    """The first `MAX_LISTED` alerts; ``alert_count`` counts them all."""
    alert_count: int = 0
    skipped: list[SkippedCheck] = []
    """The first `MAX_LISTED` skipped checks; ``skipped_count`` counts them all."""
    skipped_count: int = 0
    closed: bool = False
    updated: str = ""

    def add_alert(self, alert: Alert) -> None:
        """Count `alert`; list it while fewer than `MAX_LISTED` are listed."""
        self.alert_count += 1
        if len(self.alerts) < MAX_LISTED:
            self.alerts.append(alert)

    def add_skipped(self, skipped: SkippedCheck) -> None:
        """Count `skipped`; list it while fewer than `MAX_LISTED` are listed."""
        self.skipped_count += 1
        if len(self.skipped) < MAX_LISTED:
            self.skipped.append(skipped)


class Report(BaseModel):
    """A run read back from its report directory by `load_report`."""

    model_config = ConfigDict(ser_json_inf_nan="constants")

    directory: Path
    schema_version: int
    configuration: RunConfiguration | None
    environment: Environment | None
    checks: list[CheckResult]
    """Every finished check of every run, in step order (read from ``checks.jsonl``); a
    step checked by two runs (a resume from a checkpoint before the last check) appears
    twice, the earlier run's first."""
    check_runs: list[int] = Field(default_factory=list)
    """The run (index into `runs`) that wrote each check of `checks`."""
    runs: list[RunRecord] = Field(default_factory=list)
    """The processes that wrote the report; more than one after a restart or resume."""
    alerts: list[Alert]
    skipped: list[SkippedCheck]
    closed: bool
    """False while the last run is going on, or when it was killed before `GradWatch.close`."""
    warnings: list[str] = Field(default_factory=list)
    compact: bool = False
    """Read with ``load_report(..., compact=True)``: only the checks a reader opens (the
    worst, the first failing one, the error checks and the steps asked for) keep their
    per-tensor results and components; `tensor_ratios` holds every per-tensor ratio."""
    _columns: dict[str, tuple[npt.NDArray[np.intp], npt.NDArray[np.float64]]] | None = PrivateAttr(
        default=None
    )
    """Compact reports: tensor name -> (positions in `checks`, ratios), in step order."""

    @property
    def steps(self) -> list[int]:
        """The checked steps, in order."""
        return [check.step if check.step is not None else -1 for check in self.checks]

    @property
    def failed(self) -> bool:
        """True when at least one check raised an alert."""
        return bool(self.alerts)

    @property
    def errors(self) -> list[CheckResult]:
        """The checks that could not run (``status="error"``), in step order."""
        return [check for check in self.checks if check.status == "error"]

    @property
    def tensor_names(self) -> list[str]:
        """Every tensor seen in any check, in first-seen order."""
        if self._columns is not None:
            return list(self._columns)
        names: dict[str, None] = {}
        for check in self.checks:
            names.update(dict.fromkeys(check.tensors))
        return list(names)

    def tensor_ratios(self) -> dict[str, tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]]:
        """Per-tensor ratio series as arrays: tensor name -> (steps, ratios), in step order.

        Eight bytes a ratio, also for a compact report (whose checks do not carry them).
        """
        steps = np.asarray(self.steps, dtype=np.int64)
        if self._columns is not None:
            return {name: (steps[at], ratios) for name, (at, ratios) in self._columns.items()}
        columns = _Columns()
        for position, check in enumerate(self.checks):
            columns.add(position, check)
        return {name: (steps[at], ratios) for name, (at, ratios) in columns.arrays().items()}

    def tensor_series(self) -> dict[str, list[tuple[int, float]]]:
        """Per-tensor ratio series: tensor name -> [(step, ratio), ...] in step order."""
        return {
            name: list(zip(steps.tolist(), ratios.tolist(), strict=True))
            for name, (steps, ratios) in self.tensor_ratios().items()
        }

    def check_at(self, step: int) -> CheckResult:
        """The check recorded at `step`.

        Raises:
            ReportError: no check was recorded at that step.
        """
        for check in reversed(self.checks):  # the latest run's, when a resume repeated it
            if check.step == step:
                return check
        raise ReportError(
            f"no check at step {step} in {self.directory}; expected one of the checked steps "
            f"{_list_steps(self.steps)}"
        )


TIE = 0.99
"""Failing tensors within this factor of the largest ratio count as tied in an alert."""


def alert_for(result: CheckResult) -> Alert | None:
    """The alert a failing check raises, or None when `result` did not fail.

    The alert names the failing tensor with the largest per-tensor ratio (among tensors
    tied within ``TIE``, the one holding the worst component; with no failing tensor,
    the worst component's tensor) and the worst component, and says which rule fired
    with that rule's own number: the global ratio, the tensor's ratio (the per-tensor
    rule, when the global ratio is below the threshold), or a non-finite value. When
    backprop passed and the training step's link failed, it names that link, the tensor
    that differs most and what the difference looks like.
    """
    if not result.failed:
        return None
    where = "" if result.step is None else f" at step {result.step}"
    if result.non_finite is not None:
        named = next(iter(result.tensors), None)
        return Alert(
            step=result.step,
            ratio=result.ratio,
            threshold=result.threshold,
            tensor=named,
            tensor_ratio=None,
            component=None,
            message=f"non-finite {result.non_finite}{where}",
            rule="non-finite",
            non_finite=result.non_finite,
        )
    link = result.step_link
    backprop_failed = _sort_key(result.ratio) >= result.threshold or any(
        t.status == "fail" for t in result.tensors.values()
    )
    if link is not None and link.status == "fail" and not backprop_failed:
        worst = link.worst_tensor
        return Alert(
            step=result.step,
            ratio=link.ratio,
            threshold=link.threshold,
            tensor=worst,
            tensor_ratio=link.tensors.get(worst) if worst else None,
            component=None,
            message=(
                f"training step check failed{where}: backprop is right, but the optimizer's "
                f"gradient differs from the gradient of the step's loss (ratio "
                f"{link.ratio:.3g}, threshold {link.threshold:g}"
                + (f"; most in {worst}: {link.tensors[worst]:.3g}" if worst else "")
                + f"): {link.explanation}"
            ),
            rule="step",
            rule_ratio=max(link.ratio, link.tensors.get(worst, 0.0) if worst else 0.0),
        )
    tensor, tensor_ratio = _alert_tensor(result)
    component = result.worst[0] if result.worst else None
    rule: Rule = "global" if _sort_key(result.ratio) >= result.threshold else "per-tensor"
    if rule == "global" or tensor is None or tensor_ratio is None:
        message = (
            f"gradient check failed{where} by the global rule: ratio {result.ratio:.3g} "
            f">= threshold {result.threshold:g}"
        )
        if tensor is not None:
            message += f"; wrong tensor: {tensor}"
            if tensor_ratio is not None:
                message += f" (its ratio {tensor_ratio:.3g})"
        rule_ratio = result.ratio
    else:
        message = (
            f"gradient check failed{where} by the per-tensor rule: tensor {tensor} ratio "
            f"{tensor_ratio:.3g} >= threshold {result.threshold:g} (the global ratio "
            f"{result.ratio:.3g} is below it)"
        )
        rule_ratio = tensor_ratio
    if component is not None:
        message += (
            f"; worst component {component.name}: analytic {component.analytic:.6g}, "
            f"numeric {component.numeric:.6g}"
        )
    return Alert(
        step=result.step,
        ratio=result.ratio,
        threshold=result.threshold,
        tensor=tensor,
        tensor_ratio=tensor_ratio,
        component=component.name if component else None,
        message=message,
        rule=rule,
        rule_ratio=rule_ratio,
    )


def _alert_tensor(result: CheckResult) -> tuple[str | None, float | None]:
    """The tensor an alert names, and its ratio (see `alert_for`)."""
    failing = {name: t.ratio for name, t in result.tensors.items() if t.status == "fail"}
    if failing:
        tensor = max(failing, key=lambda name: _sort_key(failing[name]))
        tied = {name for name, ratio in failing.items() if ratio >= TIE * failing[tensor]}
        if len(tied) > 1 and result.worst and result.worst[0].tensor in tied:
            # Several tensors at about the same ratio (1 when the signs of one direction's
            # derivatives disagree): the worst component, measured entry by entry, decides.
            tensor = result.worst[0].tensor
        return tensor, failing[tensor]
    if result.worst:
        tensor = result.worst[0].tensor
        return tensor, result.tensors[tensor].ratio if tensor in result.tensors else None
    return None, None


def _sort_key(value: float) -> float:
    """Order ratios with NaN treated as the largest (a NaN ratio is the worst news)."""
    return float("inf") if value != value else value


def _list_steps(steps: list[int]) -> str:
    if not steps:
        return "(none: the report has no checks)"
    shown = ", ".join(str(step) for step in steps[:20])
    return f"{shown}{', ...' if len(steps) > 20 else ''} ({len(steps)} checks)"


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def current_environment() -> Environment:
    """Versions, platform and process of the running interpreter."""
    return Environment(
        python=platform.python_version(),
        numpy=np.__version__,
        gradwatch=_version("gradwatch"),
        pydantic=_version("pydantic"),
        structlog=_version("structlog"),
        platform=platform.platform(),
        pid=os.getpid(),
        started=_now(),
    )


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def step_record(result: CheckResult) -> StepRecord:
    """The ratio-series point of a stamped check."""
    if result.step is None:
        raise ReportError("expected a check stamped with its step, received step=None")
    return StepRecord(
        step=result.step,
        ratio=result.ratio,
        status=result.status,
        mode=result.mode,
        checked=result.checked,
        size=result.size,
        loss=result.loss,
        seconds=result.seconds,
        tensors={name: tensor.ratio for name, tensor in result.tensors.items()},
        tensor_status={name: tensor.status for name, tensor in result.tensors.items()},
        worst=list(result.worst),
    )


class ReportWriter:
    """Writes one run's part of a report directory.

    Building it takes the directory's ``writer.lock`` (a second writer is refused),
    continues a report found there (its checks kept, a line a killed run left unfinished
    cut off, a new `RunRecord` in ``summary.runs``) and writes ``report.json``, so an
    unwritable directory fails at once rather than at the first due check.

    Raises:
        ReportInUseError: another writer holds the directory.
        ReportError: the directory cannot be created or written, or ``checks.jsonl`` is
            not a regular file (a symlink, a FIFO, ...).
    """

    def __init__(self, directory: str | os.PathLike[str], summary: ReportSummary) -> None:
        self.directory = Path(directory).absolute()
        self.summary = summary
        self._checks: int | None = None
        self._lock: int | None = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lock = _acquire_lock(self.directory / LOCK_FILE)
            self._file_mode = 0o666 & ~_umask()
            lines, notes = _prepare_checks(self.checks_path)
            # Append, never replace: a restarted run continues the report it finds.
            self._checks = os.open(
                self.checks_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW, 0o666
            )
            _continue_summary(summary, self.summary_path, lines, notes)
            self.write_summary(durable=True)
        except ReportError:
            self._release()
            raise
        except OSError as error:
            self._release()
            raise ReportError(
                f"report_dir: expected a writable directory, received {str(directory)!r} "
                f"({error.strerror or error})"
            ) from error

    @property
    def closed(self) -> bool:
        """True once `close` has run."""
        return self._checks is None

    @property
    def checks_path(self) -> Path:
        """The path of ``checks.jsonl``."""
        return self.directory / CHECKS_FILE

    @property
    def summary_path(self) -> Path:
        """The path of ``report.json``."""
        return self.directory / SUMMARY_FILE

    @property
    def run(self) -> RunRecord:
        """This run's record in ``report.json``."""
        return self.summary.runs[-1]

    def append_line(self, result: CheckResult) -> None:
        """Append one check to ``checks.jsonl``, written and fsynced before returning.

        Raises:
            OSError: the line could not be written (full disk, file-size limit, I/O
                error). The part of it already written is cut off again, so the file
                ends with a complete line and a later append continues it cleanly.
            ReportError: the writer is closed.
        """
        if self._checks is None:
            raise ReportError(f"the report in {self.directory} is closed; cannot record a check")
        descriptor = self._checks
        line = memoryview((result.model_dump_json() + "\n").encode("utf-8"))
        start = os.lseek(descriptor, 0, os.SEEK_END)
        try:
            while line:  # a write near a size limit may write part of the line only
                line = line[os.write(descriptor, line) :]
            os.fsync(descriptor)
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(descriptor, start)
            raise
        self.summary.checks += 1
        run = self.run
        run.checks += 1
        if result.step is not None:
            run.first_step = result.step if run.first_step is None else run.first_step
            run.last_step = result.step
            self.summary.last = step_record(result)

    def write_summary(self, *, durable: bool = False) -> None:
        """Replace ``report.json`` atomically with the current summary.

        Args:
            durable: fsync the file and the directory (at open and close). After a
                check it is only renamed into place: a killed process leaves the old or
                the new summary, and ``checks.jsonl`` (fsynced) is the durable record;
                two fsyncs more would cost a small model about two training steps.

        Raises:
            OSError: it could not be written; the previous ``report.json`` is left as it was.
        """
        self.summary.updated = _now()
        text = self.summary.model_dump_json(indent=2) + "\n"
        target = self.summary_path
        descriptor, temporary = tempfile.mkstemp(
            dir=self.directory, prefix=f".{SUMMARY_FILE}.", suffix=".tmp"
        )
        try:
            os.fchmod(descriptor, self._file_mode)  # readable like checks.jsonl, not 0600
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                if durable:
                    os.fsync(handle.fileno())
            os.replace(temporary, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        if durable:
            _fsync_directory(self.directory)

    def close(self) -> None:
        """Mark this run closed, write the summary, close ``checks.jsonl``, free the lock.

        Idempotent.

        Raises:
            OSError: ``report.json`` could not be written (the writer is closed anyway).
        """
        if self._checks is None:
            return
        descriptor, self._checks = self._checks, None
        try:
            os.close(descriptor)
            self.summary.closed = True
            self.run.closed = True
            self.write_summary(durable=True)
        finally:
            self._release()

    def _release(self) -> None:
        """Remove ``writer.lock`` while holding it, then let go of it."""
        if self._checks is not None:
            with contextlib.suppress(OSError):
                os.close(self._checks)
            self._checks = None
        descriptor, self._lock = self._lock, None
        if descriptor is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.directory / LOCK_FILE)  # a waiting writer sees the inode change
        os.close(descriptor)


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
"""Never follow a planted symlink: the writer writes its own files only."""

_LOCK_ATTEMPTS = 5
"""Tries to take ``writer.lock`` when it keeps being removed by writers closing meanwhile."""


def _acquire_lock(path: Path) -> int | None:
    """Hold ``writer.lock`` (an exclusive ``flock``) and write who holds it into it.

    Returns:
        The locked descriptor (None where ``fcntl`` does not exist: no lock is taken).

    Raises:
        ReportInUseError: another writer holds it.
    """
    if sys.platform == "win32":  # pragma: no cover - no flock; the README says so
        return None
    for _ in range(_LOCK_ATTEMPTS):
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(descriptor)
            os.close(descriptor)
            raise ReportInUseError(
                f"report_dir: expected a directory no other run is writing, received "
                f"{str(path.parent)!r}, held by {holder} ({LOCK_FILE}); give this run its "
                "own report_dir, or start it once that run has closed its report"
            ) from None
        except BaseException:
            os.close(descriptor)
            raise
        try:  # the file locked is still the one at `path` (not removed by a closing writer)
            same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(descriptor).st_ino
        except FileNotFoundError:
            same = False
        if same:
            holder_text = json.dumps(
                {"pid": os.getpid(), "host": platform.node(), "started": _now()}
            )
            os.ftruncate(descriptor, 0)
            os.write(descriptor, holder_text.encode("utf-8"))
            return descriptor
        os.close(descriptor)
    raise ReportInUseError(
        f"report_dir: could not take {path} in {_LOCK_ATTEMPTS} attempts (other writers keep "
        "opening and closing it); give this run its own report_dir"
    )


def _lock_holder(descriptor: int) -> str:
    """``"pid 123 on host node1 (since ...)"`` from a held ``writer.lock``."""
    try:
        holder = json.loads(os.pread(descriptor, 4096, 0).decode("utf-8"))
        pid, host, started = holder["pid"], holder["host"], holder["started"]
    except (OSError, ValueError, KeyError, TypeError):
        return "another writer (pid unknown: it has just started)"
    return f"pid {int(pid)} on host {_printable(str(host))} (since {_printable(str(started))})"


def _printable(text: str, width: int = 80) -> str:
    """`text` without control characters (a hostile file must not drive the terminal)."""
    cleaned = "".join(c if c.isprintable() else "?" for c in text)
    return _shorten(cleaned, width)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _prepare_checks(path: Path) -> tuple[int, list[str]]:
    """Count the complete lines of an existing ``checks.jsonl`` and repair its end.

    A run killed mid-write leaves an unfinished last line; it is cut off (or completed
    with its newline when the JSON is whole), so the next append starts a clean line.

    Returns:
        (complete lines, notes on what was repaired).

    Raises:
        ReportError: the path is not a regular file.
    """
    try:
        status = os.lstat(path)
    except FileNotFoundError:
        return 0, []
    if not stat.S_ISREG(status.st_mode):
        raise ReportError(
            f"{path}: expected a regular file (or none), received {_file_kind(status.st_mode)}; "
            "gradwatch writes its own files only"
        )
    notes: list[str] = []
    descriptor = os.open(path, os.O_RDWR | _NOFOLLOW)
    try:
        lines = offset = line_end = 0
        while chunk := os.read(descriptor, 1 << 20):
            lines += chunk.count(b"\n")
            last = chunk.rfind(b"\n")
            if last >= 0:
                line_end = offset + last + 1
            offset += len(chunk)
        if line_end < offset:
            unfinished = os.pread(descriptor, offset - line_end, line_end)
            try:
                CheckResult.model_validate_json(unfinished)
            except ValueError:
                os.ftruncate(descriptor, line_end)
                notes.append(
                    f"cut off an unfinished last line of {CHECKS_FILE} ({offset - line_end} "
                    "bytes) left by a killed run"
                )
            else:
                os.pwrite(descriptor, b"\n", offset)
                lines += 1
            os.fsync(descriptor)
    finally:
        os.close(descriptor)
    return lines, notes


def _file_kind(mode: int) -> str:
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


def _continue_summary(summary: ReportSummary, path: Path, lines: int, notes: list[str]) -> None:
    """Carry a previous report's runs, alerts and skipped checks into `summary`; add this run."""
    previous: ReportSummary | None = None
    if path.exists():
        try:
            previous = _read_summary(path)
        except ReportError as error:
            notes.append(f"the previous {SUMMARY_FILE} was unreadable and is replaced ({error})")
    runs = [] if previous is None else previous.runs
    if lines and not runs:
        notes.append(f"{lines} earlier checks were found in {CHECKS_FILE} from an unknown run")
        runs = [RunRecord(run=0, first_line=0, checks=lines)]
    if runs and not runs[-1].closed:
        pid = runs[-1].pid
        notes.append(
            f"run {runs[-1].run}{'' if pid is None else f' (pid {pid})'} did not close its "
            "report: it was killed or crashed"
        )
    if previous is not None:
        summary.alerts = [*previous.alerts, *summary.alerts][:MAX_LISTED]
        summary.alert_count += previous.alert_count
        summary.skipped = [*previous.skipped, *summary.skipped][:MAX_LISTED]
        summary.skipped_count += previous.skipped_count
        summary.last = previous.last
    environment = summary.environment
    summary.runs = [
        *runs,
        RunRecord(
            run=len(runs),
            pid=environment.pid,
            host=platform.node(),
            started=environment.started,
            first_line=lines,
            notes=notes,
        ),
    ]
    summary.checks = lines
    summary.closed = False


def _fsync_directory(directory: Path) -> None:
    """Make a rename durable (best effort: not every platform can open a directory)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


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

    Returns:
        The run, with ``.checks`` in step order and ``.alerts`` for every failing check.

    Raises:
        ReportError: the directory is missing, holds no report, a file is not a regular
            file, or a file is corrupt (the message names the file and line).

    Warns:
        TruncatedReportWarning: the last line of ``checks.jsonl`` is incomplete (the run
            was killed while writing it); every earlier check is loaded.
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
    checks_path = directory / CHECKS_FILE
    summary_path = directory / SUMMARY_FILE
    if not os.path.lexists(checks_path):
        found = "only report.json" if os.path.lexists(summary_path) else "neither"
        raise ReportError(
            f"{str(directory)!r} is not a gradwatch report: expected {CHECKS_FILE} and "
            f"{SUMMARY_FILE}, found {found}"
        )
    notes: list[str] = []
    reading = _Reading(compact=compact, keep_steps=keep_steps)
    for line, check in _scan_checks(checks_path, notes):
        reading.add(line, check)
    summary: ReportSummary | None = None
    if os.path.lexists(summary_path):
        summary = _read_summary(summary_path)
    else:
        notes.append(f"{summary_path} is missing: configuration and environment are unknown")
    for note in notes:
        warnings.warn(note, TruncatedReportWarning, stacklevel=2)
    runs = _runs_of(summary, len(reading.entries))
    starts = [run.first_line for run in runs]
    order = sorted(range(len(reading.entries)), key=reading.step_key)  # stable: file order
    checks = [reading.check(index) for index in order]
    check_runs = [
        max(bisect.bisect_right(starts, reading.entries[index][0]) - 1, 0) for index in order
    ]
    _count_checks(runs, checks, check_runs)
    report = Report(
        directory=directory.absolute(),
        schema_version=summary.schema_version if summary else SCHEMA_VERSION,
        configuration=summary.configuration if summary else None,
        environment=summary.environment if summary else None,
        checks=checks,
        check_runs=check_runs,
        runs=runs,
        alerts=[alert for index in order if (alert := reading.entries[index][2]) is not None],
        skipped=summary.skipped if summary else [],
        closed=summary.closed if summary else False,
        warnings=notes,
        compact=compact,
    )
    if compact:
        report._columns = reading.columns.arrays(order)
    return report


class _Columns:
    """Per-tensor ratios gathered check by check: 8 bytes a ratio, plus 8 for its check."""

    def __init__(self) -> None:
        self._at: dict[str, array[int]] = {}
        self._ratios: dict[str, array[float]] = {}

    def add(self, position: int, check: CheckResult) -> None:
        for name, tensor in check.tensors.items():
            if name not in self._at:
                self._at[name], self._ratios[name] = array("q"), array("d")
            self._at[name].append(position)
            self._ratios[name].append(tensor.ratio)

    def arrays(
        self, order: list[int] | None = None
    ) -> dict[str, tuple[npt.NDArray[np.intp], npt.NDArray[np.float64]]]:
        """name -> (positions, ratios) sorted by position; `order` maps position -> index."""
        rank: npt.NDArray[np.intp] | None = None
        if order is not None:
            rank = np.empty(len(order), dtype=np.intp)
            rank[np.asarray(order, dtype=np.intp)] = np.arange(len(order))
        columns = {}
        for name, at in self._at.items():
            positions = np.frombuffer(at, dtype=np.int64).astype(np.intp)
            ratios = np.frombuffer(self._ratios[name], dtype=np.float64)
            if rank is not None:
                positions = rank[positions]
            by_position = np.argsort(positions, kind="stable")
            columns[name] = (positions[by_position], ratios[by_position].copy())
        return columns


class _Reading:
    """What `load_report` keeps of each check while it streams ``checks.jsonl``.

    Every check's alert is derived from the whole check as it is read. A compact reading
    keeps each check without its tensors and components (their ratios go to `columns`),
    except the checks a reader opens: the worst, the first failing one, the error checks
    and the steps asked for, picked as ``worst_check`` and ``next_step`` pick them from
    the checks in step order.
    """

    def __init__(self, *, compact: bool, keep_steps: Collection[int]) -> None:
        self.compact = compact
        self.keep_steps = set(keep_steps)
        self.entries: list[tuple[int, CheckResult, Alert | None]] = []
        """(line, check, its alert) in file order; compact: the check without tensors."""
        self.whole: dict[int, CheckResult] = {}
        """Compact: entry index -> the whole check, for error checks and `keep_steps`."""
        self.columns = _Columns()
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
        index = len(self.entries)
        alert = alert_for(check)
        if not self.compact:
            self.entries.append((line, check, alert))
            return
        self.columns.add(index, check)
        self.entries.append((line, check.model_copy(update={"tensors": {}, "worst": []}), alert))
        step = self.step_key(index)
        if check.status == "error" or check.step in self.keep_steps:
            self.whole[index] = check
        if check.status != "error":
            worst = (_sort_key(check.ratio), -step, -index)
            if self._worst is None or worst > self._worst[0]:
                self._worst = (worst, check)
        if check.status == "fail":
            first = (step, index)
            if self._first_failing is None or first < self._first_failing[0]:
                self._first_failing = (first, check)


def _runs_of(summary: ReportSummary | None, checks: int) -> list[RunRecord]:
    """The runs that wrote the report (one unknown run when ``report.json`` does not say)."""
    if summary is not None and summary.runs:
        return [run.model_copy() for run in summary.runs]
    closed = summary.closed if summary is not None else False
    environment = summary.environment if summary is not None else None
    return [
        RunRecord(
            run=0,
            pid=environment.pid if environment else None,
            started=environment.started if environment else None,
            first_line=0,
            checks=checks,
            closed=closed,
        )
    ]


def _count_checks(runs: list[RunRecord], checks: list[CheckResult], check_runs: list[int]) -> None:
    """Set each run's checks and first/last step from the checks read (report.json may lag)."""
    for run in runs:
        run.checks, run.first_step, run.last_step = 0, None, None
    for check, index in zip(checks, check_runs, strict=True):
        run = runs[index]
        run.checks += 1
        if check.step is not None:
            run.first_step = (
                check.step if run.first_step is None else min(run.first_step, check.step)
            )
            run.last_step = check.step if run.last_step is None else max(run.last_step, check.step)


def _open_report_file(path: Path) -> IO[bytes]:
    """`path` open for reading: a regular file, never through a symlink, never blocking.

    Raises:
        ReportError: `path` is a symlink, a FIFO, a device or unreadable; nothing of
            what it points to is read.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
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
            f"{path}: expected a regular file, received {_file_kind(status.st_mode)}; a "
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
                    f"{_shorten(line.decode('utf-8', 'replace'))!r} ({_first_error(error)})"
                ) from error
            count += 1
            yield number - 1, check


def _read_summary(path: Path) -> ReportSummary:
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


def _shorten(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."
