"""GradWatch: the framework-neutral callback (schedule, reports, logging, alerts).

A plain training loop calls `GradWatch.after_backward` after backward and before the
update. Framework integrations reuse the same core in three calls::

    if watch.due(step):                               # schedule (and time budget)
        watch.run_check(                              # time, record, log, alert
            step,
            lambda: my_check(..., **watch.check_options()),  # the options for this step
            source="my_integration",
        )

and configure it with `GradWatch.set_context` / `GradWatch.note` (what the report should
say about the run), `GradWatch.open` (a report directory known only at train begin) and
``write=False`` (ranks other than 0 write no files).

A check never kills training (DESIGN.md §10): `GradWatch.run_check` records an exception
inside the check as a check with status ``"error"`` and returns (unless
``on_error="raise"``), and reporting trouble (full disk, read-only directory) is logged,
never raised, with every check kept in memory.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import numpy as np
import numpy.typing as npt
import structlog
from pydantic import BaseModel, ConfigDict, ValidationError

from gradwatch.check import AUTO_FULL_MAX_SIZE, checked_components, planned_evaluations
from gradwatch.errors import GradientCheckError, NonFiniteError, OptionError, ReportError
from gradwatch.params import GradientSource
from gradwatch.regularization import RegularizationTerm
from gradwatch.report import (
    Alert,
    ReportSummary,
    ReportWriter,
    RunConfiguration,
    SkippedCheck,
    alert_for,
    current_environment,
)
from gradwatch.result import CheckResult, TensorResult

__all__ = ["BudgetPlan", "GradWatch", "OnAlert", "OnError", "Sample", "WatchState"]

Sample = int | float | Literal["auto", "directional"] | None
OnAlert = Literal["log", "raise"] | Callable[[CheckResult], object]
OnError = Literal["record", "raise"]
ReportDir = str | os.PathLike[str] | None

LOGGER_NAME = "gradwatch"
CHECK_EVENT = "gradient_check"
ALERT_EVENT = "gradient_alert"
SKIP_EVENT = "gradient_check_skipped"
CHECK_ERROR_EVENT = "gradient_check_error"
REPORT_WRITE_FAILED_EVENT = "report_write_failed"
REPORT_INCOMPLETE_EVENT = "report_incomplete"
REPORT_CONTINUED_EVENT = "report_continued"

MAX_ERROR_CHARS = 2000
"""Longest exception text a report keeps: a message quoting a whole tensor would bloat
every report line; the ``gradient_check_error`` log event carries the full traceback."""

MIN_SAMPLED_SHARE = 0.25
"""A budget-sized component sample is used only when it covers at least this share of
theta; below it the directional check (every entry of every tensor, projected) is the
better detector for the same time."""

COST_HISTORY = 8
"""How many recent checks the cost model (fixed seconds + seconds per loss evaluation) fits."""

_LEVELS = {"ok": logging.INFO, "warn": logging.WARNING, "nondeterministic": logging.WARNING}


class GradWatch:
    """Check the gradient every `every` optimizer updates, report, and alert on bugs.

    Args:
        every: check when ``step % every == 0``, where ``step`` counts the optimizer
            updates completed before this one (0-based), so the first update is checked.
        sample: what `gradwatch.check` takes (None, an int k, a fraction, "directional"),
            plus the default "auto": a full check for small models, cheap detection and
            sampled localization for large ones.
        eps: finite-difference step; None picks it from dtype and scale.
        threshold: a check at or above this ratio fails and raises an alert.
        warn: a check at or above this ratio is flagged "warn" (no alert).
        top_k: how many worst components each check keeps.
        seed: seed of the sampled components.
        report_dir: where ``checks.jsonl`` and ``report.json`` go. Created (and tested for
            writing) at construction. None defers the choice to `open`; checks recorded
            before that are kept in memory and written when it opens.
        on_alert: "log" (an error-level ``gradient_alert`` event), "raise" (raise
            `GradientCheckError` after the check is written and logged), or a callable
            receiving the failing `CheckResult`. The error event is logged in every case.
        on_error: what an exception inside a due check does (a failing kernel, an
            out-of-memory error, a loss that raises, params that do not match grads).
            "record" (default): the check is recorded with status ``"error"`` (step,
            message, the part of gradwatch that raised), an error-level
            ``gradient_check_error`` event is logged, and training goes on. "raise": the
            same, then the original exception is raised again. Bad options still raise
            at construction; `GradientCheckError`, ``KeyboardInterrupt`` and
            ``SystemExit`` always propagate.
        budget: the largest share of training time (in (0, 1]) checks may take; None: no
            limit. The watch keeps an account: the allowance at a due step is ``budget``
            times the training time so far (wall time since the first `due` call, minus
            checks) minus what checks have cost so far, so unused allowance carries over
            and an overspend is repaid by later checks. A due check runs the configured
            `sample` when its estimated cost fits the allowance, else the largest
            cheaper check that fits: a sample of k components sized to the allowance
            (when k covers at least a quarter of theta), then ``"directional"`` (two loss
            evaluations per tensor); it is skipped (recorded in ``report.skipped``) only
            when even the directional check does not fit. The cost is estimated from the
            checks so far (their seconds and loss evaluations). The first due check,
            with no estimate yet, runs ``"directional"`` (or the configured sample when it
            is ``"directional"`` already). Each reduced check says so in its ``notes``.
            A failing check spends more than a correct one (it localizes): later checks
            get only the evaluations the allowance leaves for that
            (``localize_evaluations``); the first, with no training time to take a share
            of yet, stays within ``gradwatch.check.most_evaluations``. Tensors left
            unlocalized are named in the notes.
        clock: the wall clock the budget reads (seconds); tests inject a fake one.
        write: False makes this instance write no files (ranks other than 0); it still
            checks, logs and alerts.

    Raises:
        OptionError: an option is out of range.
        ReportError: `report_dir` cannot be created or written.

    Example:
        >>> import numpy as np, gradwatch
        >>> w = np.array([1.0, -2.0])
        >>> with gradwatch.GradWatch(every=10, report_dir=None) as watch:
        ...     result = watch.after_backward(
        ...         0, loss=lambda: float(np.sum(w**2)), params={"w": w}, grads={"w": 2 * w}
        ...     )
        >>> result.status, result.step
        ('ok', 0)
    """

    def __init__(
        self,
        every: int = 500,
        *,
        sample: Sample = "auto",
        eps: float | None = None,
        threshold: float = 1e-3,
        warn: float = 1e-5,
        top_k: int = 10,
        seed: int = 0,
        report_dir: ReportDir = "gradwatch",
        on_alert: OnAlert = "log",
        on_error: OnError = "record",
        budget: float | None = None,
        write: bool = True,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        _validate(every, sample, eps, threshold, warn, top_k, seed, on_alert, budget)
        if on_error not in ("record", "raise"):
            raise OptionError(f'on_error: expected "record" or "raise", received {on_error!r}')
        self.every = every
        self.sample = sample
        self.eps = eps
        self.threshold = float(threshold)
        self.warn = float(warn)
        self.top_k = top_k
        self.seed = seed
        self.on_alert = on_alert
        self.on_error: OnError = on_error
        self.budget = None if budget is None else float(budget)
        self._write = bool(write)
        self._requested_dir: Path | None = None if report_dir is None else Path(report_dir)
        self._writer: ReportWriter | None = None
        self._closed = False
        self._results: list[CheckResult] = []
        self._alerts: list[Alert] = []
        self._skipped: list[SkippedCheck] = []
        self._resumed: str | None = None
        self._unwritten: deque[CheckResult] = deque()
        """Recorded checks not yet in ``checks.jsonl`` (deferred directory, full disk)."""
        self._write_failures: dict[tuple[str, str], int] = {}
        """Failed report writes by (file name, error kind); each kind is logged once."""
        self._plans: list[BudgetPlan] = []
        self._started: float | None = None
        self._check_seconds = 0.0
        self._clock = clock
        self._decision: tuple[int, BudgetPlan | None] | None = None
        self._pending: BudgetPlan | None = None
        self._costs: list[tuple[int, float]] = []
        """(loss evaluations, seconds) of the recent checks, for the cost model."""
        self._shape: tuple[int, int] | None = None
        """(components, tensors) of theta, learned from the first check."""
        self._log = _StdlibEvents(logging.getLogger(LOGGER_NAME))
        self._summary = ReportSummary(
            configuration=RunConfiguration(
                every=every,
                schedule=f"every {every} optimizer updates (step % {every} == 0, 0-based)",
                sample=sample,
                eps=eps,
                threshold=self.threshold,
                warn=self.warn,
                top_k=top_k,
                seed=seed,
                on_alert=_describe(on_alert),
                on_error=on_error,
                budget=self.budget,
            ),
            environment=current_environment(),
        )
        if self._requested_dir is not None and self._write:
            self.open(self._requested_dir)

    # -- state ---------------------------------------------------------------------------

    @property
    def is_writer(self) -> bool:
        """True when this instance writes report files (False on ranks other than 0)."""
        return self._write

    @property
    def report_dir(self) -> Path | None:
        """The open report directory, or None while deferred or not writing."""
        return None if self._writer is None else self._writer.directory

    @property
    def results(self) -> list[CheckResult]:
        """The checks recorded so far, in recording order."""
        return list(self._results)

    @property
    def alerts(self) -> list[Alert]:
        """The alerts raised so far (by this run; load_report has every run's)."""
        return list(self._alerts)

    @property
    def skipped(self) -> list[SkippedCheck]:
        """The due checks skipped to stay within `budget`."""
        return list(self._skipped)

    @property
    def plans(self) -> list[BudgetPlan]:
        """What the budget decided at each due step (run, reduced or skipped), in order."""
        return list(self._plans)

    def __repr__(self) -> str:
        where = self.report_dir if self._write else "no files (write=False)"
        return (
            f"GradWatch(every={self.every}, sample={self.sample!r}, "
            f"threshold={self.threshold:g}, report_dir={str(where)!r})"
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
            if self._writer is not None and not write:
                raise ReportError(
                    f"write: expected to be set before the report opens; {self._writer.directory} "
                    "is already open"
                )
            self._write = bool(write)
        if self._closed:
            raise ReportError("expected an open GradWatch, received one that is closed")
        directory = Path(report_dir) if report_dir is not None else self._requested_dir
        if self._writer is not None:
            if directory is None or directory.absolute() == self._writer.directory:
                return
            raise ReportError(
                f"report_dir: {self._writer.directory} is already open, received another "
                f"directory {str(directory)!r}"
            )
        if not self._write:
            return
        if directory is None:
            raise ReportError(
                "report_dir: expected a directory (given to GradWatch or to open), received None"
            )
        self._requested_dir = directory
        self._writer = ReportWriter(directory, self._summary)
        run = self._writer.run
        run.resumed = self._resumed
        if run.run > 0:
            self._log.event(
                logging.INFO,
                REPORT_CONTINUED_EVENT,
                report_dir=str(self._writer.directory),
                run=run.run,
                earlier_checks=run.first_line,
                resumed=run.resumed,
                notes=run.notes,
                detail="the report in this directory is continued: earlier checks kept",
            )
        self._unwritten = deque(self._results)  # checks recorded before the directory was known
        self._write_report()

    def resume(self, step: int, source: str) -> None:
        """Say that this run resumed training from a checkpoint taken at `step`.

        The report's record of this run (``report.json`` ``runs``, `gradwatch show`)
        says so. Integrations call it on a framework resume; a plain loop may too.
        Whether or not it is called, a run that opens a directory holding a report
        continues it (earlier checks kept).

        Raises:
            OptionError: `step` is not an int >= 0.
        """
        step = _checked_step(step)
        self._resumed = f"a checkpoint at step {step} ({source})"
        if self._writer is not None and not self._writer.closed:
            self._writer.run.resumed = self._resumed
            self._flush_summary()

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue this report, as JSON-able values.

        Framework callbacks save it in their checkpoints (Lightning ``state_dict``,
        transformers' stateful callbacks) and give it back with `WatchState`.

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
        self._flush_summary()

    def note(self, text: str) -> None:
        """Add a sentence to ``report.json``'s ``configuration.notes`` (once).

        For example ``"gradient accumulation: the check covers the last micro-batch"``.
        """
        if not isinstance(text, str) or not text:
            raise OptionError(f"note: expected a non-empty str, received {text!r}")
        if text not in self._summary.configuration.notes:
            self._summary.configuration.notes.append(text)
            self._flush_summary()

    def check_options(self) -> dict[str, Any]:
        """The options to pass to a check function: eps, sample, seed, top_k, warn, threshold.

        After `due` returned True with a `budget`, ``sample`` is the one the budget chose
        for that step (see `GradWatch`), until the check is recorded.

        >>> GradWatch(every=5, report_dir=None).check_options()["sample"]
        'auto'
        """
        plan = self._pending
        options: dict[str, Any] = {
            "eps": self.eps,
            "sample": self.sample if plan is None else plan.sample,
            "seed": self.seed,
            "top_k": self.top_k,
            "warn": self.warn,
            "threshold": self.threshold,
        }
        if plan is not None and plan.localize_evaluations is not None:
            options["localize_evaluations"] = plan.localize_evaluations
        return options

    # -- the schedule --------------------------------------------------------------------

    def due(self, step: int) -> bool:
        """True when a check should run at `step` (updates completed before this one).

        Due when ``step % every == 0``. With a `budget`, the due check is sized to the
        allowance (`check_options` then returns the chosen ``sample``) or, when even the
        directional check does not fit, skipped and recorded in the report once per step.

        Raises:
            OptionError: `step` is not an int >= 0.
        """
        step = _checked_step(step)
        now = self._clock()
        if self._started is None:
            self._started = now
        if step % self.every:
            return False
        if self._decision is not None and self._decision[0] == step:
            return self._decision[1] is not None
        plan = self._plan(step, now)
        self._decision = (step, plan)
        self._pending = plan
        return plan is not None

    def _plan(self, step: int, now: float) -> BudgetPlan | None:
        """The check to run at a due step within the budget, or None to skip it."""
        if self.budget is None:
            return BudgetPlan(step=step, sample=self.sample, action="run")
        assert self._started is not None
        training = max(now - self._started - self._check_seconds, 0.0)
        allowance = self.budget * training - self._check_seconds
        model = self._cost_model()
        if model is None or self._shape is None:
            # No estimate yet: the cheapest check that covers every tensor. "auto" is
            # that already (a full check only of models small enough to be cheap).
            cheapest: Sample = "auto" if self.sample == "auto" else "directional"
            plan = BudgetPlan(
                step=step,
                sample=cheapest,
                action="run" if self.sample == cheapest else "reduced",
                allowance=allowance,
                training_seconds=training,
                reason="first check: no cost estimate yet, the cheapest check that covers "
                "every tensor",
            )
            self._plans.append(plan)
            return plan
        fixed, per_evaluation = model
        size, tensors = self._shape

        def cost(sample: Sample) -> float:
            return fixed + per_evaluation * planned_evaluations(sample, size, tensors, self.top_k)

        candidates: list[Sample] = [self.sample]
        components = self.sample is None or not isinstance(self.sample, str)
        if components or (self.sample == "auto" and size <= AUTO_FULL_MAX_SIZE):
            k = _affordable_components(allowance - fixed, per_evaluation, self.top_k)
            if MIN_SAMPLED_SHARE * size <= k < checked_components(self.sample, size, tensors):
                candidates.append(k)
        if self.sample != "directional":
            candidates.append("directional")
        estimates = {_describe_sample(c): cost(c) for c in candidates}
        for candidate in candidates:
            estimate = cost(candidate)
            if estimate <= allowance:
                plan = BudgetPlan(
                    step=step,
                    sample=candidate,
                    action="run" if candidate == self.sample else "reduced",
                    allowance=allowance,
                    estimate=estimate,
                    training_seconds=training,
                    reason=_estimates_text(estimates),
                    localize_evaluations=int((allowance - estimate) / per_evaluation)
                    if per_evaluation > 0
                    else None,
                )
                self._plans.append(plan)
                return plan
        cheapest = candidates[-1]
        elapsed = now - self._started
        share = self._check_seconds / elapsed if elapsed > 0 else math.inf
        plan = BudgetPlan(
            step=step,
            sample=None,
            action="skipped",
            allowance=allowance,
            estimate=cost(cheapest),
            training_seconds=training,
            reason=_estimates_text(estimates),
        )
        self._plans.append(plan)
        skip = SkippedCheck(
            step=step,
            reason=(
                f"even the cheapest check ({_describe_sample(cheapest)}, estimated "
                f"{cost(cheapest):.3g} s) exceeds the allowance {allowance:.3g} s "
                f"(budget {self.budget:.1%} of {training:.3g} s of training, minus "
                f"{self._check_seconds:.3g} s of checks so far)"
            ),
            share=share,
            budget=self.budget,
        )
        self._skipped.append(skip)
        self._summary.add_skipped(skip)
        self._log.event(
            logging.INFO,
            SKIP_EVENT,
            step=step,
            share=share,
            budget=self.budget,
            allowance=allowance,
            estimate=plan.estimate,
        )
        self._flush_summary()
        self._check_seconds += self._clock() - now  # writing the skip is overhead too
        return None

    def _cost_model(self) -> tuple[float, float] | None:
        """(fixed seconds, seconds per loss evaluation) fitted to the recent checks.

        With checks of one size only, the fixed part is 0 and every second is charged
        to the evaluations (the median of the last three checks, so one cold first
        check does not hold back the rest), which over-estimates smaller checks (so
        stays within budget) and is exact for checks of the same size.
        """
        costs = [(e, s) for e, s in self._costs[-COST_HISTORY:] if e > 0]
        if not costs:
            return None
        evaluations = np.array([e for e, _ in costs], dtype=np.float64)
        seconds = np.array([s for _, s in costs], dtype=np.float64)
        if len(set(evaluations.tolist())) >= 2:
            slope, intercept = np.polyfit(evaluations, seconds, 1)
            if slope > 0 and intercept >= 0:
                return float(intercept), float(slope)
        return 0.0, float(np.median(seconds[-3:] / evaluations[-3:]))

    # -- checking and recording ----------------------------------------------------------

    def after_backward(
        self,
        step: int,
        *,
        loss: Callable[[], object],
        params: Mapping[str, npt.NDArray[np.floating]] | npt.NDArray[np.floating],
        grads: Mapping[str, npt.NDArray[np.floating]] | npt.NDArray[np.floating] | GradientSource,
        regularization: Iterable[RegularizationTerm] = (),
    ) -> CheckResult | None:
        """The plain-loop hook: call after backward, before the optimizer update.

        Args:
            step: optimizer updates completed before this one (0-based).
            loss: zero-argument callable returning J at the current `params` (data loss;
                penalties the backward adds go in `regularization`).
            params: the named parameter arrays (perturbed in place and restored).
            grads: the backprop gradient, same keys and shapes (or a `GradientSource`).
            regularization: terms such as ``gradwatch.L2(lambd, m, tensors=[...])``.

        Returns:
            The recorded `CheckResult` (status ``"error"`` when the check raised, see
            `run_check`), or None when no check is due.

        Raises:
            GradientCheckError: the check failed and ``on_alert="raise"``.
            Exception: the check raised and ``on_error="raise"`` (after recording it).
        """
        if not self.due(step):
            return None
        from gradwatch.check import check

        options = self.check_options()
        return self.run_check(
            step,
            lambda: check(loss, params, grads, regularization=regularization, **options),
            source="gradwatch.check",
        )

    def run_check(
        self, step: int, compute: Callable[[], CheckResult], *, source: str
    ) -> CheckResult:
        """Run one due check, time it and record it; an exception inside becomes a result.

        The seam every caller of a check goes through (`after_backward`, the framework
        integrations): call it once `due` returned True for `step`, with `compute`
        running the check (typically with `check_options`). `compute` is timed with the
        watch's clock (that time is what the `budget` charges) and its result passed to
        `record`. When `compute` raises an ``Exception``, a result with
        ``status="error"`` is recorded instead (``error``: ``"Type: message"`` plus any
        ``add_note`` notes; ``error_source``: `source`; ratio NaN, no tensors or
        components, ``loss_evals=0``), an error-level ``gradient_check_error`` event is
        logged with the traceback, and that result is returned; with
        ``on_error="raise"`` the original exception is raised again after recording.
        `GradientCheckError`, ``KeyboardInterrupt`` and ``SystemExit`` propagate
        unrecorded. Restoring the training state is `compute`'s job (as `gradwatch.check`
        restores ``params``).

        Args:
            step: the due step (updates completed before this one).
            compute: runs the check; zero arguments, returns its `CheckResult`.
            source: the part of gradwatch `compute` runs, shown with an error, e.g.
                ``"gradwatch.check"`` or ``"gradwatch.integrations.torch (float64 copy)"``.

        Returns:
            The recorded (stamped) `CheckResult`; status ``"error"`` when `compute` raised.

        Raises:
            GradientCheckError: the check failed and ``on_alert="raise"``.
            Exception: whatever `compute` raised, when ``on_error="raise"``.
            ReportError: the watch is closed (`compute` is not called).
            OptionError: `step` is not an int >= 0 (`compute` is not called).

        Example:
            >>> import gradwatch
            >>> def broken_check() -> gradwatch.CheckResult:
            ...     raise RuntimeError("mixed dtype (CPU)")
            >>> watch = gradwatch.GradWatch(every=1, report_dir=None)
            >>> result = watch.run_check(0, broken_check, source="my_integration")
            >>> result.status, result.error, result.error_source
            ('error', 'RuntimeError: mixed dtype (CPU)', 'my_integration')
        """
        self._refuse_when_closed(step)
        step = _checked_step(step)
        started = self._clock()
        try:
            result = compute()
        except GradientCheckError:
            raise
        except NonFiniteError as error:
            # NaN/inf in theta, the gradient or J(theta): the run's own numbers went bad.
            # That is a finding (a failed check and an alert), not a check that broke.
            bad = _non_finite_result(error, self._clock() - started, self)
            return self.record(bad, step, seconds=bad.seconds)
        except Exception as error:
            failed = _error_result(error, source, self._clock() - started, self)
            recorded = self._record(failed, step, seconds=None, exception=error)
            if self.on_error == "raise":
                raise
            return recorded
        return self.record(result, step, seconds=self._clock() - started)

    def record(
        self, result: CheckResult, step: int, *, seconds: float | None = None
    ) -> CheckResult:
        """Stamp `step` on `result`, log it, write it to the report and fire the alert.

        The order keeps both promises of DESIGN.md §10: the report is written before
        the alert is delivered (so ``on_alert="raise"`` leaves the failing check on
        disk), and writing never raises (trouble is logged as ``report_write_failed``
        once per kind; the check stays in `results` and is appended once writing works
        again), so every alert reaches ``on_alert``.

        Args:
            result: a check's outcome (from `gradwatch.check` or an integration).
            step: the step it belongs to.
            seconds: wall time the check cost the training loop, for the `budget`
                (default ``result.seconds``).

        Returns:
            The stamped copy of `result`.

        Raises:
            GradientCheckError: the check failed and ``on_alert="raise"``.
            ReportError: the watch is closed.
        """
        return self._record(result, step, seconds=seconds, exception=None)

    def _refuse_when_closed(self, step: object) -> None:
        if self._closed:
            raise ReportError(
                f"expected an open GradWatch, received one that is closed (step {step})"
            )

    def _record(
        self,
        result: CheckResult,
        step: int,
        *,
        seconds: float | None,
        exception: BaseException | None,
    ) -> CheckResult:
        self._refuse_when_closed(step)
        step = _checked_step(step)
        recording_started = self._clock()
        update: dict[str, Any] = {"step": int(step)}
        plan = self._pending
        self._pending = None
        if plan is not None and plan.step == step and plan.action == "reduced":
            update["notes"] = [*result.notes, plan.note(self.sample)]
        stamped = result.model_copy(update=update)
        self._results.append(stamped)
        cost = stamped.seconds if seconds is None else seconds
        self._check_seconds += cost
        self._costs.append((stamped.loss_evals, cost))
        # An error or non-finite result says nothing about theta's shape or J's setup.
        if stamped.status != "error" and stamped.non_finite is None:
            self._learn_from(stamped)
        self._log_check(stamped, exception)
        alert = alert_for(stamped)
        if alert is not None:
            self._alerts.append(alert)
            self._summary.add_alert(alert)
            self._log_alert(alert)
        if self._writer is not None:
            self._unwritten.append(stamped)
            self._write_report()
        # Writing the report is part of what checks cost the training loop.
        self._check_seconds += self._clock() - recording_started
        if alert is not None:
            self._deliver(stamped, alert)
        return stamped

    def _learn_from(self, result: CheckResult) -> None:
        """Theta's shape for the budget and J's setup for the report configuration."""
        if self._shape is None or self._shape[0] != result.size:
            self._shape = (result.size, max(len(result.tensors), 1))
        configuration = self._summary.configuration
        configuration.eps_policy = result.eps_policy
        configuration.dtype = result.dtype
        for name in result.regularization:
            if name not in configuration.regularization:
                configuration.regularization.append(name)

    def _log_check(self, result: CheckResult, exception: BaseException | None) -> None:
        if result.status == "error":
            with_traceback = {} if exception is None else {"exc_info": exception}
            self._log.event(
                logging.ERROR,
                CHECK_ERROR_EVENT,
                step=result.step,
                status=result.status,
                error=result.error,
                source=result.error_source,
                on_error=self.on_error,
                seconds=round(result.seconds, 6),
                detail="the check could not run; recorded as an error check"
                + ("" if self.on_error == "raise" else ", training goes on"),
                report_dir=str(self.report_dir) if self.report_dir else None,
                **with_traceback,
            )
            return
        worst = result.worst[0] if result.worst else None
        self._log.event(
            _LEVELS.get(result.status, logging.WARNING),
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

    def _log_alert(self, alert: Alert) -> None:
        self._log.event(
            logging.ERROR,
            ALERT_EVENT,
            step=alert.step,
            ratio=alert.ratio,
            threshold=alert.threshold,
            tensor=alert.tensor,
            tensor_ratio=alert.tensor_ratio,
            component=alert.component,
            rule=alert.rule,
            detail=alert.message,
            report_dir=str(self.report_dir) if self.report_dir else None,
        )

    def _deliver(self, result: CheckResult, alert: Alert) -> None:
        if self.on_alert == "raise":
            raise GradientCheckError(alert.message, result)
        if callable(self.on_alert):
            self.on_alert(result)

    # -- closing -------------------------------------------------------------------------

    def close(self) -> None:
        """Finish the report (``report.json`` marked closed). Idempotent; never raises OSError.

        Checks that could not be written earlier get a last try; when the report stays
        incomplete, an error-level ``report_incomplete`` event says what is missing (the
        checks are all in `results`).
        """
        if self._closed:
            return
        self._closed = True
        writer = self._writer
        if writer is None:
            return
        self._append_unwritten(writer)
        closed = self._try_write(writer.summary_path, writer.close)
        if self._unwritten or not closed:
            self._log.event(
                logging.ERROR,
                REPORT_INCOMPLETE_EVENT,
                report_dir=str(writer.directory),
                unwritten_checks=len(self._unwritten),
                unwritten_steps=[result.step for result in self._unwritten][:20],
                summary_written=closed,
                failures={f"{name} {kind}": n for (name, kind), n in self._write_failures.items()},
                detail="every check is in watch.results; the files on disk miss what is listed",
            )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _flush_summary(self) -> None:
        if self._writer is not None and not self._writer.closed:
            self._try_write(self._writer.summary_path, self._writer.write_summary)

    # -- writing the report (never raises: DESIGN.md §10) ---------------------------------

    def _write_report(self) -> None:
        """Append the checks missing from ``checks.jsonl`` in order; replace ``report.json``."""
        writer = self._writer
        if writer is None or writer.closed:
            return
        self._append_unwritten(writer)
        self._try_write(writer.summary_path, writer.write_summary)

    def _append_unwritten(self, writer: ReportWriter) -> None:
        while self._unwritten and not writer.closed:
            oldest = self._unwritten[0]
            if not self._try_write(writer.checks_path, partial(writer.append_line, oldest)):
                return  # keep the order: later checks wait until this one is written
            self._unwritten.popleft()

    def _try_write(self, path: Path, write: Callable[[], None]) -> bool:
        """Run `write`; on failure log ``report_write_failed`` (once per kind) and return False."""
        try:
            write()
        except Exception as error:  # reporting trouble never kills training (DESIGN.md §10)
            kind = _error_kind(error)
            count = self._write_failures.get((path.name, kind), 0)
            self._write_failures[(path.name, kind)] = count + 1
            if count == 0:
                self._log.event(
                    logging.ERROR,
                    REPORT_WRITE_FAILED_EVENT,
                    path=str(path),
                    error=_error_text(error),
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


@dataclass(frozen=True)
class BudgetPlan:
    """What the `budget` decided for one due step.

    Attributes:
        step: the due step.
        sample: the ``sample`` the check runs with (None with ``action="skipped"`` too).
        action: ``"run"`` (the configured sample), ``"reduced"`` (a cheaper one) or
            ``"skipped"``.
        allowance: seconds the check could take (budget x training time, minus checks).
        estimate: the estimated seconds of the chosen (or cheapest, when skipped) check.
        training_seconds: training time so far (wall time minus checks).
        reason: the estimates the decision compared.
    """

    step: int
    sample: Sample
    action: Literal["run", "reduced", "skipped"]
    allowance: float | None = None
    estimate: float | None = None
    training_seconds: float | None = None
    reason: str = ""
    localize_evaluations: int | None = None
    """Evaluations the allowance leaves for localizing inside failing tensors (a failing
    check spends more than the estimate, which is of a correct model's check)."""

    def note(self, configured: Sample) -> str:
        """The sentence a reduced check carries in its notes."""
        estimate = "" if self.estimate is None else f", estimated {self.estimate:.3g} s"
        allowance = "" if self.allowance is None else f" (allowance {self.allowance:.3g} s)"
        return (
            f"budget: ran sample={_describe_sample(self.sample)} instead of "
            f"{_describe_sample(configured)}{estimate}{allowance}: {self.reason}"
        )


def _describe_sample(sample: Sample) -> str:
    return "None (full)" if sample is None else repr(sample)


def _estimates_text(estimates: dict[str, float]) -> str:
    return "estimated " + ", ".join(f"{name} {sec:.3g} s" for name, sec in estimates.items())


def _affordable_components(seconds: float, per_evaluation: float, top_k: int) -> int:
    """The largest k whose sampled check fits in `seconds` (0 when none does)."""
    if per_evaluation <= 0 or seconds <= 0:
        return 0
    evaluations = seconds / per_evaluation - 2 - 2 * top_k
    return max(int(evaluations // 2), 0)


class _StdlibEvents:
    """Structured events sent to the stdlib logger ``gradwatch``; configures nothing.

    When the application configured structlog, its processors render the event. When it
    did not, the event reaches the stdlib logger as ``"gradient_check step=0 ratio=..."``
    with the event dict attached to the record as ``record.gradwatch``.
    """

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger

    def event(self, level: int, name: str, **fields: Any) -> None:
        if not self.logger.isEnabledFor(level):
            return
        if structlog.is_configured():
            bound = structlog.wrap_logger(self.logger, wrapper_class=structlog.stdlib.BoundLogger)
        else:
            bound = structlog.wrap_logger(
                self.logger,
                processors=[structlog.stdlib.add_log_level, _render_for_stdlib],
                wrapper_class=structlog.stdlib.BoundLogger,
            )
        bound.log(level, name, **fields)


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


def _checked_step(step: object) -> int:
    if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
        raise OptionError(f"step: expected an int >= 0, received {step!r}")
    return int(step)


def _error_result(error: Exception, source: str, seconds: float, watch: GradWatch) -> CheckResult:
    """The result recorded for a check that raised `error` after `seconds`."""
    text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    notes: list[str] = getattr(error, "__notes__", [])  # PEP 678 notes (add_note)
    text = "; ".join([text, *map(str, notes)])
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 3] + "..."
    return CheckResult(
        ratio=math.nan,
        status="error",
        tensors={},
        worst=[],
        eps=math.nan if watch.eps is None else watch.eps,
        eps_policy="none: the check did not run",
        checked=0,
        size=0,
        loss=math.nan,
        loss_evals=0,
        seconds=seconds,
        regularization={},
        warn=watch.warn,
        threshold=watch.threshold,
        seed=watch.seed,
        error=text,
        error_source=source,
    )


def _non_finite_result(error: NonFiniteError, seconds: float, watch: GradWatch) -> CheckResult:
    """The failed check recorded when theta, the gradient or J(theta) is not finite."""
    tensors = {}
    if error.tensor is not None:
        tensors[error.tensor] = TensorResult(
            ratio=math.nan, checked=0, size=error.size, max_abs_error=math.nan, status="fail"
        )
    return CheckResult(
        ratio=math.nan,
        status="fail",
        tensors=tensors,
        worst=[],
        eps=math.nan if watch.eps is None else watch.eps,
        eps_policy="none: nothing to compare",
        checked=0,
        size=0,
        loss=math.nan,
        loss_evals=0 if error.quantity != "loss" else 1,
        seconds=seconds,
        regularization={},
        warn=watch.warn,
        threshold=watch.threshold,
        seed=watch.seed,
        verdict=f"fail: non-finite {error.what}; nothing to compare, no ratio",
        rule="non-finite",
        non_finite=error.what,
    )


def _error_kind(error: Exception) -> str:
    """``"ENOSPC"`` for an OSError with an errno, else the exception's type name."""
    if isinstance(error, OSError) and error.errno is not None:
        return errno.errorcode.get(error.errno, str(error.errno))
    return type(error).__name__


def _error_text(error: Exception) -> str:
    """``"ENOSPC: No space left on device"``, or ``"Type: message"``."""
    if isinstance(error, OSError) and error.strerror:
        return f"{_error_kind(error)}: {error.strerror}"
    return f"{type(error).__name__}: {error}"


def _describe(on_alert: OnAlert) -> str:
    if isinstance(on_alert, str):
        return on_alert
    return f"callable {getattr(on_alert, '__qualname__', type(on_alert).__name__)}"


def _validate(
    every: object,
    sample: object,
    eps: object,
    threshold: object,
    warn: object,
    top_k: object,
    seed: object,
    on_alert: object,
    budget: object,
) -> None:
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise OptionError(f"every: expected an int >= 1 (optimizer updates), received {every!r}")
    _validate_sample(sample)
    if eps is not None and not _positive_number(eps):
        raise OptionError(f"eps: expected None or a finite float > 0, received {eps!r}")
    for name, value in (("threshold", threshold), ("warn", warn)):
        if not _positive_number(value):
            raise OptionError(f"{name}: expected a finite float > 0, received {value!r}")
    if warn > threshold:  # type: ignore[operator]
        raise OptionError(
            f"warn: expected warn <= threshold ({threshold!r}), received warn={warn!r}"
        )
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise OptionError(f"top_k: expected an int >= 0, received {top_k!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise OptionError(f"seed: expected an int, received {seed!r}")
    if not (on_alert in ("log", "raise") or callable(on_alert)):
        raise OptionError(
            f'on_alert: expected "log", "raise" or a callable taking the CheckResult, '
            f"received {on_alert!r}"
        )
    if budget is not None and not (_positive_number(budget) and budget <= 1):  # type: ignore[operator]
        raise OptionError(
            f"budget: expected None or a share of training time in (0, 1], received {budget!r}"
        )


def _validate_sample(sample: object) -> None:
    if sample is None or sample in ("auto", "directional"):
        return
    if isinstance(sample, str):
        raise OptionError(
            'sample: expected None, "auto", "directional", an int >= 1 or a fraction in (0, 1], '
            f"received {sample!r}"
        )
    if isinstance(sample, bool):
        raise OptionError(f"sample: expected an int >= 1 or a fraction, received {sample!r}")
    if isinstance(sample, int):
        if sample < 1:
            raise OptionError(f"sample: expected an int >= 1, received {sample!r}")
        return
    if isinstance(sample, float):
        if not 0 < sample <= 1:
            raise OptionError(f"sample: expected a fraction in (0, 1], received {sample!r}")
        return
    raise OptionError(
        'sample: expected None, "auto", "directional", an int or a float, received '
        f"{type(sample).__name__}"
    )


def _positive_number(value: object) -> bool:
    return (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and math.isfinite(value)
        and value > 0
    )
