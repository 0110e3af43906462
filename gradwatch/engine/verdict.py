"""The verdict of a check: which status, which rule set it, and the notes that explain it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gradwatch.engine.comparison import NEAR_ZERO_FLOOR, NOISE_UNITS, status_for
from gradwatch.result import CheckResult, Rule, Status, StepLink, TensorResult

__all__ = [
    "STATUS_ORDER",
    "Verdict",
    "decide",
    "explain_verdict",
    "judge_step_link",
    "resolution_notes",
    "step_link_note",
    "worst_status",
]

STATUS_ORDER: dict[Status, int] = {"ok": 0, "warn": 1, "fail": 2, "nondeterministic": 3}


@dataclass(frozen=True)
class Verdict:
    """A check's status, the rule that set it (as data and as a sentence) and its number."""

    status: Status
    sentence: str | None
    rule: Rule | None
    rule_ratio: float | None

    @classmethod
    def of(cls, result: CheckResult) -> Verdict:
        """The verdict ``result`` carries."""
        return cls(result.status, result.verdict, result.rule, result.rule_ratio)

    def fields(self) -> dict[str, Any]:
        """The `CheckResult` fields this verdict sets."""
        return {
            "status": self.status,
            "verdict": self.sentence,
            "rule": self.rule,
            "rule_ratio": self.rule_ratio,
        }


def decide(
    ratio: float,
    per_tensor: Mapping[str, TensorResult],
    warn: float,
    threshold: float,
    *,
    nondeterministic: bool,
    below: tuple[float, float] | None = None,
) -> Verdict:
    """Backprop's verdict on what the core measured: `worst_status` and `explain_verdict`."""
    status = worst_status(ratio, per_tensor, warn, threshold, nondeterministic)
    sentence, rule, rule_ratio = explain_verdict(status, ratio, per_tensor, warn, threshold, below)
    return Verdict(status, sentence, rule, rule_ratio)


def judge_step_link(backprop: Verdict, link: StepLink) -> Verdict:
    """The check's verdict once the training step's link is known.

    A failing link fails the check and a warning one warns, unless backprop already
    reached that status (its rule then stands: the bug may be in backprop itself) or the
    check has no verdict to raise (``error``, ``nondeterministic``). A link that sets the
    status gets the rule ``"step"`` and its own number (the larger of its global and its
    worst tensor's ratio); the sentence stays backprop's (what the views print after the
    link's own numbers, ``backprop: ...``), since the link's are in ``step_link``.
    """
    if backprop.status in ("error", "nondeterministic") or link.status not in ("warn", "fail"):
        return backprop
    if STATUS_ORDER[link.status] <= STATUS_ORDER[backprop.status]:
        return backprop
    worst = link.tensors.get(link.worst_tensor, 0.0) if link.worst_tensor else 0.0
    return Verdict(link.status, backprop.sentence, "step", max(link.ratio, worst))


def step_link_note(link: StepLink) -> str:
    """The note every check with a step link carries: what was compared, and the outcome."""
    note = (
        f"step link: the optimizer's gradient against the float64 gradient of J over "
        f"{link.micro_batches} micro-batch(es): ratio {link.ratio:.3g} ({link.status})"
    )
    if link.clip_factor != 1.0:
        note += f", clipping by {link.clip_factor:.4g} undone"
    if link.explanation:
        note += f"; {link.explanation}"
    return note


def explain_verdict(
    status: Status,
    ratio: float,
    per_tensor: Mapping[str, TensorResult],
    warn: float,
    threshold: float,
    below: tuple[float, float] | None = None,
) -> tuple[str, Rule, float | None]:
    """Which rule set ``status``, with that rule's own number: (sentence, rule, number).

    The global rule judges ``ratio`` over every checked component; the per-tensor rule
    judges each tensor's own ratio, its denominator floored at ``NEAR_ZERO_FLOOR`` of
    the whole gradient's scale (docs/design.md#near-zero). The status is the worse of the two.
    Both denominators are floored at J's resolution (``NOISE_UNITS``).
    """
    resolved = (
        ""
        if below is None
        else f" (gradient {below[0]:.3g} below resolution {below[1]:.3g}, judged against it)"
    )
    if status == "nondeterministic":
        return (
            "nondeterministic: J(theta) evaluated twice differs; no verdict, no alert",
            "none",
            None,
        )
    limit = {"fail": ("threshold", threshold), "warn": ("warn", warn)}
    if status not in limit:
        return (
            f"ok: global ratio {ratio:.3g}{resolved} and every tensor's ratio below warn {warn:g}",
            "none",
            None,
        )
    name, value = limit[status]
    if status_for(ratio, warn, threshold) == status:
        return (
            f"{status} by the global rule: ratio {ratio:.3g} >= {name} {value:g}{resolved}",
            "global",
            ratio,
        )
    flagged = sorted(
        ((t, r.ratio) for t, r in per_tensor.items() if r.status == status and r.ratio is not None),
        key=lambda x: -x[1],
    )
    listed = ", ".join(f"{t} (ratio {r:.3g})" for t, r in flagged[:3])
    more = f" and {len(flagged) - 3} more" if len(flagged) > 3 else ""
    sentence = (
        f"{status} by the per-tensor rule: {listed}{more} >= {name} {value:g}; the global "
        f"ratio {ratio:.3g} is below it (a tensor is judged on its own, its denominator "
        f"floored at {NEAR_ZERO_FLOOR:g} of the whole gradient's scale)"
    )
    return sentence, "per-tensor", flagged[0][1]


def worst_status(
    ratio: float,
    per_tensor: Mapping[str, TensorResult],
    warn: float,
    threshold: float,
    nondeterministic: bool,
) -> Status:
    """The worse of the global verdict and the per-tensor ones; a nondeterministic J wins."""
    if nondeterministic:
        return "nondeterministic"
    status = status_for(ratio, warn, threshold)
    for tensor_verdict in per_tensor.values():
        if STATUS_ORDER[tensor_verdict.status] > STATUS_ORDER[status]:
            status = tensor_verdict.status
    return status


def resolution_notes(
    rounding_step: float | None,
    below: tuple[float, float] | None,
    per_tensor: Mapping[str, TensorResult],
    warn: float,
    dtype: object,
) -> list[str]:
    """What limits the resolution of this check's numbers: a coarse J, a gradient near 0."""
    notes = []
    if rounding_step is not None:
        notes.append(
            f"J's values are whole multiples of a rounding step {rounding_step:.3g} (J is "
            f"computed coarser than {dtype}: float32, bfloat16 or quantized): a numeric "
            f"derivative resolves no less than {rounding_step:.3g} / h, and the ratios "
            "are judged against that resolution, not called a bug"
        )
    if below is not None:
        notes.append(
            f"below resolution: the gradient's size {below[0]:.3g} (||numeric|| + "
            f"||analytic||) is below {below[1]:.3g}, what J's finite differences resolve "
            f"at warn {warn:g} ({NOISE_UNITS:g} roundoff units eps_J |J| / h over warn): "
            "at or near an optimum; the ratio is judged against that resolution"
        )
    quiet = [n for n, t in per_tensor.items() if t.below_resolution]
    if quiet and below is None:
        listed = ", ".join(quiet[:5]) + (f" and {len(quiet) - 5} more" if len(quiet) > 5 else "")
        notes.append(
            f"below resolution (judged against J's roundoff, not their own size): {listed}"
        )
    return notes
