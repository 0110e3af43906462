"""The models of a report directory: ``report.json`` (`ReportSummary`) and what
`load_report` returns (`Report`), with the file names and the schema version.

Pydantic at the edge, like `CheckResult`: inf and NaN are written as JSON constants.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
from array import array
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from gradwatch.errors import ReportError
from gradwatch.result import CheckResult, Component, Mode, Rule, Status

__all__ = [
    "CHECKS_FILE",
    "LOCK_FILE",
    "MAX_LISTED",
    "SCHEMA_VERSION",
    "SUMMARY_FILE",
    "Alert",
    "Environment",
    "Report",
    "ReportSummary",
    "RunConfiguration",
    "RunRecord",
    "RunSelection",
    "RunSummary",
    "SkippedCheck",
    "StepRecord",
    "TensorColumns",
    "current_environment",
    "now",
    "run_numbers",
    "step_record",
]

SCHEMA_VERSION = 2
"""2: ``report.json`` holds ``runs`` and ``last`` instead of the whole ``series`` (1)."""
CHECKS_FILE = "checks.jsonl"
SUMMARY_FILE = "report.json"
LOCK_FILE = "writer.lock"

MAX_LISTED = 100
"""Alerts and skipped checks ``report.json`` lists (the first ones; counts are complete):
a run full of alerts must not make each rewrite of ``report.json`` longer than the last.
Every alert is derived again from ``checks.jsonl`` by `load_report`."""


# Same policy as CheckResult: inf and NaN are written as JSON constants, never as null.
_MODEL_CONFIG = ConfigDict(ser_json_inf_nan="constants", extra="forbid")


class RunConfiguration(BaseModel):
    """How the run was checked: schedule, check options and extra context."""

    model_config = _MODEL_CONFIG

    every: int
    schedule: str
    sample: str | int | float | None
    eps: float | None
    eps_policy: str | None = None
    dtype: str | None = None
    threshold: float
    warn: float
    top_k: int
    seed: int
    on_alert: str
    on_error: str = "record"
    budget: float | None = None
    regularization: list[str] = []
    context: dict[str, Any] = {}
    notes: list[str] = []


class Environment(BaseModel):
    """Where the run happened: versions, platform and process."""

    model_config = _MODEL_CONFIG

    python: str
    numpy: str
    gradwatch: str
    pydantic: str
    structlog: str
    platform: str
    pid: int
    started: str


class StepRecord(BaseModel):
    """One point of the ratio series: the global and per-tensor ratios at one step."""

    model_config = _MODEL_CONFIG

    step: int
    ratio: float
    status: Status
    mode: Mode
    checked: int
    size: int
    loss: float
    seconds: float
    tensors: dict[str, float]
    """Per-tensor ratio, by tensor name."""
    tensor_status: dict[str, Status]
    worst: list[Component]


class Alert(BaseModel):
    """A check at or above the threshold, with the tensor and component to look at."""

    model_config = _MODEL_CONFIG

    step: int | None
    ratio: float
    threshold: float
    tensor: str | None
    """The failing tensor with the largest per-tensor ratio (else the worst component's)."""
    tensor_ratio: float | None
    component: str | None
    """The worst component's name, e.g. ``W2[0, 3]``."""
    message: str
    rule: Rule | None = None
    """Which rule fired: ``"global"`` (``ratio`` >= ``threshold``), ``"per-tensor"``
    (``tensor_ratio`` >= ``threshold`` while ``ratio`` is below it) or ``"non-finite"``
    (NaN/inf in theta, the gradient or J; ``non_finite`` says which). None in reports
    written before it existed."""
    rule_ratio: float | None = None
    """The number of the rule that fired (``ratio`` or ``tensor_ratio``; None when non-finite)."""
    non_finite: str | None = None
    module: str | None = None
    """Where the bug is: the module the module-local search names (``model.layers.0.mlp.act``),
    parameter-free modules included; None when no search ran or it named none. The tensor
    above is a measurement, far upstream of the bug as often as not."""


class SkippedCheck(BaseModel):
    """A due check that was skipped to keep checks within the time budget."""

    model_config = _MODEL_CONFIG

    step: int
    reason: str
    share: float
    """Share of wall time spent in checks when the check was skipped."""
    budget: float


class RunRecord(BaseModel):
    """One process that wrote to the report: the first run, and each restart or resume."""

    model_config = _MODEL_CONFIG

    run: int
    """0 for the run that created the report, 1 for its first restart, ..."""
    pid: int | None = None
    host: str | None = None
    started: str | None = None
    """None: unknown (a report written before gradwatch kept its runs)."""
    first_line: int
    """Index (0-based) of this run's first line in ``checks.jsonl``: the run wrote the
    lines from here up to the next run's ``first_line``."""
    checks: int = 0
    first_step: int | None = None
    last_step: int | None = None
    resumed: str | None = None
    """What the run said it resumed from, e.g. ``"a checkpoint at step 5 (transformers)"``;
    None when it did not say (a plain loop restarted, or a new run in the directory)."""
    closed: bool = False
    """False while the run goes on, or when it was killed before it closed the report."""
    notes: list[str] = []


RunSelection = int | Literal["latest", "all"]
"""Which run a reader reads: its number (1 = the first), ``"latest"`` or ``"all"``."""


def run_numbers(segments: list[RunRecord]) -> list[int]:
    """The run (1-based) each process that wrote the report belongs to.

    A process that resumed (``resumed`` set: ``resume_from_checkpoint``, ``ckpt_path``,
    ``watch.resume``) continues the run before it; any other starts a new run. See
    docs/runs.md.
    """
    numbers: list[int] = []
    for segment in segments:
        continues = segment.resumed is not None and numbers
        numbers.append(numbers[-1] if continues else (numbers[-1] + 1 if numbers else 1))
    return numbers


class RunSummary(BaseModel):
    """One run of a report, counted over every check it wrote (whichever run is read)."""

    model_config = ConfigDict(ser_json_inf_nan="constants")

    run: int
    """1 for the first run in the directory, 2 for the next fresh start, ..."""
    segments: list[int]
    """The processes (indices into `Report.runs`) that wrote it: a start and its resumes."""
    started: str | None = None
    checks: int = 0
    alerts: int = 0
    errors: int = 0
    first_step: int | None = None
    last_step: int | None = None
    max_ratio: float | None = None
    """The highest ratio of its completed checks (None: none completed)."""
    closed: bool = False

    @property
    def clean(self) -> bool:
        """No alert and no check that could not run."""
        return not self.alerts and not self.errors


class ReportSummary(BaseModel):
    """The content of ``report.json`` (its size does not grow with the number of checks)."""

    model_config = _MODEL_CONFIG

    schema_version: int = SCHEMA_VERSION
    configuration: RunConfiguration
    environment: Environment
    runs: list[RunRecord] = []
    checks: int = 0
    """Lines in ``checks.jsonl`` (every run)."""
    last: StepRecord | None = None
    """The latest check written; the whole series is in ``checks.jsonl``."""
    alerts: list[Alert] = []
    """The first `MAX_LISTED` alerts; ``alert_count`` counts them all."""
    alert_count: int = 0
    skipped: list[SkippedCheck] = []
    """The first `MAX_LISTED` skipped checks; ``skipped_count`` counts them all."""
    skipped_count: int = 0
    closed: bool = False
    updated: str = ""

    def add_alert(self, alert: Alert) -> None:
        """Count `alert`; list it while fewer than `MAX_LISTED` are listed."""
        self.alert_count += 1
        if len(self.alerts) < MAX_LISTED:
            self.alerts.append(alert)

    def add_skipped(self, skipped: SkippedCheck) -> None:
        """Count `skipped`; list it while fewer than `MAX_LISTED` are listed."""
        self.skipped_count += 1
        if len(self.skipped) < MAX_LISTED:
            self.skipped.append(skipped)


class Report(BaseModel):
    """A run read back from its report directory by `load_report`."""

    model_config = ConfigDict(ser_json_inf_nan="constants")

    directory: Path
    schema_version: int
    configuration: RunConfiguration | None
    environment: Environment | None
    checks: list[CheckResult]
    """Every finished check of every run, in step order (read from ``checks.jsonl``); a
    step checked by two runs (a resume from a checkpoint before the last check) appears
    twice, the earlier run's first."""
    check_runs: list[int] = Field(default_factory=list)
    """The process (index into `runs`) that wrote each check of `checks`."""
    runs: list[RunRecord] = Field(default_factory=list)
    """The processes that wrote the report; more than one after a restart or resume."""
    run: int | None = None
    """The run (1-based, see `run_summaries`) whose checks `checks` holds; None: every run's."""
    run_summaries: list[RunSummary] = Field(default_factory=list)
    """Every run of the report (a fresh start and the resumes that continued it), counted
    over all its checks, also those of the runs not read."""
    alerts: list[Alert]
    skipped: list[SkippedCheck]
    closed: bool
    """False while the last run is going on, or when it was killed before `GradWatch.close`."""
    warnings: list[str] = Field(default_factory=list)
    compact: bool = False
    """Read with ``load_report(..., compact=True)``: only the checks a reader opens (the
    worst, the first failing one, the error checks and the steps asked for) keep their
    per-tensor results and components; `tensor_ratios` holds every per-tensor ratio."""
    _columns: dict[str, tuple[npt.NDArray[np.intp], npt.NDArray[np.float64]]] | None = PrivateAttr(
        default=None
    )
    """Compact reports: tensor name -> (positions in `checks`, ratios), in step order."""

    @property
    def steps(self) -> list[int]:
        """The checked steps, in order."""
        return [check.step if check.step is not None else -1 for check in self.checks]

    @property
    def failed(self) -> bool:
        """True when at least one check raised an alert."""
        return bool(self.alerts)

    @property
    def errors(self) -> list[CheckResult]:
        """The checks that could not run (``status="error"``), in step order."""
        return [check for check in self.checks if check.status == "error"]

    @property
    def tensor_names(self) -> list[str]:
        """Every tensor checked on its own in some check (see `TensorColumns`), first seen first."""
        if self._columns is not None:
            return list(self._columns)
        names: dict[str, None] = {}
        for check in self.checks:
            names.update(dict.fromkeys(name for name, t in check.tensors.items() if t.checked))
        return list(names)

    def tensor_ratios(self) -> dict[str, tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]]:
        """Per-tensor ratio series as arrays: tensor name -> (steps, ratios), in step order.

        Measured ratios only: the checks where a tensor was not checked on its own (only
        the all-tensor screen ran) add no point to its series.

        Eight bytes a ratio, also for a compact report (whose checks do not carry them).
        """
        steps = np.asarray(self.steps, dtype=np.int64)
        if self._columns is not None:
            return {name: (steps[at], ratios) for name, (at, ratios) in self._columns.items()}
        columns = TensorColumns()
        for position, check in enumerate(self.checks):
            columns.add(position, check)
        return {name: (steps[at], ratios) for name, (at, ratios) in columns.arrays().items()}

    def tensor_series(self) -> dict[str, list[tuple[int, float]]]:
        """Per-tensor ratio series: tensor name -> [(step, ratio), ...] in step order."""
        return {
            name: list(zip(steps.tolist(), ratios.tolist(), strict=True))
            for name, (steps, ratios) in self.tensor_ratios().items()
        }

    def check_at(self, step: int) -> CheckResult:
        """The check recorded at `step`.

        Raises:
            ReportError: no check was recorded at that step.
        """
        for check in reversed(self.checks):  # the latest run's, when a resume repeated it
            if check.step == step:
                return check
        run = "" if self.run is None else f" (run {self.run}; --run all reads every run)"
        raise ReportError(
            f"no check at step {step} in {self.directory}{run}; expected one of the checked "
            f"steps {_list_steps(self.steps)}"
        )


