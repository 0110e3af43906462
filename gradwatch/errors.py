"""The error hierarchy: one root, one subclass per kind of mistake.

Every message names the argument, what was expected and what was received.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gradwatch.result import CheckResult

__all__ = [
    "GradientCheckError",
    "GradwatchError",
    "LossError",
    "MissingBatchError",
    "OptionError",
    "ParameterError",
    "ReportError",
]


class GradwatchError(Exception):
    """Root of every error gradwatch raises on purpose."""


class ParameterError(GradwatchError, ValueError):
    """`params` or `grads` are not what a check needs (keys, shapes, dtype, values)."""


class OptionError(GradwatchError, ValueError):
    """An option is out of range (`eps`, `sample`, `every`, thresholds, ...)."""


class LossError(GradwatchError, ValueError):
    """The loss callable returned something that is not a finite scalar."""


class ReportError(GradwatchError):
    """A report directory is missing, unwritable or corrupt."""


class MissingBatchError(GradwatchError):
    """A framework callback had no batch to recompute the loss on."""


class GradientCheckError(GradwatchError):
    """Raised by `on_alert="raise"`; `.result` is the failing `CheckResult`."""

    def __init__(self, message: str, result: CheckResult) -> None:
        super().__init__(message)
        self.result = result
