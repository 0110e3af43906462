"""The log events of a watch: structured, sent to the stdlib logger ``gradwatch``.

The library configures no logging: when the application configured structlog, its
processors render each event; else the stdlib record carries the event dict.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import structlog

from gradwatch.report import Alert
from gradwatch.result import CheckResult

__all__ = [
    "ALERT_EVENT",
    "CHECK_ERROR_EVENT",
    "CHECK_EVENT",
    "LEVELS",
    "LOGGER_NAME",
    "REPORT_CONTINUED_EVENT",
    "REPORT_INCOMPLETE_EVENT",
    "REPORT_WRITE_FAILED_EVENT",
    "SKIP_EVENT",
    "Events",
]

LOGGER_NAME = "gradwatch"
CHECK_EVENT = "gradient_check"
ALERT_EVENT = "gradient_alert"
SKIP_EVENT = "gradient_check_skipped"
CHECK_ERROR_EVENT = "gradient_check_error"
REPORT_WRITE_FAILED_EVENT = "report_write_failed"
REPORT_INCOMPLETE_EVENT = "report_incomplete"
REPORT_CONTINUED_EVENT = "report_continued"

LEVELS = {"ok": logging.INFO, "warn": logging.WARNING, "nondeterministic": logging.WARNING}
"""Log level of a check event by status (anything else: WARNING)."""


class Events:
    """Structured events sent to the stdlib logger ``gradwatch``; configures nothing.

    When the application configured structlog, its processors render the event. When it
    did not, the event reaches the stdlib logger as ``"gradient_check step=0 ratio=..."``
    with the event dict attached to the record as ``record.gradwatch``.
    """

    def __init__(self, logger: logging.Logger, rank: int | None = None) -> None:
        self.logger = logger
        self.rank = rank
        """The process's rank in a distributed run (every event then says it), else None."""

    def event(self, level: int, name: str, **fields: Any) -> None:
        if not self.logger.isEnabledFor(level):
            return
        if self.rank is not None:
            fields["rank"] = self.rank
        if structlog.is_configured():
            bound = structlog.wrap_logger(self.logger, wrapper_class=structlog.stdlib.BoundLogger)
        else:
            bound = structlog.wrap_logger(
                self.logger,
                processors=[structlog.stdlib.add_log_level, _render_for_stdlib],
                wrapper_class=structlog.stdlib.BoundLogger,
            )
        bound.log(level, name, **fields)

    def check(
        self,
        result: CheckResult,
        exception: BaseException | None,
        on_error: str,
        report_dir: Path | None,
    ) -> None:
        """A recorded check: ``gradient_check``, or ``gradient_check_error`` when it raised."""
        if result.status == "error":
            with_traceback = {} if exception is None else {"exc_info": exception}
            self.event(
                logging.ERROR,
                CHECK_ERROR_EVENT,
                step=result.step,
                status=result.status,
                error=result.error,
                source=result.error_source,
                on_error=on_error,
                seconds=round(result.seconds, 6),
                detail="the check could not run; recorded as an error check"
                + ("" if on_error == "raise" else ", training goes on"),
                report_dir=str(report_dir) if report_dir else None,
                **with_traceback,
            )
            return
        worst = result.worst[0] if result.worst else None
        self.event(
            LEVELS.get(result.status, logging.WARNING),
            CHECK_EVENT,
            step=result.step,
            ratio=result.ratio,
            status=result.status,
            mode=result.mode,
            checked=result.checked,
            size=result.size,
            seconds=round(result.seconds, 6),
            worst=worst.name if worst else None,
            worst_tensor=worst.tensor if worst else None,
        )

    def alert(self, alert: Alert, report_dir: Path | None) -> None:
        """An alert, at error level, whatever ``on_alert`` does with it."""
        logged = {
            "step",
            "ratio",
            "threshold",
            "module",
            "tensor",
            "tensor_ratio",
            "component",
            "rule",
        }
        self.event(
            logging.ERROR,
            ALERT_EVENT,
            **alert.model_dump(include=logged),
            detail=alert.message,
            report_dir=str(report_dir) if report_dir else None,
        )


def _render_for_stdlib(
    logger: object, method: str, event_dict: structlog.typing.EventDict
) -> dict[str, Any]:
    """A plain ``key=value`` message, and the whole event on ``record.gradwatch``.

    An ``exc_info`` field (the exception of a check that raised) goes to the stdlib
    logger as its traceback, not into the message.
    """
    exc_info = event_dict.pop("exc_info", None)
    fields = " ".join(
        f"{key}={_format(value)}"
        for key, value in event_dict.items()
        if key not in ("event", "level", "message")
    )
    rendered = {"msg": f"{event_dict['event']} {fields}", "extra": {"gradwatch": dict(event_dict)}}
    if exc_info is not None:
        rendered["exc_info"] = exc_info
    return rendered


def _format(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, str) and (" " in value or not value):
        return repr(value)
    return str(value)
