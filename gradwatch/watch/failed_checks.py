"""The results recorded for checks that could not compare anything.

A check that raised (docs/design.md#never-kills: recorded with status ``"error"``, training
goes on) and a check whose theta, gradient or J(theta) is not finite (a failed check
with an alert: the run's own numbers went bad).
"""

from __future__ import annotations

import errno
import math
from typing import Any, Protocol

from gradwatch.errors import NonFiniteError
from gradwatch.result import CheckResult, TensorResult


class _Options(Protocol):
    """The watch options a recorded result carries."""

    eps: float | None
    warn: float
    threshold: float
    seed: int


__all__ = ["MAX_ERROR_CHARS", "error_kind", "error_result", "error_text", "non_finite_result"]

MAX_ERROR_CHARS = 2000
"""Longest exception text a report keeps: a message quoting a whole tensor would bloat
every report line; the ``gradient_check_error`` log event carries the full traceback."""


def error_result(error: Exception, source: str, seconds: float, options: _Options) -> CheckResult:
    """The result recorded for a check that raised `error` after `seconds`."""
    text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    notes: list[str] = getattr(error, "__notes__", [])  # PEP 678 notes (add_note)
    text = "; ".join([text, *map(str, notes)])
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 3] + "..."
    return _nothing_compared(
        options,
        seconds,
        status="error",
        eps_policy="none: the check did not run",
        error=text,
        error_source=source,
    )


def non_finite_result(error: NonFiniteError, seconds: float, options: _Options) -> CheckResult:
    """The failed check recorded when theta, the gradient or J(theta) is not finite."""
    tensors = {}
    if error.tensor is not None:
        tensors[error.tensor] = TensorResult(
            ratio=math.nan, checked=0, size=error.size, max_abs_error=math.nan, status="fail"
        )
    return _nothing_compared(
        options,
        seconds,
        status="fail",
        tensors=tensors,
        eps_policy="none: nothing to compare",
        loss_evals=0 if error.quantity != "loss" else 1,
        verdict=f"fail: non-finite {error.what}; nothing to compare, no ratio",
        rule="non-finite",
        non_finite=error.what,
    )


def _nothing_compared(options: _Options, seconds: float, **fields: Any) -> CheckResult:
    """A result with no ratio, no components and the watch's options; ``fields`` say why."""
    empty: dict[str, Any] = {
        "ratio": math.nan,
        "tensors": {},
        "worst": [],
        "eps": math.nan if options.eps is None else options.eps,
        "checked": 0,
        "size": 0,
        "loss": math.nan,
        "loss_evals": 0,
        "regularization": {},
    }
    return CheckResult(
        **(empty | fields),
        seconds=seconds,
        warn=options.warn,
        threshold=options.threshold,
        seed=options.seed,
    )


def error_kind(error: Exception) -> str:
    """``"ENOSPC"`` for an OSError with an errno, else the exception's type name."""
    if isinstance(error, OSError) and error.errno is not None:
        return errno.errorcode.get(error.errno, str(error.errno))
    return type(error).__name__


def error_text(error: Exception) -> str:
    """``"ENOSPC: No space left on device"``, or ``"Type: message"``."""
    if isinstance(error, OSError) and error.strerror:
        return f"{error_kind(error)}: {error.strerror}"
    return f"{type(error).__name__}: {error}"
