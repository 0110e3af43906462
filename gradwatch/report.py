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

The work is done in private modules, one job each: `gradwatch.store.models` (the
pydantic models and file names), `gradwatch.store.alerts` (`alert_for`),
`gradwatch.store.reader` (`load_report`, hostile-file checks) and
`gradwatch.store.writer` (`ReportWriter`, the lock, fsync, file modes). This module is
their public face.
"""

from __future__ import annotations

from gradwatch.errors import ReportError as ReportError
from gradwatch.store.alerts import TIE as TIE
from gradwatch.store.alerts import alert_for
from gradwatch.store.models import (
    CHECKS_FILE,
    LOCK_FILE,
    MAX_LISTED,
    SCHEMA_VERSION,
    SUMMARY_FILE,
    Alert,
    Environment,
    Report,
    ReportSummary,
    RunConfiguration,
    RunRecord,
    SkippedCheck,
    StepRecord,
)
from gradwatch.store.models import current_environment as current_environment
from gradwatch.store.models import step_record as step_record
from gradwatch.store.reader import MAX_LINE_BYTES as MAX_LINE_BYTES
from gradwatch.store.reader import MAX_SUMMARY_BYTES as MAX_SUMMARY_BYTES
from gradwatch.store.reader import TruncatedReportWarning, load_report
from gradwatch.store.writer import ReportInUseError, ReportWriter

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
