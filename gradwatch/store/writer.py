"""Writing one run's part of a report directory: `ReportWriter`.

``checks.jsonl`` is appended to and fsynced check by check; ``report.json`` is replaced
atomically (temporary file + ``os.replace``) with the permissions of the umask;
``writer.lock`` (``fcntl.flock``) keeps a second writer out. A run that finds a report
continues it: a line a killed run left unfinished is cut off, and a new `RunRecord` marks
the restart.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import stat
import sys
import tempfile
import time
from pathlib import Path

from gradwatch.errors import ReportError
from gradwatch.result import CheckResult
from gradwatch.store.files import NOFOLLOW, file_kind, read_summary, shorten
from gradwatch.store.models import (
    CHECKS_FILE,
    LOCK_FILE,
    MAX_LISTED,
    SUMMARY_FILE,
    ReportSummary,
    RunRecord,
    now,
    step_record,
)

if sys.platform != "win32":
    import fcntl

__all__ = ["ReportInUseError", "ReportWriter", "probe_writable"]


class ReportInUseError(ReportError):
    """Another writer holds the report directory (its ``writer.lock``)."""


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
                self.checks_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | NOFOLLOW, 0o666
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
        self.summary.updated = now()
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


_LOCK_ATTEMPTS = 5
"""Tries to take ``writer.lock`` when it keeps being removed by writers closing meanwhile."""
_BUSY_ATTEMPTS = 20
"""Tries, 10 ms apart, while ``writer.lock`` is held: `probe_writable` holds it shared for
an instant (a rank that has just been built), an open writer holds it for good."""


def probe_writable(directory: str | os.PathLike[str]) -> None:
    """Refuse now a report directory that the first write would fail on, taking no lock.

    The directory is created and a file written and removed in it; ``checks.jsonl`` must
    be a regular file (or none); an open writer's ``writer.lock`` is tested with a shared
    lock let go at once, so ranks built together never refuse each other.

    Raises:
        ReportInUseError: another writer holds the directory.
        ReportError: the directory cannot be created or written, or ``checks.jsonl`` is
            not a regular file.
    """
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
        descriptor, probe = tempfile.mkstemp(dir=path, prefix=".gradwatch-probe.")
        os.close(descriptor)
        os.unlink(probe)
        _prepare_checks(path / CHECKS_FILE, count=False)
        if sys.platform != "win32" and os.path.lexists(path / LOCK_FILE):
            lock = os.open(path / LOCK_FILE, os.O_RDONLY | NOFOLLOW)
            try:
                fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise _in_use(path / LOCK_FILE, _lock_holder(lock)) from None
            finally:
                os.close(lock)
    except ReportError:
        raise
    except OSError as error:
        raise ReportError(
            f"report_dir: expected a writable directory, received {str(directory)!r} "
            f"({error.strerror or error})"
        ) from error


def _in_use(path: Path, holder: str) -> ReportInUseError:
    return ReportInUseError(
        f"report_dir: expected a directory no other run is writing, received "
        f"{str(path.parent)!r}, held by {holder} ({LOCK_FILE}); give this run its "
        "own report_dir, or start it once that run has closed its report"
    )


def _acquire_lock(path: Path) -> int | None:
    """Hold ``writer.lock`` (an exclusive ``flock``) and write who holds it into it.

    Returns:
        The locked descriptor (None where ``fcntl`` does not exist: no lock is taken).

    Raises:
        ReportInUseError: another writer holds it.
    """
    if sys.platform == "win32":  # pragma: no cover - no flock; docs/reports.md says so
        return None
    for _ in range(_LOCK_ATTEMPTS):
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | NOFOLLOW, 0o644)
        try:
            _lock_exclusive(descriptor)
        except BlockingIOError:
            holder = _lock_holder(descriptor)
            os.close(descriptor)
            raise _in_use(path, holder) from None
        except BaseException:
            os.close(descriptor)
            raise
        try:  # the file locked is still the one at `path` (not removed by a closing writer)
            same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(descriptor).st_ino
        except FileNotFoundError:
            same = False
        if same:
            holder_text = json.dumps(
                {"pid": os.getpid(), "host": platform.node(), "started": now()}
            )
            os.ftruncate(descriptor, 0)
            os.write(descriptor, holder_text.encode("utf-8"))
            return descriptor
        os.close(descriptor)
    raise ReportInUseError(
        f"report_dir: could not take {path} in {_LOCK_ATTEMPTS} attempts (other writers keep "
        "opening and closing it); give this run its own report_dir"
    )


def _lock_exclusive(descriptor: int) -> None:
    """``flock`` it exclusively, waiting out a probe's instant shared lock.

    Raises:
        BlockingIOError: another writer holds it.
    """
    for attempt in range(_BUSY_ATTEMPTS):
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if attempt == _BUSY_ATTEMPTS - 1:
                raise
            time.sleep(0.01)


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
    return shorten(cleaned, width)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _prepare_checks(path: Path, *, count: bool = True) -> tuple[int, list[str]]:
    """Count the complete lines of an existing ``checks.jsonl`` and repair its end.

    A run killed mid-write leaves an unfinished last line; it is cut off (or completed
    with its newline when the JSON is whole), so the next append starts a clean line.
    With ``count=False`` only the kind of file is checked.

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
            f"{path}: expected a regular file (or none), received {file_kind(status.st_mode)}; "
            "gradwatch writes its own files only"
        )
    if not count:
        return 0, []
    notes: list[str] = []
    descriptor = os.open(path, os.O_RDWR | NOFOLLOW)
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


def _continue_summary(summary: ReportSummary, path: Path, lines: int, notes: list[str]) -> None:
    """Carry a previous report's runs, alerts and skipped checks into `summary`; add this run."""
    previous: ReportSummary | None = None
    if path.exists():
        try:
            previous = read_summary(path)
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
