"""GradWatch: the framework-neutral callback (schedule, reports, logging, alerts).

A plain training loop calls `GradWatch.after_backward` after backward and before the
update. Framework integrations reuse the same core in three calls::

    due = watch.due(step)                             # schedule (and time budget)
    if due:
        watch.run_check(                              # time, record, log, alert
            due,                                      # the plan: step and options
            lambda: my_check(..., **due.options),
            source="my_integration",
        )

and configure it with `GradWatch.set_context` / `GradWatch.note` (what the report should
say about the run), `GradWatch.open` (a report directory known only at train begin) and
``write=False`` (ranks other than 0 write no files).

A check never kills training (docs/design.md#never-kills): `run_check` records an exception
inside the check as a check with status ``"error"`` and returns (unless
``on_error="raise"``), and reporting trouble (full disk, read-only directory) is logged,
never raised, with every check kept in memory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from gradwatch.engine.finish import finish
from gradwatch.errors import GradientCheckError, NonFiniteError, ProcessGroupError
from gradwatch.options import (
    OnAlert,
    OnError,
    Sample,
    WatchOptions,
    checked_step,
)
from gradwatch.params import GradientSource
from gradwatch.regularization import RegularizationTerm
from gradwatch.report import (
    Alert,
    ReportSummary,
    RunConfiguration,
    SkippedCheck,
    alert_for,
    current_environment,
)
from gradwatch.result import CheckResult
from gradwatch.store.writer import probe_writable
from gradwatch.watch.budget import Budget, BudgetPlan
from gradwatch.watch.due import DueCheck
from gradwatch.watch.events import (
    SKIP_EVENT,
)
from gradwatch.watch.failed_checks import error_result, non_finite_result
from gradwatch.watch.recording import ReportDir, ReportedWatch, WatchState

__all__ = ["BudgetPlan", "DueCheck", "GradWatch", "OnAlert", "OnError", "Sample", "WatchState"]


class GradWatch(ReportedWatch):
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
            writing) at construction, opened at the first check written (see
            docs/runs.md: a new watch on a directory holding a report starts a new run
            there; `resume` continues the last one). None defers the choice to `open`;
            checks recorded before that are kept in memory and written when it opens.
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
            evaluations per tensor), then the ``"auto"`` screen (a module-local torch
            check: fewer blocks); it is skipped (recorded in ``report.skipped``) when even
            the cheapest does not fit, but never more than two due checks in a row: the
            third runs the cheapest check over the allowance (no starvation; its notes say
            so). The cost is estimated from the checks so far (their seconds and loss
            evaluations, or blocks). The first due check, with no estimate yet, runs
            ``"auto"`` when configured, else ``"directional"``, localizing nothing inside
            tensors (``localize_evaluations=0``; one block of a module-local check). Each
            reduced check says so in its ``notes``. A failing check spends more than a
            correct one (it localizes): later checks get only the evaluations the
            allowance leaves for that (``localize_evaluations``). Tensors left
            unlocalized are named in the notes.
        clock: the wall clock the budget reads (seconds); tests inject a fake one.
        write: False makes this instance write no files; it still checks, logs and
            alerts. None (default): only rank 0 writes: the rank of ``torch.distributed``
            once it is initialized (``torch.multiprocessing.spawn`` sets no ``RANK``),
            else the launcher's ``RANK`` (``torchrun``, ``accelerate launch``).

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
        write: bool | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        options = WatchOptions(
            every=every,
            sample=sample,
            eps=eps,
            threshold=threshold,
            warn=warn,
            top_k=top_k,
            seed=seed,
            on_alert=on_alert,
            on_error=on_error,
            budget=budget,
        )
        self.options = options
        """The watch's options, validated (`gradwatch.options.WatchOptions`)."""
        self.every, self.sample, self.eps = options.every, options.sample, options.eps
        self.threshold, self.warn, self.top_k = options.threshold, options.warn, options.top_k
        self.seed, self.on_alert, self.budget = options.seed, options.on_alert, options.budget
        self.on_error: OnError = options.on_error
        self._alerts: list[Alert] = []
        self._skipped: list[SkippedCheck] = []
        self._budget = Budget(self.budget, self.sample, self.top_k)
        self._clock = clock
        self._decision: DueCheck | tuple[int, None] | None = None
        """The last due step's plan (a second `due` call for that step returns it)."""
        self._agree: Callable[[Any], Any] | None = None
        summary = ReportSummary(
            configuration=RunConfiguration(
                **options.recorded(),
                schedule=f"every {self.every} optimizer updates (step % {self.every} == 0, "
                "0-based)",
            ),
            environment=current_environment(),
        )
        super().__init__(summary, report_dir, write)
        if self._requested_dir is not None and self.is_writer:
            # Refused now rather than 500 steps later; opened (and locked) at the first write.
            probe_writable(self._requested_dir)

    # -- state ---------------------------------------------------------------------------

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
        return list(self._budget.plans)

    def __repr__(self) -> str:
        where = (self.report_dir or self._requested_dir) if self.is_writer else "no files"
        return (
            f"GradWatch(every={self.every}, sample={self.sample!r}, "
            f"threshold={self.threshold:g}, report_dir={str(where)!r})"
        )

    def check_options(self) -> dict[str, Any]:
        """The configured options of a check function: eps, sample, seed, top_k, warn, threshold.

        A due check's own options (with a `budget`, the ``sample`` it chose for that step)
        are its `DueCheck`'s ``options``.

        >>> GradWatch(every=5, report_dir=None).check_options()["sample"]
        'auto'
        """
        return self.options.check_options()

    # -- the schedule --------------------------------------------------------------------

    def due(self, step: int) -> DueCheck | None:
        """The check to run at `step` (updates completed before this one), or None.

        Due when ``step % every == 0``. With a `budget`, the due check is sized to the
        allowance (the returned plan's ``options`` hold the chosen ``sample``) or, when
        even the directional check does not fit, skipped (None) and recorded in the
        report once per step. Pass the plan to `run_check`; a second call for the same
        step returns the same plan. ``if watch.due(step):`` reads as before.

        Raises:
            OptionError: `step` is not an int >= 0.
        """
        step = checked_step(step)
        now = self._clock()
        self._budget.start(now)
        if step % self.every:
            return None
        decided = self._decision
        if isinstance(decided, DueCheck) and decided.step == step:
            return decided
        if isinstance(decided, tuple) and decided[0] == step:
            return None
        plan = self._plan(step, now)
        due = None if plan is None else DueCheck.planned(step, self.check_options(), plan)
        self._decision = (step, None) if due is None else due
        return due

    def join(self, rank: int, agree: Callable[[Any], Any]) -> None:
        """Take part in a distributed run as `rank` (the torch integration calls it).

        Every log event then carries ``rank``, and the budget's plan for a due step, which
        depends on this process's clock, is ``agree(plan)``: rank 0's, on every rank, so
        every rank runs (or skips) the same check. Which rank writes is `write`'s business.
        """
        self._log.rank = rank
        self._agree = agree
        if self._write is None and self._output.writer is None:
            self._write = rank == 0

    def _plan(self, step: int, now: float) -> BudgetPlan | None:
        """The check to run at a due step within the budget, or None to skip it."""
        plan, skip = self._budget.plan(step, now)
        if self._agree is not None and self.budget is not None:
            plan, skip = self._agree((plan, skip))
        if skip is None:
            return plan
        self._skipped.append(skip)
        self._summary.add_skipped(skip)
        self._log.event(
            logging.INFO,
            SKIP_EVENT,
            step=step,
            share=skip.share,
            budget=self.budget,
            allowance=plan.allowance,
            estimate=plan.estimate,
        )
        self._output.flush_summary()
        self._budget.charge(self._clock() - now)  # writing the skip is overhead too
        return None

    def _cost_model(self) -> tuple[float, float] | None:
        """(fixed seconds, seconds per loss evaluation): see `Budget.cost_model`."""
        return self._budget.cost_model()

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
        due = self.due(step)
        if due is None:
            return None
        from gradwatch.check import check

        return self.run_check(
            due,
            lambda: check(loss, params, grads, regularization=regularization, **due.options),
            source="gradwatch.check",
        )

    def run_check(
        self, due: DueCheck | int, compute: Callable[[], CheckResult], *, source: str
    ) -> CheckResult:
        """Run one due check, time it and record it; an exception inside becomes a result.

        The seam every caller of a check goes through (`after_backward`, the framework
        integrations): call it with the `DueCheck` that `due` returned, `compute`
        running the check with that plan's ``options``. `compute` is timed with the
        watch's clock (that time is what the `budget` charges) and its result passed to
        `record`. When `compute` raises an ``Exception``, a result with
        ``status="error"`` is recorded instead (``error``: ``"Type: message"`` plus any
        ``add_note`` notes; ``error_source``: `source`; ratio NaN, no tensors or
        components, ``loss_evals=0``), an error-level ``gradient_check_error`` event is
        logged with the traceback, and that result is returned; with
        ``on_error="raise"`` the original exception is raised again after recording.
        `GradientCheckError`, `ProcessGroupError` (a rank of a distributed check died or
        timed out: training cannot go on either), ``KeyboardInterrupt`` and ``SystemExit``
        propagate unrecorded. Restoring the training state is `compute`'s job (as `gradwatch.check`
        restores ``params``).

        Args:
            due: the plan `due` returned; a bare step (an int) runs with the configured
                options (`check_options`).
            compute: runs the check; zero arguments, returns its `CheckResult`.
            source: the part of gradwatch `compute` runs, shown with an error, e.g.
                ``"gradwatch.check"`` or ``"gradwatch.integrations.torch (float64 copy)"``.

        Returns:
            The recorded (stamped) `CheckResult`; status ``"error"`` when `compute` raised.

        Raises:
            GradientCheckError: the check failed and ``on_alert="raise"``.
            Exception: whatever `compute` raised, when ``on_error="raise"``.
            ReportError: the watch is closed (`compute` is not called).
            OptionError: the step is not an int >= 0 (`compute` is not called).

        Example:
            >>> import gradwatch
            >>> def broken_check() -> gradwatch.CheckResult:
            ...     raise RuntimeError("mixed dtype (CPU)")
            >>> watch = gradwatch.GradWatch(every=1, report_dir=None)
            >>> result = watch.run_check(0, broken_check, source="my_integration")
            >>> result.status, result.error, result.error_source
            ('error', 'RuntimeError: mixed dtype (CPU)', 'my_integration')
        """
        due = self._planned(due)
        started = self._clock()
        try:
            result = compute()
        except (GradientCheckError, ProcessGroupError):
            raise
        except NonFiniteError as error:
            # NaN/inf in theta, the gradient or J(theta): the run's own numbers went bad.
            # That is a finding (a failed check and an alert), not a check that broke.
            bad = non_finite_result(error, self._clock() - started, self)
            return self.record(bad, due, seconds=bad.seconds)
        except Exception as error:
            failed = error_result(error, source, self._clock() - started, self)
            recorded = self._record(failed, due, seconds=None, exception=error)
            if self.on_error == "raise":
                raise
            return recorded
        return self.record(result, due, seconds=self._clock() - started)

    def _planned(self, due: DueCheck | int) -> DueCheck:
        """``due`` itself, or for a bare step the check with the configured options."""
        if isinstance(due, DueCheck):
            self._refuse_when_closed(due.step)
            return due
        self._refuse_when_closed(due)
        return DueCheck.planned(checked_step(due), self.check_options(), None)

    def record(
        self, result: CheckResult, due: DueCheck | int, *, seconds: float | None = None
    ) -> CheckResult:
        """Stamp `step` on `result`, log it, write it to the report and fire the alert.

        The order keeps both promises of docs/design.md#never-kills: the report is written before
        the alert is delivered (so ``on_alert="raise"`` leaves the failing check on
        disk), and writing never raises (trouble is logged as ``report_write_failed``
        once per kind; the check stays in `results` and is appended once writing works
        again), so every alert reaches ``on_alert``.

        Args:
            result: a check's outcome (from `gradwatch.check` or an integration).
            due: the plan it ran (`due`), or the bare step it belongs to.
            seconds: wall time the check cost the training loop, for the `budget`
                (default ``result.seconds``).

        Returns:
            The stamped copy of `result`.

        Raises:
            GradientCheckError: the check failed and ``on_alert="raise"``.
            ReportError: the watch is closed.
        """
        return self._record(result, self._planned(due), seconds=seconds, exception=None)

    def _record(
        self,
        result: CheckResult,
        due: DueCheck,
        *,
        seconds: float | None,
        exception: BaseException | None,
    ) -> CheckResult:
        recording_started = self._clock()
        notes = [] if due.note is None else [due.note]
        stamped = finish(result, notes=notes, step=due.step)
        self._open_at_first_write()  # before the check joins the results it writes
        self._results.append(stamped)
        cost = stamped.seconds if seconds is None else seconds
        self._budget.charge(cost)
        self._budget.learn(stamped.loss_evals, cost)
        # An error or non-finite result says nothing about theta's shape or J's setup.
        if stamped.status != "error" and stamped.non_finite is None:
            self._learn_from(stamped)
        self._log.check(stamped, exception, self.on_error, self.report_dir)
        alert = alert_for(stamped)
        if alert is not None:
            self._alerts.append(alert)
            self._summary.add_alert(alert)
            self._log.alert(alert, self.report_dir)
        self._output.add(stamped)
        # Writing the report is part of what checks cost the training loop.
        self._budget.charge(self._clock() - recording_started)
        if alert is not None:
            self._deliver(stamped, alert)
        return stamped

    def _learn_from(self, result: CheckResult) -> None:
        """Theta's shape for the budget and J's setup for the report configuration."""
        self._budget.learn_shape(result.size, len(result.tensors))
        if result.coverage is not None:  # a module-local check: priced by blocks
            covered = result.coverage
            self._budget.learn_coverage(
                len(covered.modules), covered.per_check, covered.blocks, result.seconds
            )
        configuration = self._summary.configuration
        configuration.eps_policy = result.eps_policy
        configuration.dtype = result.dtype
        for name in result.regularization:
            if name not in configuration.regularization:
                configuration.regularization.append(name)

    def _deliver(self, result: CheckResult, alert: Alert) -> None:
        if self.on_alert == "raise":
            raise GradientCheckError(alert.message, result)
        if callable(self.on_alert):
            self.on_alert(result)
