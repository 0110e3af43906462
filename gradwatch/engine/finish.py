"""Finish a check: what the layers above the core found, added to its result in one place.

The core (`gradwatch.check`) decides backprop's verdict on what it measured. Whatever
the layers above it learn afterwards (the training step's link, notes on J and the
shadow, the penalties' values, the due step) goes through `finish`, the one place a
result changes after the core built it: its status only by `judge_step_link`, its notes
only appended.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from gradwatch.engine.verdict import Verdict, judge_step_link, step_link_note
from gradwatch.result import CheckResult, Localization, StepLink

__all__ = ["finish"]


def finish(
    result: CheckResult,
    *,
    step_link: StepLink | None = None,
    notes: Sequence[str] = (),
    regularization: Mapping[str, float] | None = None,
    step: int | None = None,
    localization: Localization | None = None,
    seconds: float | None = None,
) -> CheckResult:
    """``result`` with the findings of the layers above the core, as one new result.

    Args:
        result: a check's result (the core's, or one finished before).
        step_link: the training step's link; it joins the verdict (`judge_step_link`)
            and adds its note after ``notes``.
        notes: lines appended to ``result.notes``, in order.
        regularization: penalty values merged into ``result.regularization``.
        step: the due step it belongs to.
        localization: where the module-local search says the bug is (never a status).
        seconds: the whole check's wall time, copies, step link and search included.

    Returns:
        A new `CheckResult`; ``result`` itself is never changed.
    """
    update: dict[str, Any] = {}
    added = list(notes)
    if step_link is not None:
        update.update(judge_step_link(Verdict.of(result), step_link).fields())
        update["step_link"] = step_link
        added.append(step_link_note(step_link))
    if added:
        update["notes"] = [*result.notes, *added]
    if regularization:
        update["regularization"] = {**result.regularization, **regularization}
    if step is not None:
        update["step"] = int(step)
    if localization is not None:
        update["localization"] = localization
    if seconds is not None:
        update["seconds"] = float(seconds)
    return result.model_copy(update=update) if update else result
