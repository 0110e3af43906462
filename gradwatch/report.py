"""Reports on disk: ``checks.jsonl`` (append-only) and ``report.json`` (atomic summary).

A report directory holds two files:

- ``checks.jsonl``: one `CheckResult` per line, appended, flushed and fsynced after each
  check, so a run killed at any moment leaves every finished check readable.
- ``report.json``: a `ReportSummary` (configuration, environment, the ratio series per step,
  worst components per step, alerts, skipped checks), replaced atomically (temporary file
  + ``os.replace``) after each check and on close.

`load_report` reads both back into a `Report` whose ``.checks`` lists the results in step
order. A truncated last line of ``checks.jsonl`` (a killed run) loads with a
`TruncatedReportWarning`; any other corruption raises `ReportError` naming file and line.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import io
import json
import os
import platform
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gradwatch.errors import ReportError
from gradwatch.result import CheckResult, Component, Mode, Status

__all__ = [
    "CHECKS_FILE",
    "SCHEMA_VERSION",
    "SUMMARY_FILE",
    "Alert",
    "Environment",
    "Report",
    "ReportSummary",
    "ReportWriter",
    "RunConfiguration",
    "SkippedCheck",
    "StepRecord",
    "TruncatedReportWarning",
    "alert_for",
    "load_report",
]

SCHEMA_VERSION = 1
CHECKS_FILE = "checks.jsonl"
SUMMARY_FILE = "report.json"

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


class SkippedCheck(BaseModel):
    """A due check that was skipped to keep checks within the time budget."""

    model_config = _MODEL_CONFIG

    step: int
    reason: str
    share: float
    """Share of wall time spent in checks when the check was skipped."""
    budget: float


class ReportSummary(BaseModel):
    """The content of ``report.json``."""

    model_config = _MODEL_CONFIG

    schema_version: int = SCHEMA_VERSION
    configuration: RunConfiguration
    environment: Environment
    series: list[StepRecord] = []
    alerts: list[Alert] = []
    skipped: list[SkippedCheck] = []
    closed: bool = False
    updated: str = ""


class Report(BaseModel):
    """A run read back from its report directory by `load_report`."""

    model_config = ConfigDict(ser_json_inf_nan="constants")

    directory: Path
    schema_version: int
    configuration: RunConfiguration | None
    environment: Environment | None
    checks: list[CheckResult]
    """Every finished check, in step order (read from ``checks.jsonl``)."""
    alerts: list[Alert]
    skipped: list[SkippedCheck]
    closed: bool
    """False while the run is going on, or when it was killed before `GradWatch.close`."""
    warnings: list[str] = Field(default_factory=list)

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
        names: dict[str, None] = {}
        for check in self.checks:
            names.update(dict.fromkeys(check.tensors))
        return list(names)

    def tensor_series(self) -> dict[str, list[tuple[int, float]]]:
        """Per-tensor ratio series: tensor name -> [(step, ratio), ...] in step order."""
        series: dict[str, list[tuple[int, float]]] = {name: [] for name in self.tensor_names}
        for step, check in zip(self.steps, self.checks, strict=True):
            for name, tensor in check.tensors.items():
                series[name].append((step, tensor.ratio))
        return series

    def check_at(self, step: int) -> CheckResult:
        """The check recorded at `step`.

        Raises:
            ReportError: no check was recorded at that step.
        """
        for check in self.checks:
            if check.step == step:
                return check
        raise ReportError(
            f"no check at step {step} in {self.directory}; expected one of the checked steps "
            f"{_list_steps(self.steps)}"
        )


def alert_for(result: CheckResult) -> Alert | None:
    """The alert a failing check raises, or None when `result` did not fail.

    The alert names the failing tensor with the largest per-tensor ratio (falling back on
    the worst component's tensor) and the worst component.
    """
    if not result.failed:
        return None
    tensor: str | None = None
    tensor_ratio: float | None = None
    failing = {name: t.ratio for name, t in result.tensors.items() if t.status == "fail"}
    if failing:
        tensor = max(failing, key=lambda name: _sort_key(failing[name]))
        tensor_ratio = failing[tensor]
    elif result.worst:
        tensor = result.worst[0].tensor
        tensor_ratio = result.tensors[tensor].ratio if tensor in result.tensors else None
    component = result.worst[0] if result.worst else None
    where = "" if result.step is None else f" at step {result.step}"
    message = (
        f"gradient check failed{where}: ratio {result.ratio:.3g} >= threshold {result.threshold:g}"
    )
    if tensor is not None:
        message += f"; wrong tensor: {tensor}"
        if tensor_ratio is not None:
            message += f" (ratio {tensor_ratio:.3g})"
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
    )


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
    """Writes one run's report directory.

    The directory is created and both files are written when the writer is built, so an
    unwritable directory fails at once rather than at the first due check.

    Raises:
        ReportError: the directory cannot be created or written.
    """

    def __init__(self, directory: str | os.PathLike[str], summary: ReportSummary) -> None:
        self.directory = Path(directory).absolute()
        self.summary = summary
        self._checks: io.FileIO | None = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.write_summary()
            # A new run starts a new report: a previous run's checks are replaced.
            # Unbuffered bytes, so a failed write leaves nothing pending to be cut off.
            self._checks = open(self.checks_path, "wb", buffering=0)  # noqa: SIM115
        except OSError as error:
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
        handle = self._checks
        line = memoryview((result.model_dump_json() + "\n").encode("utf-8"))
        start = handle.seek(0, os.SEEK_END)
        try:
            while line:  # a write near a size limit may write part of the line only
                line = line[handle.write(line) :]
            os.fsync(handle.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(handle.fileno(), start)
                handle.seek(start)
            raise

    def write_summary(self) -> None:
        """Replace ``report.json`` atomically with the current summary.

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
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        _fsync_directory(self.directory)

    def close(self) -> None:
        """Mark the summary closed, write it and close ``checks.jsonl``. Idempotent.

        Raises:
            OSError: ``report.json`` could not be written (the writer is closed anyway).
        """
        if self._checks is None:
            return
        handle, self._checks = self._checks, None
        try:
            handle.close()
        finally:
            self.summary.closed = True
            self.write_summary()


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


def load_report(report_dir: str | os.PathLike[str]) -> Report:
    """Read a report directory written by `GradWatch`.

    Args:
        report_dir: the report directory (or the path of its ``report.json`` or
            ``checks.jsonl``).

    Returns:
        The run, with ``.checks`` in step order and ``.alerts`` for every failing check.

    Raises:
        ReportError: the directory is missing, holds no report, or a file is corrupt
            (the message names the file and line).

    Warns:
        TruncatedReportWarning: the last line of ``checks.jsonl`` is incomplete (the run
            was killed while writing it); every earlier check is loaded.
    """
    directory = Path(report_dir)
    if directory.name in (CHECKS_FILE, SUMMARY_FILE) and directory.is_file():
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
    if not checks_path.exists():
        found = "only report.json" if summary_path.exists() else "neither"
        raise ReportError(
            f"{str(directory)!r} is not a gradwatch report: expected {CHECKS_FILE} and "
            f"{SUMMARY_FILE}, found {found}"
        )
    notes: list[str] = []
    checks = _read_checks(checks_path, notes)
    summary: ReportSummary | None = None
    if summary_path.exists():
        summary = _read_summary(summary_path)
    else:
        notes.append(f"{summary_path} is missing: configuration and environment are unknown")
    for note in notes:
        warnings.warn(note, TruncatedReportWarning, stacklevel=2)
    checks.sort(key=lambda check: -1 if check.step is None else check.step)
    alerts = [alert for alert in map(alert_for, checks) if alert is not None]
    return Report(
        directory=directory.absolute(),
        schema_version=summary.schema_version if summary else SCHEMA_VERSION,
        configuration=summary.configuration if summary else None,
        environment=summary.environment if summary else None,
        checks=checks,
        alerts=alerts,
        skipped=summary.skipped if summary else [],
        closed=summary.closed if summary else False,
        warnings=notes,
    )


def _read_checks(path: Path, notes: list[str]) -> list[CheckResult]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ReportError(f"cannot read {path}: {error}") from error
    lines = text.split("\n")
    # A complete file ends with "\n", so the last piece is empty; anything else there is a
    # line the writer did not finish.
    unfinished = lines.pop()
    checks: list[CheckResult] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            checks.append(CheckResult.model_validate_json(line))
        except ValidationError as error:
            raise ReportError(
                f"{path}, line {number}: expected one CheckResult as JSON, received "
                f"{_shorten(line)!r} ({_first_error(error)})"
            ) from error
    if unfinished.strip():
        try:
            checks.append(CheckResult.model_validate_json(unfinished))
        except ValidationError:
            notes.append(
                f"{path}, line {len(lines) + 1} is truncated (the run was probably killed "
                f"while writing it); loaded the {len(checks)} checks before it"
            )
    return checks


def _read_summary(path: Path) -> ReportSummary:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ReportError(f"cannot read {path}: {error}") from error
    try:
        version = json.loads(text).get("schema_version")
    except (ValueError, AttributeError):
        version = None
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise ReportError(
            f"{path}: expected schema_version <= {SCHEMA_VERSION}, received {version} "
            "(written by a newer gradwatch; upgrade gradwatch to read it)"
        )
    try:
        return ReportSummary.model_validate_json(text)
    except ValidationError as error:
        line = _error_line(text, error)
        where = f", line {line}" if line else ""
        raise ReportError(
            f"{path}{where}: expected a gradwatch report summary, received invalid content "
            f"({_first_error(error)})"
        ) from error


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