class TensorColumns:
    """Per-tensor ratios gathered check by check: 8 bytes a ratio, plus 8 for its check.

    Only measured ratios: a tensor not checked on its own (``checked == 0``, e.g. every
    tensor of a check where only the all-tensor screen ran) has no ratio of its own, and
    its row in the views says "screened together" instead of repeating the global one.
    """

    def __init__(self) -> None:
        self._at: dict[str, array[int]] = {}
        self._ratios: dict[str, array[float]] = {}

    def add(self, position: int, check: CheckResult) -> None:
        for name, tensor in check.tensors.items():
            if tensor.ratio is None or not tensor.checked:  # screened together: no own ratio
                continue
            if name not in self._at:
                self._at[name], self._ratios[name] = array("q"), array("d")
            self._at[name].append(position)
            self._ratios[name].append(tensor.ratio)

    def arrays(
        self, order: list[int] | None = None
    ) -> dict[str, tuple[npt.NDArray[np.intp], npt.NDArray[np.float64]]]:
        """name -> (positions, ratios) sorted by position; `order` maps position -> index."""
        rank: npt.NDArray[np.intp] | None = None
        if order is not None:
            rank = np.empty(len(order), dtype=np.intp)
            rank[np.asarray(order, dtype=np.intp)] = np.arange(len(order))
        columns = {}
        for name, at in self._at.items():
            positions = np.frombuffer(at, dtype=np.int64).astype(np.intp)
            ratios = np.frombuffer(self._ratios[name], dtype=np.float64)
            if rank is not None:
                positions = rank[positions]
            by_position = np.argsort(positions, kind="stable")
            columns[name] = (positions[by_position], ratios[by_position].copy())
        return columns


