"""The report files of a watch, written so that trouble never reaches training.

docs/design.md#never-kills: writing never raises. A failed write is logged once per kind of
failure (``report_write_failed``), the check stays in memory and is appended, in order,
once writing works again; closing says what stayed unwritten (``report_incomplete``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections import deque
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, ValidationError

from gradwatch.errors import OptionError, ReportError
from gradwatch.options import checked_step
from gradwatch.report import ReportSummary, ReportWriter
from gradwatch.result import CheckResult
from gradwatch.store.models import run_numbers
from gradwatch.watch.events import (
    LOGGER_NAME,
    REPORT_CONTINUED_EVENT,
    REPORT_INCOMPLETE_EVENT,
    REPORT_WRITE_FAILED_EVENT,
    Events,
)
from gradwatch.watch.failed_checks import error_kind, error_text

__all__ = [
    "ReportDir",
    "ReportOutput",
    "ReportedWatch",
    "WatchState",
    "launched_rank",
    "writer_rank",
]

ReportDir = str | os.PathLike[str] | None


class ReportOutput:
    """``checks.jsonl`` and ``report.json`` of one watch, once a directory is open."""

    def __init__(self, events: Events) -> None:
        self._log = events
        self.writer: ReportWriter | None = None
        self.unwritten: deque[CheckResult] = deque()
        """Recorded checks not yet in ``checks.jsonl`` (deferred directory, full disk)."""
        self._write_failures: dict[tuple[str, str], int] = {}
        """Failed report writes by (file name, error kind); each kind is logged once."""

    def open(
        self,
        directory: Path,
        summary: ReportSummary,
        resumed: str | None,
        recorded: list[CheckResult],
    ) -> None:
        """Open ``directory`` (continuing a report there) and write the checks recorded so far.

        Raises:
            ReportError: the directory cannot be written.
        """
        self.writer = ReportWriter(directory, summary)
        run = self.writer.run
        run.resumed = resumed
        if run.run > 0:
            self._log.event(
                logging.INFO,
                REPORT_CONTINUED_EVENT,
                report_dir=str(self.writer.directory),
                run=run.run,
                earlier_checks=run.first_line,
                resumed=run.resumed,
                notes=run.notes,
                detail="the report in this directory is continued: earlier checks kept",
            )
        self.unwritten = deque(recorded)  # checks recorded before the directory was known
        self.write()

    def resumed(self, text: str) -> None:
        """Record in this run's entry that it resumed from a checkpoint."""
        if self.writer is not None and not self.writer.closed:
            self.writer.run.resumed = text
            self.flush_summary()

    def add(self, result: CheckResult) -> None:
        """Append a recorded check (after any still unwritten) and replace ``report.json``."""
        if self.writer is not None:
            self.unwritten.append(result)
            self.write()

    def flush_summary(self) -> None:
        """Replace ``report.json`` (configuration, alerts and skips changed)."""
        if self.writer is not None and not self.writer.closed:
            self._try_write(self.writer.summary_path, self.writer.write_summary)

    def write(self) -> None:
        """Append the checks missing from ``checks.jsonl`` in order; replace ``report.json``."""
        writer = self.writer
        if writer is None or writer.closed:
            return
        self._append_unwritten(writer)
        self._try_write(writer.summary_path, writer.write_summary)

    def close(self) -> None:
        """Finish the report (``report.json`` marked closed). Idempotent; never raises OSError.

        Checks that could not be written earlier get a last try; when the report stays
        incomplete, an error-level ``report_incomplete`` event says what is missing (the
        checks are all in `results`).
        """
        writer = self.writer
        if writer is None:
            return
        self._append_unwritten(writer)
        closed = self._try_write(writer.summary_path, writer.close)
        if self.unwritten or not closed:
            self._log.event(
                logging.ERROR,
                REPORT_INCOMPLETE_EVENT,
                report_dir=str(writer.directory),
                unwritten_checks=len(self.unwritten),
                unwritten_steps=[result.step for result in self.unwritten][:20],
                summary_written=closed,
                failures={f"{name} {kind}": n for (name, kind), n in self._write_failures.items()},
                detail="every check is in watch.results; the files on disk miss what is listed",
            )

    def _append_unwritten(self, writer: ReportWriter) -> None:
        while self.unwritten and not writer.closed:
            oldest = self.unwritten[0]
            if not self._try_write(writer.checks_path, partial(writer.append_line, oldest)):
                return  # keep the order: later checks wait until this one is written
            self.unwritten.popleft()

    def _try_write(self, path: Path, write: Callable[[], None]) -> bool:
        """Run `write`; on failure log ``report_write_failed`` (once per kind) and return False."""
        try:
            write()
        except Exception as error:  # never kills training: docs/design.md#never-kills
            kind = error_kind(error)
            count = self._write_failures.get((path.name, kind), 0)
            self._write_failures[(path.name, kind)] = count + 1
            if count == 0:
                self._log.event(
                    logging.ERROR,
                    REPORT_WRITE_FAILED_EVENT,
                    path=str(path),
                    error=error_text(error),
                    errno=error.errno if isinstance(error, OSError) else None,
                    detail=f"could not write {path.name}; checks go on and are kept in memory "
                    "(watch.results), training goes on; logged once per kind of failure",
                )
            return False
        return True


