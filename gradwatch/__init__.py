"""gradwatch: two-sided finite-difference gradient checks inside a training loop."""

from gradwatch.errors import (
    GradientCheckError,
    GradwatchError,
    LossError,
    MissingBatchError,
    OptionError,
    ParameterError,
    ReportError,
)
from gradwatch.result import CheckResult, Component, TensorResult

__all__ = [
    "CheckResult",
    "Component",
    "GradientCheckError",
    "GradwatchError",
    "LossError",
    "MissingBatchError",
    "OptionError",
    "ParameterError",
    "ReportError",
    "TensorResult",
]