def _list_steps(steps: list[int]) -> str:
    if not steps:
        return "(none: the report has no checks)"
    shown = ", ".join(str(step) for step in steps[:20])
    return f"{shown}{', ...' if len(steps) > 20 else ''} ({len(steps)} checks)"


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def current_environment() -> Environment:
    """Versions, platform and process of the running interpreter."""
    return Environment(
        python=platform.python_version(),
        numpy=np.__version__,
        gradwatch=_version("gradwatch"),
        pydantic=_version("pydantic"),
        structlog=_version("structlog"),
        platform=platform.platform(),
        pid=os.getpid(),
        started=now(),
    )


def now() -> str:
    """The current UTC time, to the second, in ISO 8601."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def step_record(result: CheckResult) -> StepRecord:
    """The ratio-series point of a stamped check."""
    if result.step is None:
        raise ReportError("expected a check stamped with its step, received step=None")
    return StepRecord(
        step=result.step,
        ratio=result.ratio,
        status=result.status,
        mode=result.mode,
        checked=result.checked,
        size=result.size,
        loss=result.loss,
        seconds=result.seconds,
        tensors={
            name: tensor.ratio
            for name, tensor in result.tensors.items()
            if tensor.ratio is not None
        },
        tensor_status={name: tensor.status for name, tensor in result.tensors.items()},
        worst=list(result.worst),
    )