class WatchState(BaseModel):
    """`GradWatch.state_dict` read back from a checkpoint.

    Attributes:
        version: of this layout.
        report_dir: the directory the run wrote (None: not writing, or deferred).
        checks: checks recorded by the run when the checkpoint was taken.
        last_step: the last checked step by then.
    """

    model_config = ConfigDict(extra="ignore")

    version: int = 1
    report_dir: str | None = None
    checks: int = 0
    last_step: int | None = None

    @classmethod
    def read(cls, state: object) -> WatchState:
        """Validate a saved state (a mapping from a checkpoint).

        Raises:
            OptionError: `state` is not what `GradWatch.state_dict` returns.
        """
        try:
            return cls.model_validate(state)
        except ValidationError as error:
            raise OptionError(
                f"state: expected what GradWatch.state_dict() returns, received {state!r:.200}"
            ) from error


class ReportedWatch:
    """The report side of `gradwatch.GradWatch`: its directory, resume state, context, close.

    Integrations configure it with `set_context` / `note` (what the report should say
    about the run), `open` (a report directory known only at train begin) and
    ``write=False`` (ranks other than 0 write no files).
    """

    def __init__(self, summary: ReportSummary, report_dir: ReportDir, write: bool | None) -> None:
        self._write: bool | None = None if write is None else bool(write)
        """None: decided at the first write, by `writer_rank` (torch.distributed's rank)."""
        self._requested_dir: Path | None = None if report_dir is None else Path(report_dir)
        self._closed = False
        self._results: list[CheckResult] = []
        self._resumed: str | None = None
        self._summary = summary
        self._log = Events(logging.getLogger(LOGGER_NAME), rank=_launched_rank_if_many())
        self._output = ReportOutput(self._log)
        self._open_failed = False

    @property
    def is_writer(self) -> bool:
        """True when this instance writes report files (False on ranks other than 0).

        Unless ``write`` was given, the process group's rank decides once
        ``torch.distributed`` is initialized (``torch.multiprocessing.spawn`` sets no
        ``RANK``), else the launcher's ``RANK``.
        """
        return self._write if self._write is not None else writer_rank() == 0

    @property
    def report_dir(self) -> Path | None:
        """The open report directory, or None while deferred or not writing."""
        writer = self._output.writer
        return None if writer is None else writer.directory

    def _open_at_first_write(self) -> None:
        """Open the requested directory now that a check is to be written (never raises).

        The report opens at the first write, not at construction: by then a process
        started by ``torch.multiprocessing.spawn`` knows its rank. Trouble opening it (a
        writer that took the directory meanwhile) is logged; the checks stay in memory.
        """
        if self._output.writer is not None or self._requested_dir is None or self._closed:
            return
        if not self.is_writer:
            return
        try:
            self.open(self._requested_dir)
        except ReportError as error:  # never dies of its report: docs/design.md#never-kills
            if not self._open_failed:
                self._open_failed = True
                self._log.event(
                    logging.ERROR,
                    REPORT_WRITE_FAILED_EVENT,
                    path=str(self._requested_dir),
                    error=error_text(error),
                    errno=None,
                    detail="could not open the report directory; checks go on and are kept "
                    "in memory (watch.results), training goes on",
                )

    # -- configuration for integrations --------------------------------------------------

    def open(self, report_dir: ReportDir = None, *, write: bool | None = None) -> None:
        """Open the report directory (for integrations that learn it at train begin).

        Checks recorded before are written at once. Calling it again with the directory
        already open is a no-op.

        Args:
            report_dir: the directory; None uses the one given at construction.
            write: override the constructor's `write` (e.g. False on ranks other than 0).

        Raises:
            ReportError: the directory cannot be written, no directory is known, or another
                directory is already open.
        """
        if write is not None:
            if self._output.writer is not None and not write:
                raise ReportError(
                    f"write: expected to be set before the report opens; {self.report_dir} "
                    "is already open"
                )
            self._write = bool(write)
        if self._closed:
            raise ReportError("expected an open GradWatch, received one that is closed")
        directory = Path(report_dir) if report_dir is not None else self._requested_dir
        writer = self._output.writer
        if writer is not None:
            if directory is None or directory.absolute() == writer.directory:
                return
            raise ReportError(
                f"report_dir: {writer.directory} is already open, received another "
                f"directory {str(directory)!r}"
            )
        if not self.is_writer:
            return
        if directory is None:
            raise ReportError(
                "report_dir: expected a directory (given to GradWatch or to open), received None"
            )
        self._requested_dir = directory
        self._output.open(directory, self._summary, self._resumed, self._results)
        self._write = True

    def resume(self, step: int, source: str) -> None:
        """Say that this run resumed training from a checkpoint taken at `step`.

        The report's record of this run (``report.json`` ``runs``, `gradwatch show`)
        says so. Integrations call it on a framework resume; a plain loop may too.
        Whether or not it is called, a run that opens a directory holding a report
        continues it (earlier checks kept).

        Raises:
            OptionError: `step` is not an int >= 0.
        """
        step = checked_step(step)
        self._resumed = f"a checkpoint at step {step} ({source})"
        self._output.resumed(self._resumed)

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue this report, as JSON-able values.

        Framework callbacks save it in their checkpoints (Lightning ``state_dict``,
        transformers' stateful callbacks) and give it back with `WatchState`.

        >>> from gradwatch import GradWatch
        >>> GradWatch(every=5, report_dir=None).state_dict()
        {'version': 1, 'report_dir': None, 'checks': 0, 'last_step': None}
        """
        last = self._results[-1].step if self._results else None
        directory = self.report_dir
        return WatchState(
            report_dir=None if directory is None else str(directory),
            checks=len(self._results),
            last_step=last,
        ).model_dump()

    def set_context(self, **info: Any) -> None:
        """Add run information to ``report.json``'s configuration (``context``).

        Integrations say what they know: ``set_context(framework="transformers",
        integration="gradwatch.integrations.transformers", loss="model output")``.

        Raises:
            OptionError: a value cannot be written as JSON.
        """
        for key, value in info.items():
            try:
                json.dumps(value)
            except (TypeError, ValueError) as error:
                raise OptionError(
                    f"set_context {key}: expected a JSON-serializable value, received "
                    f"{type(value).__name__}"
                ) from error
        self._summary.configuration.context.update(info)
        self._output.flush_summary()

    def note(self, text: str) -> None:
        """Add a sentence to ``report.json``'s ``configuration.notes`` (once).

        For example ``"gradient accumulation: the check covers the last micro-batch"``.
        """
        if not isinstance(text, str) or not text:
            raise OptionError(f"note: expected a non-empty str, received {text!r}")
        if text not in self._summary.configuration.notes:
            self._summary.configuration.notes.append(text)
            self._output.flush_summary()

    # -- one line for the framework's own log, at train begin and end ---------------------

    def begin_line(self) -> str:
        """``gradwatch: checking the gradient every 500 steps; report in DIR``.

        Integrations log it through the framework's logger (never configuring logging);
        a plain loop that wants it prints it.
        """
        every = self._summary.configuration.every
        text = f"gradwatch: checking the gradient every {every} step{'' if every == 1 else 's'}"
        writer = self._output.writer
        where = self.report_dir or self._requested_dir
        if not self.is_writer or where is None:
            return text + "; this process writes no report"
        text += f"; report in {where}"
        if writer is not None:
            run = run_numbers(writer.summary.runs)[-1]
            if run > 1:
                text += f" (run {run} there; gradwatch show reads the latest run)"
        return text

    def end_line(self) -> str:
        """The run's verdict in one line: ``gradwatch: 3 checks, all clean; gradwatch show DIR``."""
        results = self._results
        failed = [result for result in results if result.status == "fail"]
        errors = [result for result in results if result.status == "error"]
        count = f"{len(results)} check{'' if len(results) == 1 else 's'}"
        if not results:
            verdict = "no check was due"
        elif failed:
            verdict = f"{len(failed)} of {count} failed, first at step {failed[0].step}"
        elif errors:
            verdict = f"{len(errors)} of {count} could not run, first at step {errors[0].step}"
        else:
            worst = max(result.ratio for result in results)
            verdict = f"{count}, no alert (ratio at most {worst:.1e})"
        where = self.report_dir
        return f"gradwatch: {verdict}" + ("" if where is None else f"; gradwatch show {where}")

    def _refuse_when_closed(self, step: object) -> None:
        if self._closed:
            raise ReportError(
                f"expected an open GradWatch, received one that is closed (step {step})"
            )

    def close(self) -> None:
        """Finish the report (``report.json`` marked closed). Idempotent; never raises OSError.

        Checks that could not be written earlier get a last try; when the report stays
        incomplete, an error-level ``report_incomplete`` event says what is missing (the
        checks are all in `results`).
        """
        if self._closed:
            return
        self._open_at_first_write()  # a run without a check still leaves its report
        self._closed = True
        if self._open_failed and self._output.writer is None:
            self._log.event(
                logging.ERROR,
                REPORT_INCOMPLETE_EVENT,
                report_dir=str(self._requested_dir),
                unwritten_checks=len(self._results),
                unwritten_steps=[result.step for result in self._results][:20],
                summary_written=False,
                failures={"open": 1},
                detail="the report directory never opened; every check is in watch.results",
            )
        self._output.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def writer_rank() -> int:
    """The rank that decides who writes: torch.distributed's once initialized, else `launched_rank`.

    Looked up in ``sys.modules``: the core never imports torch, and a process that has
    not imported ``torch.distributed`` has no process group.
    """
    distributed = sys.modules.get("torch.distributed")
    rank: int | None = None
    if distributed is not None:
        try:
            if distributed.is_available() and distributed.is_initialized():
                rank = int(distributed.get_rank())
        except (RuntimeError, ValueError):
            rank = None  # a broken process group: the launcher's word decides
    return launched_rank() if rank is None else rank


def launched_rank() -> int:
    """This process's rank as the launcher set it (``RANK``: torchrun, accelerate), else 0."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _launched_rank_if_many() -> int | None:
    """The launched rank when the launcher started more than one process, else None."""
    try:
        many = int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        many = False
    return launched_rank() if many else None
