"""Which alert a failing check raises: the rule that fired, the tensor and the component.

`alert_for` picks one of three alerts: a non-finite value, the training step's link
(backprop passed, the optimizer's gradient did not), or backprop itself by the global or
the per-tensor rule.
"""

from __future__ import annotations

from gradwatch.result import CheckResult, Rule, StepLink
from gradwatch.store.models import Alert

__all__ = ["TIE", "alert_for", "only_the_step_failed", "ratio_sort_key"]

TIE = 0.99
"""Failing tensors within this factor of the largest ratio count as tied in an alert."""


def alert_for(result: CheckResult) -> Alert | None:
    """The alert a failing check raises, or None when `result` did not fail.

    The alert names the failing tensor with the largest per-tensor ratio (among tensors
    tied within ``TIE``, the one holding the worst component; with no failing tensor,
    the worst component's tensor) and the worst component, and says which rule fired
    with that rule's own number: the global ratio, the tensor's ratio (the per-tensor
    rule, when the global ratio is below the threshold), or a non-finite value. When
    backprop passed and the training step's link failed, it names that link, the tensor
    that differs most and what the difference looks like.
    """
    if not result.failed:
        return None
    where = "" if result.step is None else f" at step {result.step}"
    if result.non_finite is not None:
        return _non_finite_alert(result, result.non_finite, where)
    link = only_the_step_failed(result)
    if link is not None:
        return _step_link_alert(result, link, where)
    return _backprop_alert(result, where)


def only_the_step_failed(result: CheckResult) -> StepLink | None:
    """The failing step link of a check whose backprop passed (its own alert), else None.

    The verdict says so (``rule == "step"``, `gradwatch.engine.verdict.judge_step_link`).
    Reports written before the verdict took the link in: a failed check whose rule is
    ``"none"`` was failed by the link alone; one without a rule is judged on its ratios.
    """
    link = result.step_link
    if link is None or link.status != "fail" or result.status != "fail":
        return None
    if result.rule is not None:
        return link if result.rule in ("step", "none") else None
    backprop_failed = ratio_sort_key(result.ratio) >= result.threshold or any(
        t.status == "fail" for t in result.tensors.values()
    )
    return None if backprop_failed else link


def _non_finite_alert(result: CheckResult, non_finite: str, where: str) -> Alert:
    """NaN or inf in theta, the gradient or J: the alert names the first tensor."""
    return Alert(
        step=result.step,
        ratio=result.ratio,
        threshold=result.threshold,
        tensor=next(iter(result.tensors), None),
        tensor_ratio=None,
        component=None,
        message=f"non-finite {non_finite}{where}",
        rule="non-finite",
        non_finite=non_finite,
    )


def _step_link_alert(result: CheckResult, link: StepLink, where: str) -> Alert:
    """Backprop is right but the optimizer's gradient is not the gradient of the step's J."""
    worst = link.worst_tensor
    return Alert(
        step=result.step,
        ratio=link.ratio,
        threshold=link.threshold,
        tensor=worst,
        tensor_ratio=link.tensors.get(worst) if worst else None,
        component=None,
        message=(
            f"training step check failed{where}: backprop is right, but the optimizer's "
            f"gradient differs from the gradient of the step's loss (ratio "
            f"{link.ratio:.3g}, threshold {link.threshold:g}"
            + (f"; most in {worst}: {link.tensors[worst]:.3g}" if worst else "")
            + f"): {link.explanation}"
        ),
        rule="step",
        rule_ratio=max(link.ratio, link.tensors.get(worst, 0.0) if worst else 0.0),
    )


def _backprop_alert(result: CheckResult, where: str) -> Alert:
    """The global rule (the ratio at or above the threshold) or the per-tensor rule."""
    tensor, tensor_ratio = _alert_tensor(result)
    component = result.worst[0] if result.worst else None
    rule: Rule = "global" if ratio_sort_key(result.ratio) >= result.threshold else "per-tensor"
    if rule == "global" or tensor is None or tensor_ratio is None:
        message = _global_rule_message(result, where, tensor, tensor_ratio)
        rule_ratio = result.ratio
    else:
        message = (
            f"gradient check failed{where} by the per-tensor rule: tensor {tensor} ratio "
            f"{tensor_ratio:.3g} >= threshold {result.threshold:g} (the global ratio "
            f"{result.ratio:.3g} is below it)"
        )
        rule_ratio = tensor_ratio
    if component is not None:
        message += (
            f"; worst component {component.name}: analytic {component.analytic:.6g}, "
            f"numeric {component.numeric:.6g}"
        )
    module = None
    if result.localization is not None and result.localization.suspects:
        # Module-local checks name where the bug is; the tensor above is a measurement.
        suspect = result.localization.suspects[0]
        message += "; the bug is in " + suspect.describe()
        module = suspect.module or None
    return Alert(
        step=result.step,
        ratio=result.ratio,
        threshold=result.threshold,
        tensor=tensor,
        tensor_ratio=tensor_ratio,
        component=component.name if component else None,
        message=message,
        rule=rule,
        rule_ratio=rule_ratio,
        module=module,
    )


def _global_rule_message(
    result: CheckResult, where: str, tensor: str | None, tensor_ratio: float | None
) -> str:
    """The alert's message when the global rule fired, naming the wrong tensor if known."""
    message = (
        f"gradient check failed{where} by the global rule: ratio {result.ratio:.3g} "
        f">= threshold {result.threshold:g}"
    )
    if tensor is not None:
        message += f"; wrong tensor: {tensor}"
        if tensor_ratio is not None:
            message += f" (its ratio {tensor_ratio:.3g})"
    return message


def _alert_tensor(result: CheckResult) -> tuple[str | None, float | None]:
    """The tensor an alert names, and its ratio (see `alert_for`)."""
    failing = {
        name: t.ratio
        for name, t in result.tensors.items()
        if t.status == "fail" and t.ratio is not None
    }
    if failing:
        tensor = max(failing, key=lambda name: ratio_sort_key(failing[name]))
        tied = {name for name, ratio in failing.items() if ratio >= TIE * failing[tensor]}
        if len(tied) > 1 and result.worst and result.worst[0].tensor in tied:
            # Several tensors at about the same ratio (1 when the signs of one direction's
            # derivatives disagree): the worst component, measured entry by entry, decides.
            tensor = result.worst[0].tensor
        return tensor, failing[tensor]
    if result.worst:
        tensor = result.worst[0].tensor
        return tensor, result.tensors[tensor].ratio if tensor in result.tensors else None
    return None, None


def ratio_sort_key(value: float) -> float:
    """Order ratios with NaN treated as the largest (a NaN ratio is the worst news)."""
    return float("inf") if value != value else value
