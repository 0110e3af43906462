"""gradwatch: two-sided finite-difference gradient checks inside a training loop."""

from importlib.metadata import PackageNotFoundError, version

from gradwatch.callback import GradWatch
from gradwatch.check import check
from gradwatch.errors import (
    GradientCheckError,
    GradwatchError,
    LossError,
    MissingBatchError,
    NonFiniteError,
    OptionError,
    ParameterError,
    ProcessGroupError,
    ReportError,
)
from gradwatch.regularization import L2, Penalty, RegularizationTerm
from gradwatch.report import Alert, Report, TruncatedReportWarning, load_report
from gradwatch.result import CheckResult, Component, TensorResult

try:
    __version__ = version("gradwatch")
except PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "0+unknown"

__all__ = [
    "L2",
    "Alert",
    "CheckResult",
    "Component",
    "GradWatch",
    "GradientCheckError",
    "GradwatchError",
    "LossError",
    "MissingBatchError",
    "NonFiniteError",
    "OptionError",
    "ParameterError",
    "Penalty",
    "ProcessGroupError",
    "RegularizationTerm",
    "Report",
    "ReportError",
    "TensorResult",
    "TruncatedReportWarning",
    "__version__",
    "check",
    "load_report",
]
