"""gradwatch: two-sided finite-difference gradient checks inside a training loop."""

from gradwatch.check import check
from gradwatch.errors import (
    GradientCheckError,
    GradwatchError,
    LossError,
    MissingBatchError,
    OptionError,
    ParameterError,
    ReportError,
)
from gradwatch.regularization import L2, Penalty, RegularizationTerm
from gradwatch.result import CheckResult, Component, TensorResult

__all__ = [
    "L2",
    "CheckResult",
    "Component",
    "GradientCheckError",
    "GradwatchError",
    "LossError",
    "MissingBatchError",
    "OptionError",
    "ParameterError",
    "Penalty",
    "RegularizationTerm",
    "ReportError",
    "TensorResult",
    "check",
]
