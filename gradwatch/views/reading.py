"""How to read a report: what `gradwatch show`, ``html`` and ``plot`` share.

Which checks ran, which tensors to list and which to fold, which notes change how a
result reads, and where to look next when a check failed. Plain functions over a loaded
`Report`; no rendering here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from gradwatch.report import Report
from gradwatch.result import CheckResult, TensorResult
from gradwatch.store.alerts import only_the_step_failed

__all__ = [
    "ROUTINE_NOTES",
    "Suspect",
    "completed",
    "format_ratio",
    "nan_last",
    "next_step",
    "notable_notes",
    "ranked_tensors",
    "run_option",
    "screened_only",
    "step_of",
    "suspect",
    "threshold",
    "worst_check",
]

ROUTINE_NOTES = (
    "screened along",
    "directional: one random",
    "localized by bisection",
    "J = ",
    "float64 shadow of a float32 model",
    "analytic gradient:",
    "penalties in J",
    "batched evaluation:",
    "live: analytic gradient",
    "full check",
)
"""Notes that describe how a check ran as it always does; they do not change how its
result reads (``show`` folds them, ``--json`` and ``html`` keep them). Every other note
(gradient accumulation, weight decay outside J, a fallback to the model's own precision,
held padding rows, a kink left out, tensors not localized, ...) is shown."""

_NOTE_OPTIMIZER_WITHOUT_DECAY = re.compile(r"^optimizer \w+: no weight decay$")


def completed(report: Report) -> list[CheckResult]:
    """The checks that ran to completion (an error check has no ratio), in step order."""
    return [check for check in report.checks if check.status != "error"]


def step_of(check: CheckResult) -> int:
    """The check's step; -1 for a check made outside a training loop."""
    return -1 if check.step is None else check.step


def nan_last(value: float | None) -> float:
    """Sort key that ranks NaN as the largest ratio (a NaN ratio is suspicious) and None,
    a tensor screened together with the others (no ratio of its own), as the smallest."""
    if value is None:
        return -math.inf
    return math.inf if math.isnan(value) else value


def format_ratio(value: float | None) -> str:
    """``1.23e-04``; ``-`` for None."""
    return "-" if value is None else f"{value:.2e}"


def worst_check(report: Report) -> CheckResult | None:
    """The completed check with the highest ratio, None when none completed."""
    checks = completed(report)
    return max(checks, key=lambda check: nan_last(check.ratio)) if checks else None


def threshold(report: Report) -> float:
    """The run's alert threshold (the configuration's, else the last check's)."""
    if report.configuration is not None:
        return report.configuration.threshold
    return report.checks[-1].threshold if report.checks else 1e-3


def screened_only(check: CheckResult) -> bool:
    """True when only the all-tensor screen ran: no tensor was checked on its own."""
    return check.mode == "directional" and all(t.checked == 0 for t in check.tensors.values())


def ranked_tensors(check: CheckResult) -> list[tuple[str, TensorResult]]:
    """Tensors by verdict (fail, then other non-ok), then by ratio, worst first."""
    order = {"fail": 0, "nondeterministic": 1, "warn": 2}
    return sorted(
        check.tensors.items(),
        key=lambda item: (order.get(item[1].status, 3), -nan_last(item[1].ratio)),
    )


def is_routine(note: str) -> bool:
    """True for a note that only says how the check ran (see `ROUTINE_NOTES`)."""
    return note.startswith(ROUTINE_NOTES) or bool(_NOTE_OPTIMIZER_WITHOUT_DECAY.match(note))


