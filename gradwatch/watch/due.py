"""A due check's plan: what `GradWatch.due` decided, carried to `GradWatch.run_check`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from gradwatch.options import Sample
from gradwatch.watch.budget import BudgetPlan

__all__ = ["DueCheck"]


@dataclass(frozen=True)
class DueCheck:
    """A check due at ``step``, and the options it runs with.

    `GradWatch.due` returns one (None when no check is due); pass it on to
    `GradWatch.run_check` (or `GradWatch.record`). Nothing about the plan stays hidden
    in the watch: the budget's choice travels here.

    Attributes:
        step: the due step (optimizer updates completed before this one).
        options: the keyword arguments of the check function (``eps``, ``sample``,
            ``seed``, ``top_k``, ``warn``, ``threshold`` and, under a `budget`,
            ``localize_evaluations``), read-only.
        budget: what the `budget` decided for this step; None without a budget.
        note: the sentence a reduced check carries in its notes; None when it runs as
            configured.

    Example:
        >>> import gradwatch
        >>> due = gradwatch.GradWatch(every=5, report_dir=None).due(10)
        >>> due.step, due.sample
        (10, 'auto')
    """

    step: int
    options: Mapping[str, Any]
    budget: BudgetPlan | None = None
    note: str | None = field(default=None)

    @classmethod
    def planned(
        cls, step: int, configured: Mapping[str, Any], budget: BudgetPlan | None
    ) -> DueCheck:
        """The check at ``step``: the ``configured`` options, with the budget's choice."""
        options = dict(configured)
        note = None
        if budget is not None:
            options["sample"] = budget.sample
            if budget.localize_evaluations is not None:
                options["localize_evaluations"] = budget.localize_evaluations
            if budget.action == "reduced":
                note = budget.note(configured["sample"])
        return cls(int(step), MappingProxyType(options), budget, note)

    @property
    def sample(self) -> Sample:
        """The ``sample`` this check runs with."""
        sample: Sample = self.options["sample"]
        return sample
