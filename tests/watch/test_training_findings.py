"""What a due check reports when training goes bad, and which rule an alert comes from."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pytest

import gradwatch
from gradwatch.report import alert_for

F64 = npt.NDArray[np.float64]


def _quadratic(params: dict[str, F64]) -> tuple[Callable[[], float], dict[str, F64]]:
    def loss() -> float:
        return float(np.sum(params["W"] ** 2) + np.sum(params["b"] ** 2))

    return loss, {"W": 2 * params["W"], "b": 2 * params["b"]}


@pytest.mark.parametrize("where", ["gradient", "parameter"])
def test_a_nan_in_training_is_an_alert_and_the_run_goes_on(where: str) -> None:
    """NaN in dtheta or theta at step 2: a failed check naming the tensor, then steps 3, 4."""
    watch = gradwatch.GradWatch(every=1, report_dir=None)
    for step in range(5):
        params = {"W": np.ones((2, 3)), "b": np.ones(2)}
        loss, grads = _quadratic(params)
        if step == 2:
            (grads if where == "gradient" else params)["W"][0, 1] = np.nan
        watch.after_backward(step, loss=loss, params=params, grads=grads)
    statuses = [r.status for r in watch.results]
    assert statuses == ["ok", "ok", "fail", "ok", "ok"]
    bad = watch.results[2]
    assert bad.non_finite == f"{where} in tensor W (1 of 6 entries, first [0, 1]: nan)"
    assert bad.rule == "non-finite" and math.isnan(bad.ratio)
    assert bad.tensors["W"].status == "fail"
    [alert] = watch.alerts
    assert (
        alert.message
        == f"non-finite {where} in tensor W (1 of 6 entries, first [0, 1]: nan) at step 2"
    )
    assert alert.rule == "non-finite" and alert.tensor == "W" and alert.step == 2


def test_a_non_finite_loss_is_an_alert() -> None:
    """J(theta) = inf at a due step is recorded as a failed check, not an error."""
    watch = gradwatch.GradWatch(every=1, report_dir=None)
    params = {"W": np.ones(3)}
    result = watch.after_backward(0, loss=lambda: math.inf, params=params, grads={"W": np.ones(3)})
    assert result is not None and result.status == "fail" and result.error is None
    assert result.non_finite == "loss (J(theta) = inf)"
    assert watch.alerts[0].message == "non-finite loss (J(theta) = inf) at step 0"


def test_a_non_finite_gradient_raises_when_asked() -> None:
    """on_alert='raise': the non-finite check is recorded, then GradientCheckError is raised."""
    watch = gradwatch.GradWatch(every=1, report_dir=None, on_alert="raise")
    params = {"W": np.ones(3)}
    with pytest.raises(gradwatch.GradientCheckError, match="non-finite gradient in tensor W"):
        watch.after_backward(
            0, loss=lambda: 1.0, params=params, grads={"W": np.array([1.0, np.inf, 0.0])}
        )
    assert [r.status for r in watch.results] == ["fail"]


def test_a_direct_check_still_refuses_non_finite_input() -> None:
    """gradwatch.check itself raises (ParameterError and NonFiniteError) naming the entry."""
    params = {"W": np.ones(3)}
    with pytest.raises(gradwatch.ParameterError) as raised:
        gradwatch.check(lambda: 1.0, params, {"W": np.array([1.0, np.nan, 0.0])})
    assert isinstance(raised.value, gradwatch.NonFiniteError)
    assert raised.value.tensor == "W" and raised.value.quantity == "gradient"
    with pytest.raises(gradwatch.LossError):
        gradwatch.check(lambda: math.nan, params, {"W": np.ones(3)})


def _scale_and_small_tensor(error: float) -> gradwatch.CheckResult:
    """A 100-entry tensor with gradient ~1 next to a scalar whose gradient is 0.01 * (1 + error)."""
    rng = np.random.default_rng(0)
    params = {"W": rng.normal(size=100), "beta": np.array([0.005])}

    def loss() -> float:
        return float(0.5 * np.sum(params["W"] ** 2) + np.sum(params["beta"] ** 2))

    grads = {"W": params["W"].copy(), "beta": 2 * params["beta"] * (1 + error)}
    return gradwatch.check(loss, params, grads)


def test_the_per_tensor_rule_is_named_with_its_own_number() -> None:
    """A 10% error in a small tensor: the alert quotes the tensor's ratio, not the global one."""
    result = _scale_and_small_tensor(0.1)
    assert result.status == "fail" and result.ratio < result.threshold
    assert result.rule == "per-tensor" and result.rule_ratio == result.tensors["beta"].ratio
    alert = alert_for(result)
    assert alert is not None and alert.rule == "per-tensor"
    assert alert.rule_ratio == pytest.approx(0.1 / 2.1, rel=1e-3)
    assert alert.message.startswith(
        f"gradient check failed by the per-tensor rule: tensor beta ratio "
        f"{alert.rule_ratio:.3g} >= threshold 0.001 (the global ratio {result.ratio:.3g} "
        "is below it)"
    )
    assert (result.verdict or "").startswith("fail by the per-tensor rule: beta")


def test_the_global_rule_is_named_with_the_global_ratio() -> None:
    """Every gradient 10% off: the global rule fired, its ratio is the alert's number."""
    params = {"W": np.array([1.0, -2.0])}
    result = gradwatch.check(
        lambda: float(np.sum(params["W"] ** 2)), params, {"W": 2.2 * params["W"]}
    )
    alert = alert_for(result)
    assert alert is not None and alert.rule == "global" and result.rule == "global"
    assert alert.rule_ratio == result.ratio == result.rule_ratio
    assert alert.message.startswith(
        f"gradient check failed by the global rule: ratio {result.ratio:.3g} >= threshold 0.001"
    )