def notable_notes(report: Report) -> tuple[list[tuple[str, int]], int]:
    """The notes that change how the report reads, each with how many checks carry it.

    Notes that differ only in their numbers or lists count as one (the first wording
    is kept). The run's own notes count as carried by every check. Returns the notes
    and how many distinct routine notes were folded.
    """
    carried: dict[str, tuple[str, int]] = {}
    routine: set[str] = set()
    checks = report.checks
    run_notes = report.configuration.notes if report.configuration else []
    sources = [(note, len(checks)) for note in run_notes]
    sources += [(note, 1) for check in checks for note in dict.fromkeys(check.notes)]
    for note, count in sources:
        key = _note_key(note)
        if is_routine(note):
            routine.add(key)
            continue
        first, seen = carried.get(key, (note, 0))
        carried[key] = (first, min(seen + count, max(len(checks), 1)))
    return list(carried.values()), len(routine)


def _note_key(note: str) -> str:
    """Notes alike but for numbers and the list after their first colon count as one."""
    head = note.split(": ", 1)[0] if len(note) > 60 else note
    return re.sub(r"[\d.e+-]+", "#", head)[:80]


@dataclass(frozen=True)
class Suspect:
    """The tensor whose backward to read first, and why that one."""

    tensor: str
    reason: str
    """``"the only failing tensor"``, ``"the last failing tensor in parameter order"``, ..."""
    after: str | None = None
    """The first passing tensor after it in parameter order, when there is one."""


def suspect(check: CheckResult) -> Suspect | None:
    """Where a failed check points: the failing tensor nearest the bug.

    A wrong backward corrupts the gradient of the tensor it produces and, through the
    chain rule, of every tensor before it in the forward pass, while the tensors after
    it stay correct. In parameter order (the order most models define their layers),
    the last failing tensor followed by passing ones is therefore next to the bug.
    """
    names = list(check.tensors)
    failing = [name for name in names if check.tensors[name].status == "fail"]
    if not failing:
        if check.worst:
            return Suspect(check.worst[0].tensor, "holds the worst component")
        return None
    if len(failing) == 1:
        return Suspect(failing[0], "the only failing tensor")
    last = failing[-1]
    after = [name for name in names[names.index(last) + 1 :] if check.tensors[name].checked]
    if not after:
        return Suspect(last, "the last tensor in parameter order fails")
    return Suspect(
        last,
        f"the last of {len(failing)} failing tensors in parameter order",
        after=after[0],
    )


def run_option(report: Report) -> str:
    """The ``--run`` a command needs to read the run `report` holds ('' for the latest)."""
    runs = report.run_summaries
    if report.run is None:
        return " --run all" if len(runs) > 1 else ""
    return "" if not runs or report.run == runs[-1].run else f" --run {report.run}"


def next_step(report: Report, directory: str) -> str | None:
    """One sentence on where to look, when the report holds an alert or an error check."""
    failed = [check for check in completed(report) if check.status == "fail"]
    if failed:
        first = failed[0]
        link = only_the_step_failed(first)
        if link is not None:
            return (
                f"next: backprop is right, the training step is not: {link.explanation} "
                f"(step {step_of(first)}; the result's step_link has each tensor's ratio)"
            )
        found = suspect(first)
        look = f"gradwatch worst {directory} --step {step_of(first)}{run_option(report)}"
        if found is None:
            return f"next: {look}"
        if found.reason.startswith("the last tensor"):
            return (
                f"next: the last tensor, {found.tensor}, fails too: read the loss and the "
                f"output layer's backward (a hand-written loss? a custom autograd.Function?); "
                f"then {look}"
            )
        return (
            f"next: read the backward that produces {found.tensor}'s gradient "
            f"({found.reason}): a custom autograd.Function? a hand-written loss? "
            f"a .detach()? then {look}"
        )
    if report.errors:
        error = report.errors[0]
        source = error.error_source or "gradwatch"
        return (
            f"next: step {step_of(error)}'s check failed inside {source} (gradwatch's "
            "trouble, not a gradient verdict): on_error='raise' shows the traceback"
        )
    return None


def listed_steps(steps: list[int]) -> str:
    """Steps for a sentence: every one up to 8, else the first two and the last."""
    if len(steps) <= 8:
        return ", ".join(str(step) for step in steps)
    return f"{steps[0]}, {steps[1]}, ..., {steps[-1]}"
