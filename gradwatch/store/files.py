"""The files of a report directory, found and opened as a reader meets them.

A report may come from someone else: its directory is found (also a few levels below
the trainer's directory a user types), each file is opened as a regular file only (never
through a symlink, never a FIFO or a device), and ``report.json`` is read up to a size
limit and parsed, every corruption a `ReportError` naming file and line.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import IO, Any

from pydantic import ValidationError

from gradwatch.errors import ReportError
from gradwatch.store.models import CHECKS_FILE, SCHEMA_VERSION, SUMMARY_FILE, ReportSummary

__all__ = [
    "MAX_SUMMARY_BYTES",
    "NOFOLLOW",
    "SEARCH_DEPTH",
    "file_kind",
    "first_error",
    "locate_report",
    "open_report_file",
    "read_summary",
    "readable_directory",
    "report_directory",
    "shorten",
]


NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
"""Never follow a planted symlink: gradwatch reads and writes its own files only."""


MAX_SUMMARY_BYTES = 64 << 20
"""The largest ``report.json`` read (schema 2 keeps it at a few KB; schema 1, which held
the whole series, reached about 15 MB at 10,000 checks)."""


def report_directory(report_dir: str | os.PathLike[str]) -> Path:
    """The report directory `report_dir` names, checked to hold ``checks.jsonl``.

    Raises:
        ReportError: the directory is missing, is a file, cannot be read, or holds no
            ``checks.jsonl``.
    """
    directory = readable_directory(report_dir)
    if not os.path.lexists(directory / CHECKS_FILE):
        found = "only report.json" if os.path.lexists(directory / SUMMARY_FILE) else "neither"
        raise ReportError(
            f"{str(directory)!r} is not a gradwatch report: expected {CHECKS_FILE} and "
            f"{SUMMARY_FILE}, found {found}"
        )
    return directory


def readable_directory(report_dir: str | os.PathLike[str]) -> Path:
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
    directory = readable_directory(path)
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


def open_report_file(path: Path) -> IO[bytes]:
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


def read_summary(path: Path) -> ReportSummary:
    with open_report_file(path) as file:
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
            f"({first_error(error)})"
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


def first_error(error: ValidationError) -> str:
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
