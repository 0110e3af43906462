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
    "NonFiniteError",
    "OptionError",
    "ParameterError",
    "PeerCheckError",
    "ProcessGroupError",
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


class NonFiniteError(GradwatchError, ValueError):
    """theta, the gradient or J(theta) holds NaN or inf: the training's own numbers went bad.

    Raised as `ParameterError` or `LossError` too (a direct `gradwatch.check` call is
    refused); a `gradwatch.GradWatch` records it as a failed check with an alert instead
    of an error. ``quantity`` is ``"parameter"``, ``"gradient"`` or ``"loss"``; ``tensor``
    the tensor holding it (None for the loss); ``detail`` says how many entries and the
    first one, e.g. ``"2 of 12 entries, first [0, 3]: nan"``.
    """

    def __init__(
        self, message: str, *, quantity: str, tensor: str | None, detail: str, size: int = 1
    ) -> None:
        super().__init__(message)
        self.quantity = quantity
        self.tensor = tensor
        self.detail = detail
        self.size = size

    @property
    def what(self) -> str:
        """``"gradient in tensor W1 (2 of 12 entries, first [0, 3]: nan)"``."""
        where = f" in tensor {self.tensor}" if self.tensor is not None else ""
        return f"{self.quantity}{where} ({self.detail})"


class NonFiniteParameterError(NonFiniteError, ParameterError):
    """A NaN or inf in theta or in the gradient."""


class NonFiniteLossError(NonFiniteError, LossError):
    """J(theta) is NaN or inf."""


class ReportError(GradwatchError):
    """A report directory is missing, unwritable or corrupt."""


class ProcessGroupError(GradwatchError):
    """A collective of a distributed check failed: a rank died, or the process group timed out.

    The next training step's collectives would fail the same way, so this is raised
    to the training loop, never recorded as a check with status ``"error"``.
    """


class PeerCheckError(GradwatchError, RuntimeError):
    """Another rank's part of a distributed check raised; this rank leaves the check with it.

    The message names the rank and its exception (``"the check raised on rank 1:
    RuntimeError: ..."``); like any exception inside a due check it is recorded as a check
    with status ``"error"`` and training goes on.
    """


class MissingBatchError(GradwatchError):
    """A framework callback had no batch to recompute the loss on."""


class GradientCheckError(GradwatchError):
    """Raised by `on_alert="raise"`; `.result` is the failing `CheckResult`."""

    def __init__(self, message: str, result: CheckResult) -> None:
        super().__init__(message)
        self.result = result
